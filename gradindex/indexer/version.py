"""The files of one published version: manifest, vectors, ids, self-influence and FAISS.

:meth:`VersionFiles.open` reads them read-only (the vectors memory-mapped) and turns every
way they can be damaged (missing, empty, truncated, unreadable, shapes that disagree) into a
:class:`StorageError` that names the file and the version and never an absolute path, so a
server can say why it does not serve an index without leaking where it keeps its data.
:meth:`VersionFiles.check` then checks FAISS ids against ``ids.npy`` and the SQL rows.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from .errors import GradindexError, StorageError
from .store import (
    MANIFEST_NAME,
    FaissConfig,
    checksum_problems,
    faiss_ids,
    load_manifest,
    read_faiss,
)

__all__ = ["VersionFiles"]

T = TypeVar("T")


def _npy_problem(path: Path) -> str | None:
    """What is wrong with an ``.npy`` file's length or header, read without loading it."""
    try:
        with open(path, "rb") as fh:
            version = np.lib.format.read_magic(fh)
            reader = {(1, 0): np.lib.format.read_array_header_1_0,
                      (2, 0): np.lib.format.read_array_header_2_0}.get(version)
            if reader is None:
                return None  # a newer .npy format: left to np.load
            shape, _, dtype = reader(fh)
            expected = fh.tell() + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    except (ValueError, EOFError):
        return "is corrupt (not a .npy array)"
    if dtype.hasobject:
        return "is corrupt (it holds Python objects, not numbers)"
    size = path.stat().st_size
    return f"is truncated ({size:,} of {expected:,} bytes)" if size < expected else None


