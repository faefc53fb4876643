"""The query side of a published index: its featurizer, rebuilt from the manifest and checked.

A query vector must come from the same task, weights, masks and loss as the index's vectors
(DESIGN §4, one code path). :func:`featurizer_for` rebuilds that featurizer from what the
manifest records and refuses one that would make other vectors: weights whose fingerprint
differs from the build's, or a vector layout of another dimension. The server builds one per
model and hands it to a device worker; scripts and tests call :func:`query_vectors`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .config import CompressionConfig
from .errors import GradindexError, StorageError, TaskError
from .featurize import Featurizer
from .reader import Index
from .task import TaskSpec

__all__ = ["featurizer_for", "query_vectors"]


def featurizer_for(index: Index, *, device: str | None = None) -> Featurizer:
    """The featurizer that makes query vectors for an open index version.

    Its task loads from what the build recorded in the data directory (the copied task file
    and weights, :mod:`gradindex.indexer.assets`), so this works from any working directory.

    Args:
        index: the open version (:func:`gradindex.indexer.reader.open_index`).
        device: where it computes gradients (default: cuda when available, else cpu).

    Raises:
        TaskError: the task cannot be loaded or its model built (the original error is
            chained).
        StorageError: the task now loads other weights than the index was built from, or its
            vectors would have another dimension.
    """
    return _featurizer(index.manifest, index.settings.data_dir, device=device, dim=index.dim)


def _featurizer(manifest: Mapping[str, Any], data_dir: Path, *, device: str | None,
                dim: int | None) -> Featurizer:
    name = manifest.get("name", "?")
    try:
        spec = manifest["task"]
        task = TaskSpec.from_record(spec, data_dir).load()
        compression = CompressionConfig.from_json(manifest["compression"])
    except GradindexError:
        raise
    except Exception as exc:  # noqa: BLE001 - a user's task may raise anything
        raise TaskError(f"the task of index {name!r} cannot be loaded: "
                        f"{type(exc).__name__}: {exc}") from exc
    try:
        feat = Featurizer(task, compression, device=device)
    except GradindexError:
        raise
    except Exception as exc:  # noqa: BLE001 - model() loads the user's weights
        raise TaskError(f"the model of index {name!r} cannot be built: "
                        f"{type(exc).__name__}: {exc}") from exc
    expected = manifest.get("model_fingerprint") or []
    if expected and feat.fingerprint() != list(expected):
        raise StorageError(
            f"index {name!r} was built from other model weights than the task now loads; "
            "rebuild the index or restore the weights"
        )
    want = manifest.get("dim") if dim is None else dim
    if want is not None and feat.dim != int(want):
        raise StorageError(
            f"index {name!r} holds vectors of dim {want}, the featurizer makes {feat.dim}"
        )
    return feat


def query_vectors(featurizer: Featurizer, payloads: Sequence[dict[str, Any]]) -> torch.Tensor:
    """Query vectors ``[Q, dim]`` of test payloads, in batches of the build's batch size.

    Raises:
        TaskError: the task rejected a payload, or its loss was not finite.
    """
    bs = featurizer.config.batch_size
    return torch.cat([featurizer.query(list(payloads[lo : lo + bs]))
                      for lo in range(0, len(payloads), bs)])
