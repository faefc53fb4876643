"""The manifest of an index version: one JSON file beside the FAISS file and the vectors.

It records everything needed to rebuild the query side (task spec and arguments, compression,
vector layout, model fingerprint) and how the index was made (preconditioner, FAISS kind and its
measured recall, library versions). ``load_manifest`` upgrades files of older format versions.
"""

from __future__ import annotations

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
    "library_versions",
    "load_manifest",
    "save_manifest",
]

FORMAT_VERSION = 1
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
    return data
