"""The demo index: a digits classifier trained here, saved as safetensors, then indexed.

Everything comes from scikit-learn's bundled digits: nothing is downloaded. Running it again
reuses the saved weights and the published index.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from .admin import list_indexes
from .build import BuildConfig, BuildProgressFn, build
from .config import PreconditionerConfig
from .settings import Settings, check_name
from .store.files import fsync_file

__all__ = ["DEMO_TASK", "prepare_demo"]

log = logging.getLogger(__name__)

DEMO_TASK = "gradindex.indexer.tasks:DigitsTask"
"""The task the demo index is built from."""

DEMO_HIDDEN = 32

DEMO_FISHER_BUDGET = 800
"""Fisher rows of the demo index: the top direction of 800 of its 1,000 examples, completed
by the others' gradients, so its staging (raw gradients and Fisher rows) stays under twice its
published vectors; the default budget (8,192 rows) would stage 8× more rows than vectors."""


def demo_weights(settings: Settings) -> Path:
    """Where the demo classifier's weights live: ``models/`` in the data directory."""
    return settings.data_dir / "models" / f"digits-mlp{DEMO_HIDDEN}.safetensors"


def _train_and_save(path: Path) -> None:
    from safetensors.torch import save_file

    from .tasks import DigitsTask

    model = DigitsTask("mlp", hidden=DEMO_HIDDEN).model()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
    fsync_file(tmp)
    os.replace(tmp, path)  # a killed demo never leaves half a weights file
    log.info("trained the digits classifier; weights in %s", path)


def prepare_demo(
    settings: Settings, *, name: str = "digits", progress: BuildProgressFn | None = None
) -> bool:
    """Train the digits classifier and build its index, unless both exist already.

    Returns:
        Whether an index was built (False: the published one was reused).
    """
    check_name(name)
    weights = demo_weights(settings)
    if not weights.is_file():
        _train_and_save(weights)
    if any(row["name"] == name for row in list_indexes(settings)):
        log.info("index %r is already published; reusing it", name)
        return False
    config = BuildConfig(
        name=name,
        task=DEMO_TASK,
        task_args={"model": "mlp", "hidden": DEMO_HIDDEN, "weights": str(weights)},
        preconditioner=PreconditionerConfig(fisher_budget=DEMO_FISHER_BUDGET),
    )
    build(config, settings, progress=progress)
    return True
