"""What an index needs of its task, kept inside the data directory (DESIGN §3, self-contained).

At build time a task spec is *recorded*: a task file (``path/to/file.py:Name``) is copied with
the modules beside it that it imports, and every task argument that names an existing file or
folder (weights, a checkpoint directory, a JSONL file) is copied too. Copies are
content-addressed (``assets/<sha256>``) and hard-linked where the filesystem allows, so two
indexes of the same weights share one copy and nothing is copied twice. The manifest refers to
them relative to the data directory: an index serves from any working directory, and after the
data directory moves. A module spec (``package.module:Name``) is recorded as it is: the package
must be importable where the index is served.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import sys
from collections.abc import Iterator, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

from .errors import TaskError
from .store.files import fsync_dir

__all__ = ["record_task", "resolve_task", "task_files", "task_identity"]

log = logging.getLogger(__name__)

ASSETS = "assets"
"""Folder of content-addressed copies, under the data directory."""

RECORD_FORMAT = 1


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _walk(folder: Path) -> Iterator[Path]:
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for name in sorted(files):
            yield Path(root) / name


def _sha256_tree(folder: Path, files: list[Path] | None = None) -> str:
    """One digest over the relative paths and contents of a folder's files."""
    h = hashlib.sha256()
    for path in files if files is not None else _walk(folder):
        h.update(path.relative_to(folder).as_posix().encode() + b"\0")
        h.update(_sha256_file(path).encode())
    return h.hexdigest()


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:  # another filesystem, or links not allowed: a real copy
        shutil.copy2(src, dst)


def _store(data_dir: Path, digest: str, files: Mapping[str, Path]) -> str:
    """Put ``files`` (relative name → source) under ``assets/<digest>/`` once; its path."""
    rel = f"{ASSETS}/{digest}"
    final = data_dir / rel
    if final.is_dir():
        return rel
    tmp = data_dir / ASSETS / f".tmp-{digest}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    for name, src in files.items():
        _link_or_copy(src, tmp / name)
    try:
        os.rename(tmp, final)
    except OSError:  # another build stored the same content meanwhile
        if not final.is_dir():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    fsync_dir(final.parent)
    return rel


def task_files(path: Path) -> dict[str, Path]:
    """A task file and the modules beside it (in its folder or below) that importing it loaded.

    Call after the task class was imported: ``sys.modules`` then says what it pulled in. A
    module counts when it was found through the task's folder (its dotted name is its path
    below the folder) and is not part of an installed distribution.
    """
    folder = path.parent
    installed = set(metadata.packages_distributions())
    found = {path.name: path}
    for name, module in list(sys.modules.items()):
        source = getattr(module, "__file__", None)
        if not source or name.split(".")[0] in installed:
            continue
        src = Path(source).resolve()
        parts = name.split(".")
        if src in (folder.joinpath(*parts).with_suffix(".py"),
                   folder.joinpath(*parts, "__init__.py")):
            found[src.relative_to(folder).as_posix()] = src
    return dict(sorted(found.items()))


def _record_file_spec(target: str, name: str, data_dir: Path) -> dict[str, Any]:
    path = Path(target).expanduser().resolve()
    if not path.is_file():
        raise TaskError(f"task file {target!r} does not exist")
    files = task_files(path)
    digest = _sha256_tree(path.parent, [files[k] for k in files])
    asset = _store(data_dir, digest, files)
    return {"kind": "file", "asset": asset, "file": path.name, "name": name,
            "original": str(path)}


def _record_arg(value: Any, data_dir: Path) -> dict[str, Any] | None:
    """An asset record when ``value`` names an existing file or folder, else None."""
    if not isinstance(value, str) or not value or "\0" in value or len(value) > 4096:
        return None
    path = Path(value).expanduser()
    try:
        exists = path.exists()
    except OSError:
        return None
    if not exists:
        return None
    path = path.resolve()
    if path.is_file():
        digest = _sha256_file(path)
        # the name is part of the key: a task may choose its loader by the file's extension
        folder = hashlib.sha256(f"{path.name}\0{digest}".encode()).hexdigest()
        asset = _store(data_dir, folder, {path.name: path})
        return {"kind": "file", "asset": f"{asset}/{path.name}", "sha256": digest,
                "original": str(path)}
    files = list(_walk(path))
    digest = _sha256_tree(path, files)
    asset = _store(data_dir, digest, {f.relative_to(path).as_posix(): f for f in files})
    return {"kind": "dir", "asset": asset, "sha256": digest, "original": str(path)}


def record_task(spec: str, args: Mapping[str, Any], data_dir: Path) -> dict[str, Any]:
    """The manifest's record of a task: its spec and arguments, with copies in ``data_dir``.

    Args:
        spec: ``package.module:Name`` or ``path/to/file.py:Name`` (the class must import: call
            after loading it, so the modules it imports beside it are known).
        args: the task constructor's keyword arguments as given.
        data_dir: the data directory the copies go to.

    Returns:
        ``{"spec", "args", "source", "assets", "format"}``; ``spec`` and ``args`` as given (with
        a task file's path made absolute), for people to read; the rest for
        :func:`resolve_task`.
    """
    target, _, name = spec.rpartition(":")
    data_dir = Path(data_dir)
    if target.endswith(".py"):
        source = _record_file_spec(target, name, data_dir)
        shown = f"{source['original']}:{name}"
    else:
        source = {"kind": "module", "module": target, "name": name}
        shown = spec
    assets = {}
    for key, value in args.items():
        found = _record_arg(value, data_dir)
        if found is not None:
            assets[key] = found
    return {"format": RECORD_FORMAT, "spec": shown, "args": dict(args), "source": source,
            "assets": assets}


def resolve_task(record: Mapping[str, Any], data_dir: Path) -> tuple[str, dict[str, Any]]:
    """The spec and constructor arguments to load a recorded task from ``data_dir``.

    A record without ``source`` (indexes built before tasks were recorded) is used as it was
    written: its file and paths must still exist where they were.

    Raises:
        TaskError: a recorded copy is missing from the data directory.
    """
    args = dict(record.get("args") or {})
    source = record.get("source")
    if source is None:
        return str(record["spec"]), args
    data_dir = Path(data_dir)
    if source["kind"] == "file":
        folder = data_dir / source["asset"]
        if not (folder / source["file"]).is_file():
            raise TaskError(f"the recorded task file {source['file']!r} is missing from the data "
                            f"directory ({source['asset']}); run `gradindex repair` with --task")
        spec = f"{folder / source['file']}:{source['name']}"
    else:
        spec = f"{source['module']}:{source['name']}"
    for key, asset in (record.get("assets") or {}).items():
        path = data_dir / asset["asset"]
        if not path.exists():
            raise TaskError(f"the recorded copy of task argument {key!r} is missing from the "
                            f"data directory ({asset['asset']}); run `gradindex repair` with "
                            f"--task-arg {key}=PATH")
        args[key] = str(path)
    return spec, args



def task_identity(record: Mapping[str, Any]) -> dict[str, Any]:
    """What a recorded task's vectors depend on: its code and files by content, its other
    arguments by value; not the paths they were copied from."""
    source = {k: v for k, v in record["source"].items() if k != "original"}
    assets = record.get("assets") or {}
    return {"source": source,
            "assets": {key: asset["sha256"] if "sha256" in asset else asset["asset"]
                       for key, asset in assets.items()},
            "args": {k: v for k, v in (record.get("args") or {}).items() if k not in assets}}
