"""Re-pointing a published index at its task, without a pass over the training data.

An index records its task in the data directory (:mod:`.assets`), so it rarely needs this. It
does when the index was built before tasks were recorded (its manifest names a task file or
weights by absolute path), or when its task is a module spec whose package moved or was
renamed. :func:`repair` records the task anew from a spec that loads now, checks that it makes
the same model (the weights' fingerprint) and the same vector layout, and rewrites the
manifest of the published version (and of its staged gradients, so a later ``refinalize``
keeps the repair) under a new build id, so that running servers reload it.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Mapping
from typing import Any

from sqlalchemy.orm import Session

from .config import CompressionConfig
from .errors import StorageError, TaskError
from .featurize import Featurizer
from .settings import Settings, check_name
from .stage import staging_root
from .staging import Staging
from .store import connect, current_version, load_manifest, save_manifest
from .store.manifest import MANIFEST_NAME
from .task import TaskSpec

__all__ = ["repair"]

log = logging.getLogger(__name__)


def repair(settings: Settings, name: str, *, task: str | None = None,
           task_args: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Record index ``name``'s task anew and point its published version at the record.

    Args:
        task: the spec that loads the task now (default: the spec the index recorded, for an
            index whose task file and weights are still where they were built from).
        task_args: constructor arguments that replace the recorded ones of the same name
            (e.g. ``{"weights": "new/place/model.safetensors"}``).

    Returns:
        ``{"name", "version", "task", "build_id"}`` of the repaired version.

    Raises:
        IndexNotFound: no such index, or it has no published version.
        TaskError: the task does not load, or it makes another model (other weights) or
            vectors of another layout than the index holds.
    """
    check_name(name)
    engine = connect(settings)
    with Session(engine) as session, session.begin():
        version = current_version(session=session, name=name)
        folder = settings.data_dir / version.path
        manifest = (load_manifest(folder) if (folder / MANIFEST_NAME).is_file()
                    else dict(version.manifest))
        old = manifest.get("task") or {}
        spec = task if task is not None else str(old.get("spec", ""))
        args = {**(old.get("args") or {}), **(task_args or {})}
        record = TaskSpec(spec, args).record(settings.data_dir)
        _check_same_model(name, manifest, TaskSpec.from_record(record, settings.data_dir))
        build_id = secrets.token_hex(16)
        manifest = {**manifest, "task": record, "build_id": build_id}
        if folder.is_dir():
            save_manifest(folder, manifest)
        staging = Staging(staging_root(settings, name) / str(manifest.get("staging_key", "")))
        if manifest.get("staging_key") and staging.exists():
            staging.save_info({**staging.info(), "task": record})
        version.manifest = manifest
        version.build_id = build_id
        number = int(version.number)
    log.info("index %r version %d now loads its task from %s", name, number, record["spec"])
    return {"name": name, "version": number, "task": record["spec"], "build_id": build_id}


def _check_same_model(name: str, manifest: Mapping[str, Any], spec: TaskSpec) -> None:
    """Refuse a task that would make other query vectors than the index's."""
    feat = Featurizer(spec.load(), CompressionConfig.from_json(manifest["compression"]),
                      device="cpu")
    expected = list(manifest.get("model_fingerprint") or [])
    if expected and feat.fingerprint() != expected:
        raise TaskError(f"the task {spec.spec!r} loads other model weights than index {name!r} "
                        "was built from; point --task-arg at the weights it was built with, or "
                        "rebuild the index")
    dim = manifest.get("dim")
    if dim is not None and feat.dim != int(dim):
        raise StorageError(f"the task {spec.spec!r} makes vectors of dim {feat.dim}, index "
                           f"{name!r} holds dim {dim}; it is not the task the index was built "
                           "from")
