"""The manifest of an index version: one JSON file beside the FAISS file and the vectors.

It records everything needed to rebuild the query side (task spec and arguments, compression,
vector layout, model fingerprint) and how the index was made (preconditioner, FAISS kind and its
measured recall, library versions). ``load_manifest`` upgrades files of older format versions.

From format 2 it also holds the SHA-256 of every other file of the version (``checksums``),
written last by finalize and checked by :func:`checksum_problems` whenever the version is
opened, so a file changed after publishing (a flipped bit, a vector rescaled in place, a
file swapped for another build's) is refused instead of served. Older manifests have none
(``checksums`` is null after the upgrade) and are opened without that check.
"""

from __future__ import annotations

import hashlib
import json
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

from ..errors import GradindexError
from .files import write_atomic

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "checksum_problems",
    "file_checksums",
    "library_versions",
    "load_manifest",
    "save_manifest",
]

FORMAT_VERSION = 2
"""Bumped whenever a field changes meaning; ``load_manifest`` reads every older version."""

MANIFEST_NAME = "manifest.json"


def library_versions() -> dict[str, str]:
    """Versions of the libraries that shape an index's numbers (read without importing them)."""
    from ... import __version__

    versions = {"gradindex": __version__, "python": platform.python_version()}
    for name, dist in (("torch", "torch"), ("numpy", "numpy"), ("faiss", "faiss-cpu")):
        try:
            versions[name] = metadata.version(dist)
        except metadata.PackageNotFoundError:  # faiss-gpu, or a source build
            continue
    return versions


CHUNK = 1 << 20
"""Bytes read at a time while hashing a file."""


def sha256_of(path: Path) -> str:
    """The SHA-256 of a file, hex, read in chunks (files may be larger than memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def file_checksums(folder: Path) -> dict[str, str]:
    """SHA-256 of every file of a version folder but the manifest, by file name."""
    return {p.name: sha256_of(p) for p in sorted(Path(folder).iterdir())
            if p.is_file() and p.name != MANIFEST_NAME}


def checksum_problems(folder: Path, manifest: dict[str, Any]) -> list[str]:
    """What differs between a version's files and its manifest's ``checksums``: one line per
    file (by name only), empty when all match or the manifest predates checksums.

    Raises:
        GradindexError: the ``checksums`` entry is not a mapping of names to hex digests.
    """
    expected = manifest.get("checksums")
    if expected is None:
        return []
    if not isinstance(expected, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in expected.items()):
        raise GradindexError("the manifest's `checksums` is not a mapping of file names to "
                             "SHA-256 digests")
    problems = []
    for name, digest in sorted(expected.items()):
        path = Path(folder) / name
        if Path(name).name != name or name == MANIFEST_NAME:
            problems.append(f"{name!r} is not a file of the version")
        elif not path.is_file():
            problems.append(f"{name} is missing")
        else:
            try:
                found = sha256_of(path)
            except OSError as exc:
                problems.append(f"{name} cannot be read ({exc.strerror or exc})")
                continue
            if found != digest:
                problems.append(f"{name} does not match its checksum (sha256 {found[:12]}…, "
                                f"the manifest says {digest[:12]}…): it changed after publishing")
    return problems


def save_manifest(folder: Path, manifest: dict[str, Any]) -> Path:
    """Write ``manifest.json`` into ``folder`` (atomically), stamped with the format version."""
    data = {"format_version": FORMAT_VERSION, **manifest}
    path = Path(folder) / MANIFEST_NAME
    write_atomic(path, json.dumps(data, indent=2, sort_keys=True).encode())
    return path


def load_manifest(folder: Path) -> dict[str, Any]:
    """Read a version folder's manifest, upgraded to the current format.

    Raises:
        GradindexError: the file is missing, unreadable, or from a newer gradindex.
    """
    path = Path(folder) / MANIFEST_NAME
    try:
        data: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise GradindexError(f"cannot read the index manifest {str(path)!r}: {exc}") from exc
    version = int(data.get("format_version", 0))
    if version > FORMAT_VERSION:
        raise GradindexError(
            f"{str(path)!r} has manifest format {version}; this gradindex reads up to "
            f"{FORMAT_VERSION}: upgrade gradindex"
        )
    return _upgrade(data, version)


def _upgrade(data: dict[str, Any], version: int) -> dict[str, Any]:
    """Bring an older manifest to the current format, one version at a time."""
    if version < 1:
        # Format 0 (unversioned drafts) kept FAISS settings flat and had no recall figures.
        data.setdefault("faiss", {"kind": data.pop("faiss_kind", "flat"),
                                  "fp16": bool(data.pop("fp16", False))})
        data.setdefault("model_fingerprint", [])
        data["format_version"] = 1
    if version < 2:
        # Format 1 had no checksums: such versions are opened without that check.
        data.setdefault("checksums", None)
        data["format_version"] = 2
    return data
