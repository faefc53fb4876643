"""The build pipeline: featurize → staging → finalize → publish (DESIGN §2).

``stage`` (:mod:`.stage`) streams the task's examples in batches and writes raw compressed
gradients (and, for the ``sampled``/``expected`` Fisher, the Fisher rows) to staging chunks; it
resumes where a killed run stopped and splits across shards. ``finalize`` (:mod:`.finalize`)
streams the staged chunks twice, once to fit the preconditioner and once to write
preconditioned vectors, SQL rows and the FAISS file into a new version folder, then publishes
that version in one transaction. ``build`` runs both for a one-shard build.
"""

from __future__ import annotations

import logging

from .build_config import (
    BuildConfig,
    BuildHooks,
    BuildProgressFn,
    FinalizePoint,
    parse_shard,
    shard_from_env,
)
from .featurize import Featurizer
from .finalize import finalize, find_staging, refinalize
from .settings import Settings
from .stage import stage

__all__ = [
    "BuildConfig",
    "BuildHooks",
    "BuildProgressFn",
    "FinalizePoint",
    "build",
    "finalize",
    "find_staging",
    "parse_shard",
    "refinalize",
    "shard_from_env",
    "stage",
]

log = logging.getLogger(__name__)


def build(
    config: BuildConfig,
    settings: Settings,
    *,
    progress: BuildProgressFn | None = None,
    featurizer: Featurizer | None = None,
    hooks: BuildHooks | None = None,
) -> int | None:
    """Stage this shard; with one shard, finalize and publish too.

    Args:
        config: what to index, how, and which shard.
        settings: where the data directory and the database are.
        progress: called with ``(phase, done, total)``.
        featurizer: a featurizer of ``config``'s task to reuse (default: load the task).
        hooks: called at the named points of a build (default: none).

    Returns:
        The published version's number (1, 2, 3, ... within the index), or ``None`` when
        this was one shard of several.
    """
    staging = stage(config, settings, progress=progress, featurizer=featurizer, hooks=hooks)
    if config.shards > 1:
        missing = staging.missing()
        log.info(
            "shard %d/%d of index %r staged; %s", config.shard, config.shards, config.name,
            "all shards are staged: run `gradindex finalize " + config.name + "`"
            if missing == 0 else "waiting for the other shards",
        )
        return None
    return finalize(settings, config.name, staging=staging, preconditioner=config.preconditioner,
                    faiss=config.faiss, window=config.window, progress=progress, hooks=hooks,
                    store=config.store)