class VersionFiles:
    """The files of version ``version`` of index ``name``, in ``folder``, open for reading.

    Use :meth:`open`; the attributes are the loaded files.
    """

    manifest: dict[str, Any]
    faiss_config: FaissConfig
    vectors: np.ndarray
    """``[N, dim]`` float32, memory-mapped."""
    ids: np.ndarray
    """``[N]`` example row ids (the FAISS ids), in vector order."""
    self_influence: np.ndarray | None
    """``[N]`` by position, memory-mapped; None for versions written before the file existed."""
    faiss: Any | None
    """None when searches scan the vectors (exact, stored once)."""
    relative_faiss: Any | None
    """The FAISS index of relative influence; None for versions written before it existed."""

    def __init__(self, folder: Path, *, name: str, version: int, version_id: int | None = None,
                 build_id: str | None = None) -> None:
        self.folder = Path(folder)
        self.name = name
        self.version = version
        self.version_id = version if version_id is None else version_id
        self.build_id = build_id

    @classmethod
    def open(cls, folder: Path, *, name: str, version: int, version_id: int | None = None,
             build_id: str | None = None) -> VersionFiles:
        """Read a version's files.

        Args:
            version: the number users see (in messages).
            version_id: the database's id of the version, which the manifest must name.
            build_id: the database's build id of the version; the manifest must carry the same
                (when it has one), so the files of one build are never paired with another's
                rows.

        Raises:
            StorageError: a file is missing, empty, truncated or unreadable, or the files
                disagree with each other, with the manifest or with the database's version.
        """
        files = cls(folder, name=name, version=version, version_id=version_id,
                    build_id=build_id)
        if not files.folder.is_dir():
            raise files._error(f"the folder of version {version} is missing from the data "
                               "directory", manifest=True)
        files.manifest = files._read_manifest()
        try:
            files.faiss_config = FaissConfig.from_json(files.manifest["faiss"])
        except (GradindexError, KeyError, TypeError, AttributeError) as exc:
            raise files._error(f"{MANIFEST_NAME} of version {version} has no valid FAISS "
                               f"settings ({type(exc).__name__}: {exc})", manifest=True) from exc
        files.vectors = files._read("vectors.npy", lambda p: np.load(p, mmap_mode="r"))
        files.ids = files._read("ids.npy", np.load)
        files.self_influence = None
        if (files.folder / "self_influence.npy").exists():
            files.self_influence = files._read("self_influence.npy",
                                               lambda p: np.load(p, mmap_mode="r"))
        # versions written before vectors were stored once name no file: index.faiss
        faiss_file = files.manifest["faiss"].get("file", "index.faiss")
        files.faiss = None if faiss_file is None else files._read(str(faiss_file), read_faiss)
        relative = files.manifest.get("relative") or {}
        files.relative_faiss = None
        if relative.get("file"):
            files.relative_faiss = files._read(str(relative["file"]), read_faiss)
        files._check_shapes()
        # After loading, so a truncated file is reported as truncated; this catches what loads
        # but changed after publishing (a vector rescaled in place, another build's file).
        files._check_checksums()
        return files

    @property
    def count(self) -> int:
        return int(self.vectors.shape[0])

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    # ------------------------------------------------------------------ reading

    def _error(self, problem: str, *, manifest: bool = False) -> StorageError:
        # `refinalize` starts from the version's manifest, so a version without a readable
        # one is built again (its staged gradients are reused).
        remedy = "`gradindex build`" if manifest else f"`gradindex refinalize {self.name}`"
        return StorageError(f"index {self.name!r}: {problem}; rebuild it with {remedy}")

    def _read_manifest(self) -> dict[str, Any]:
        what = f"{MANIFEST_NAME} of version {self.version}"
        path = self.folder / MANIFEST_NAME

        def bad(problem: str) -> StorageError:
            return self._error(f"{what} {problem}", manifest=True)

        if not path.is_file():
            raise bad("is missing")
        try:
            manifest = load_manifest(self.folder)
        except GradindexError as exc:
            cause = exc.__cause__
            if isinstance(cause, ValueError):
                raise bad(f"is not valid JSON ({cause})") from exc
            if isinstance(cause, OSError):
                raise bad(f"cannot be read ({cause.strerror or cause})") from exc
            # A newer format (the only other failure): rebuilding would not help, and the
            # message quotes the path, which is not shown.
            text = str(exc).replace(repr(str(path)), what)
            raise StorageError(f"index {self.name!r}: {text}") from exc
        except Exception as exc:  # noqa: BLE001 - JSON that is not a manifest at all
            raise bad(f"is not a manifest ({type(exc).__name__}: {exc})") from exc
        if not isinstance(manifest, dict):
            raise bad("is not a JSON object")
        if manifest.get("version", self.version_id) != self.version_id:
            raise bad(f"belongs to another version (id {manifest.get('version')})")
        if self.build_id and manifest.get("build_id") not in (None, self.build_id):
            raise bad("belongs to another build of this version (its build id differs from the "
                      "database's)")
        return manifest

    def _check_checksums(self) -> None:
        """Every file against the manifest's SHA-256 (none for manifests older than format 2)."""
        try:
            problems = checksum_problems(self.folder, self.manifest)
        except GradindexError as exc:
            raise self._error(f"{MANIFEST_NAME} of version {self.version}: {exc}",
                              manifest=True) from exc
        if problems:
            raise self._error(f"version {self.version} is damaged: {'; '.join(problems)}")

    def _read(self, file: str, load: Callable[[Path], T]) -> T:
        what = f"{file} of version {self.version}"
        path = self.folder / file
        if not path.is_file():
            raise self._error(f"{what} is missing")
        size = path.stat().st_size
        if size == 0:
            raise self._error(f"{what} is empty")
        if file.endswith(".npy"):
            problem = _npy_problem(path)
            if problem is not None:
                raise self._error(f"{what} {problem}")
        try:
            return load(path)
        except Exception as exc:  # noqa: BLE001 - numpy and FAISS raise many kinds
            # FAISS's messages quote the absolute path; say what it is instead.
            detail = ("FAISS cannot read it" if file.endswith(".faiss")
                      else f"{type(exc).__name__}: {exc}")
            raise self._error(f"{what} is truncated or corrupt ({detail})") from exc

    def _check_shapes(self) -> None:
        v = self.version
        if self.vectors.ndim != 2:
            raise self._error(f"vectors.npy of version {v} is not a matrix (shape "
                              f"{tuple(self.vectors.shape)})")
        dim = self.manifest.get("dim")
        if dim is not None and int(dim) != self.dim:
            raise self._error(f"vectors.npy of version {v} holds vectors of dim {self.dim}, "
                              f"its {MANIFEST_NAME} says {dim}")
        if self.ids.ndim != 1 or not np.issubdtype(self.ids.dtype, np.integer):
            raise self._error(f"ids.npy of version {v} is not a list of integer ids "
                              f"({self.ids.dtype}, shape {tuple(self.ids.shape)})")
        if self.self_influence is not None and self.self_influence.shape != (self.count,):
            raise self._error(f"self_influence.npy of version {v} holds shape "
                              f"{tuple(self.self_influence.shape)}, not ({self.count},)")

    # ------------------------------------------------------------------ consistency

    def check(self, sql_ids: np.ndarray, positions: np.ndarray) -> None:
        """Check that the FAISS ids, ``ids.npy`` and the version's SQL rows (their ids and
        positions, ordered by position) agree.

        Raises:
            StorageError: they do not; the index must be rebuilt (``gradindex refinalize``).
        """
        problem = None
        if len(self.ids) != self.count:
            problem = f"vectors.npy holds {self.count} vectors, ids.npy {len(self.ids)} ids"
        elif self.faiss is not None and int(self.faiss.ntotal) != self.count:
            problem = f"FAISS holds {self.faiss.ntotal} vectors, vectors.npy {self.count}"
        elif self.faiss is not None and not np.array_equal(faiss_ids(self.faiss), self.ids):
            problem = "FAISS ids differ from ids.npy"
        elif self.relative_faiss is not None and not (
            int(self.relative_faiss.ntotal) == self.count
            and np.array_equal(faiss_ids(self.relative_faiss), self.ids)
        ):
            problem = "the relative-influence FAISS ids differ from ids.npy"
        elif len(sql_ids) != self.count:
            problem = f"the database has {len(sql_ids)} rows, FAISS {self.count} vectors"
        elif not (np.array_equal(sql_ids, self.ids)
                  and np.array_equal(positions, np.arange(self.count))):
            problem = "FAISS ids differ from the database's example ids"
        if problem is not None:
            raise StorageError(
                f"index {self.name!r} version {self.version} is inconsistent: {problem}; "
                f"rebuild it with `gradindex refinalize {self.name}`"
            )
