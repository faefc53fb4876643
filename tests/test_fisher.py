"""The default Fisher: ``auto`` resolved by what the task offers, fitted on a bounded subset that
every shard, process and resumed build agrees on; indexes of the older format still serve."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from typing import Any

import numpy as np
import pytest
import torch
from sqlalchemy.orm import Session
from torch import nn

from gradindex import (
    BuildConfig,
    CompressionConfig,
    Featurizer,
    InMemoryIndex,
    PreconditionerConfig,
    Settings,
    build,
    open_index,
    refinalize,
)
from gradindex.indexer.build import finalize, stage
from gradindex.indexer.build_config import BuildHooks
from gradindex.indexer.config import AUTO_MAX_CLASSES, MAX_SAMPLES
from gradindex.indexer.featurize import expected_cotangents
from gradindex.indexer.fisher import FisherPlan, fisher_subset
from gradindex.indexer.precondition import Preconditioner
from gradindex.indexer.store import IndexVersion, connect, current_version, load_manifest
from gradindex.indexer.tasks import DigitsTask

from .conftest import STORE_TASK, STORE_TASK_ARGS
from .factories import SequenceTask

ATOL = 1e-6
RTOL = 1e-5
"""Batched against one-backward-per-row Fisher rows: float32 rounding of the same sums."""
BATCH = 16
BUDGET = 200
"""Fisher rows of the bounded builds: 200 of the 300 examples × their top direction."""
SUBSET = 200


class NoLogits:
    """A digits task that defines only the required methods; its loss samples."""

    def __init__(self, inner: DigitsTask) -> None:
        self.inner = inner

    def model(self) -> nn.Module:
        return self.inner.model()

    def examples(self) -> Any:
        return self.inner.examples()

    def collate(self, payloads: list[dict[str, Any]]) -> Any:
        return self.inner.collate(payloads)

    def loss(self, model: nn.Module, batch: Any, sample: bool = False) -> torch.Tensor:
        return self.inner.loss(model, batch, sample=sample)


class IgnoresSample(NoLogits):
    """Accepts ``sample`` and ignores it: the true-target loss either way."""

    def loss(self, model: nn.Module, batch: Any, sample: bool = False) -> torch.Tensor:
        return self.inner.loss(model, batch)


class NoSampleArgument(NoLogits):
    """The loss takes no ``sample`` at all."""

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:  # type: ignore[override]
        return self.inner.loss(model, batch)


class HugeVocabulary(NoLogits):
    """Logits over more classes than ``auto`` spends a row on each (a language model's)."""

    def logits(self, model: nn.Module, batch: Any) -> torch.Tensor:
        out = self.inner.logits(model, batch)
        return torch.cat([out, out.new_full((len(out), AUTO_MAX_CLASSES), -30.0)], dim=1)


@pytest.fixture(scope="module")
def digits() -> DigitsTask:
    return DigitsTask(**STORE_TASK_ARGS)


@pytest.mark.parametrize("wrap,kind", [
    (lambda t: t, "expected"),
    (NoLogits, "sampled"),
    (HugeVocabulary, "sampled"),
    (IgnoresSample, "empirical"),
    (NoSampleArgument, "empirical"),
])
def test_auto_resolves_to_the_best_fisher_the_task_offers(
    digits: DigitsTask, wrap: Any, kind: str, caplog: pytest.LogCaptureFixture,
) -> None:
    feat = Featurizer(wrap(digits), CompressionConfig(batch_size=BATCH), device="cpu")
    payloads = [p for _, p in list(digits.examples())[:BATCH]]
    plan = feat.plan_fisher(PreconditionerConfig(), payloads, 300)
    assert plan.kind == kind and plan.requested == "auto"
    line = plan.describe()
    if kind == "expected":
        assert plan.classes == 10 and plan.subset == 300 and "10 classes" in line
    elif kind == "sampled":
        # a small training set spends the budget on more samples per example
        budget = PreconditionerConfig().fisher_budget
        assert budget is not None
        assert plan.subset == 300 and plan.samples == min(MAX_SAMPLES, budget // 300) > 1
        assert ("more than 1024" if wrap is HugeVocabulary else "add it") in line
    else:
        assert "add it for the expected Fisher" in line and plan.rows == 300
    # the random state a task's sampling probe used is restored
    before = torch.random.get_rng_state()
    Featurizer(wrap(digits), device="cpu").plan_fisher(PreconditionerConfig(), payloads, 300)
    assert torch.equal(before, torch.random.get_rng_state())


def test_budget_spends_rows_on_a_subset_of_a_large_training_set(digits: DigitsTask) -> None:
    feat = Featurizer(digits, CompressionConfig(batch_size=BATCH), device="cpu")
    payloads = [p for _, p in list(digits.examples())[:BATCH]]
    plan = feat.plan_fisher(PreconditionerConfig(fisher_budget=BUDGET), payloads, 300)
    assert (plan.kind, plan.subset, plan.rank, plan.rows) == ("expected", SUBSET, 1, 200)
    members = plan.members()
    assert members is not None and members.sum() == SUBSET
    # a budget of a few rows per example: that many top directions on every example
    three = feat.plan_fisher(PreconditionerConfig(fisher_budget=1000), payloads, 300)
    assert (three.subset, three.rank, three.rows, three.members()) == (300, 3, 900, None)
    assert "top 3 of 10" in three.describe()
    # C rows per example: one per class, exact
    exact = feat.plan_fisher(PreconditionerConfig(fisher_budget=3000), payloads, 300)
    assert (exact.rank, exact.rows_per_example, exact.subset) == (None, 10, 300)
    sampled = Featurizer(NoLogits(digits), feat.config, device="cpu").plan_fisher(
        PreconditionerConfig(fisher_budget=BUDGET), payloads, 300)
    assert (sampled.kind, sampled.samples, sampled.subset) == ("sampled", 1, 200)
    with pytest.raises(Exception, match="defines no logits"):
        Featurizer(NoLogits(digits), feat.config, device="cpu").plan_fisher(
            PreconditionerConfig(fisher="expected"), payloads, 300)


class CountsPasses(DigitsTask):
    """Counts the passes a build makes over its examples."""

    passes = 0

    def examples(self) -> Any:
        type(self).passes += 1
        return super().examples()


def test_a_sized_task_is_staged_in_one_pass_over_its_examples(settings: Settings) -> None:
    """The budget plans over ``len(task)``: an array task's payloads are built once."""
    task = CountsPasses(**STORE_TASK_ARGS)
    assert len(task) == 300
    CountsPasses.passes = 0
    stage(_config("once"), settings, featurizer=Featurizer(task, CompressionConfig(
        batch_size=BATCH), device="cpu"))
    assert CountsPasses.passes == 1


def test_fisher_subset_is_the_same_in_another_process() -> None:
    here = fisher_subset(seed=3, examples=5000, size=123)
    code = ("from gradindex.indexer.fisher import fisher_subset; "
            "print(','.join(map(str, fisher_subset(seed=3, examples=5000, size=123)"
            ".nonzero()[0])))")
    there = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           check=True).stdout.strip()
    assert there == ",".join(map(str, here.nonzero()[0])) and here.sum() == 123
    assert not np.array_equal(here, fisher_subset(seed=4, examples=5000, size=123))


def _config(name: str, **kwargs: Any) -> BuildConfig:
    base: dict[str, Any] = {
        "name": name, "task": STORE_TASK, "task_args": dict(STORE_TASK_ARGS),
        "compression": CompressionConfig(batch_size=BATCH),
        "preconditioner": PreconditionerConfig(fisher_budget=BUDGET), "chunk_size": 32,
        "window": 64,
    }
    base.update(kwargs)
    return BuildConfig(**base)


def _published(settings: Settings, name: str) -> tuple[np.ndarray, Preconditioner, dict]:
    with Session(connect(settings)) as session:
        version = current_version(session=session, name=name)
    folder = settings.data_dir / version.path
    vectors = np.load(folder / "vectors.npy")
    return vectors, Preconditioner.load(folder / "precond.npz"), load_manifest(folder)


def _staged_fisher_positions(settings: Settings, name: str) -> list[int]:
    root = settings.index_dir(name) / "staging"
    found = []
    for chunk in root.glob("*/chunks/s*"):
        found += np.load(chunk / "fisher_positions.npy").tolist()
    return sorted(found)


class KillAfterFirstChunk(BuildHooks):
    def after_chunk(self, chunks: int) -> None:
        raise KeyboardInterrupt("killed")


@pytest.mark.parametrize("backend", ["sqlite"], indirect=False)
def test_fisher_subset_is_identical_across_shards_and_a_resumed_build(
    settings: Settings, digits: DigitsTask, caplog: pytest.LogCaptureFixture,
) -> None:
    feat = Featurizer(digits, CompressionConfig(batch_size=BATCH), device="cpu")
    with caplog.at_level(logging.INFO, logger="gradindex"):
        build(_config("one"), settings, featurizer=feat)
    assert "Fisher: expected (the task's logits give 10 classes)" in caplog.text
    vectors, precond, manifest = _published(settings, "one")
    assert manifest["preconditioner"]["fisher"] == "expected"
    assert manifest["fisher"]["requested"] == "auto" and manifest["fisher"]["subset"] == SUBSET
    assert manifest["fisher"]["rank"] == 1
    members = fisher_subset(seed=0, examples=300, size=SUBSET).nonzero()[0].tolist()
    assert _staged_fisher_positions(settings, "one") == members

    for shard in (1, 0):  # shards in any order
        stage(_config("two", shard=shard, shards=2), settings, featurizer=feat)
    finalize(settings, "two")
    two, precond_two, _ = _published(settings, "two")
    assert _staged_fisher_positions(settings, "two") == members
    for a, b in zip(precond.fishers, precond_two.fishers, strict=True):
        assert torch.equal(a, b)
    np.testing.assert_array_equal(vectors, two)

    with pytest.raises(KeyboardInterrupt):
        build(_config("resumed"), settings, featurizer=feat, hooks=KillAfterFirstChunk())
    build(_config("resumed"), settings, featurizer=feat)
    resumed, _, _ = _published(settings, "resumed")
    assert _staged_fisher_positions(settings, "resumed") == members
    np.testing.assert_array_equal(vectors, resumed)

    # the in-memory index fits the same Fisher on the same subset
    memory = InMemoryIndex.fit(digits, feat.config, PreconditionerConfig(fisher_budget=BUDGET),
                               featurizer=feat)
    for a, b in zip(precond.fishers, memory.preconditioner.fishers, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-9)


def _downgrade(settings: Settings, name: str) -> None:
    """Rewrite an index's manifest and staging settings as gradindex wrote them before the
    Fisher was planned: no ``fisher`` entry, no budget, ``samples`` 4."""
    engine = connect(settings)
    with Session(engine) as session:
        version = current_version(session=session, name=name)
        path = settings.data_dir / version.path / "manifest.json"
        data = json.loads(path.read_text())
        data.pop("fisher")
        data["preconditioner"].pop("fisher_budget")
        data["preconditioner"]["samples"] = 4
        path.write_text(json.dumps(data))
        row = session.get(IndexVersion, version.id)
        assert row is not None
        row.manifest = data
        session.commit()
    for info_path in (settings.index_dir(name) / "staging").glob("*/staging.json"):
        info = json.loads(info_path.read_text())
        info["fisher"] = {"kind": "empirical", "samples": None}
        info_path.write_text(json.dumps(info))
    for settings_path in (settings.index_dir(name) / "staging").glob("*/build.json"):
        saved = json.loads(settings_path.read_text())
        saved["preconditioner"].pop("fisher_budget")
        saved["preconditioner"]["samples"] = 4
        settings_path.write_text(json.dumps(saved))


@pytest.mark.parametrize("backend", ["sqlite"], indirect=False)
def test_an_index_of_the_old_format_still_serves_and_refinalizes(
    settings: Settings, digits: DigitsTask,
) -> None:
    feat = Featurizer(digits, CompressionConfig(batch_size=BATCH), device="cpu")
    old = PreconditionerConfig(fisher="empirical", fisher_budget=None)
    build(_config("old", preconditioner=old), settings, featurizer=feat)
    _downgrade(settings, "old")
    queries = feat.query(digits.test_payloads(4))
    reference = InMemoryIndex.fit(digits, feat.config, old, featurizer=feat)
    hits = open_index("old", settings).search(queries, 5)
    ref = (queries @ reference.vectors.T).numpy()
    for q, row in enumerate(hits):
        assert row[0].external_id == reference.ids[int(np.argmax(ref[q]))]
    manifest = open_index("old", settings).manifest
    assert "fisher" not in manifest and manifest["preconditioner"]["fisher"] == "empirical"
    refinalize(settings, "old", damping=0.3)
    fresh = open_index("old", settings)
    assert fresh.manifest["preconditioner"]["damping"] == 0.3
    assert fresh.manifest["fisher"]["kind"] == "empirical"
    assert fresh.manifest["preconditioner"]["fisher_budget"] is None
    ref3 = (queries @ reference.with_damping(0.3).vectors.T).numpy()
    for q, row in enumerate(fresh.search(queries, 5)):
        assert row[0].external_id == reference.ids[int(np.argmax(ref3[q]))]


@pytest.mark.parametrize("compressor", ["factorized-dropout", "dropout-sjlt", "dropout",
                                        "gaussian"])
@pytest.mark.parametrize("rank", [None, 3])
@pytest.mark.parametrize("make", [lambda: DigitsTask("mlp", train_size=80, hidden=16),
                                  SequenceTask], ids=["mlp", "tokens"])
def test_batched_fisher_rows_equal_one_backward_per_row(
    make: Any, compressor: str, rank: int | None,
) -> None:
    """One batched backward (hooks) or one vmapped vjp (full gradients) for every row gives
    the rows one backward per row gave, in the same order, for every mask; per class or the
    top directions, one token or several."""
    task = make()
    payloads = [p for _, p in list(task.examples())[:12]]
    feat = Featurizer(task, CompressionConfig(compressor=compressor, keep=0.4, masks=2),
                      device="cpu")
    batched = feat.fisher(payloads, "expected", rank=rank)
    reference = feat.fisher(payloads, "expected", rank=rank, reference=True)
    classes = 10 if isinstance(task, DigitsTask) else 3
    per = min(rank or classes, classes)
    assert batched.shape == reference.shape == (per * len(payloads), feat.dim)
    torch.testing.assert_close(batched, reference, atol=ATOL, rtol=RTOL)
    plan = FisherPlan(kind="expected", requested="expected", examples=None, subset=None,
                      samples=None, classes=classes, budget=None, rank=rank)
    per_example = feat.fisher_rows(payloads, plan)  # [B, R, dim]
    torch.testing.assert_close(per_example[3], reference[3 :: len(payloads)], atol=ATOL,
                               rtol=RTOL)


def test_top_directions_approach_the_expected_fisher_and_all_but_one_are_exact(
    digits: DigitsTask,
) -> None:
    """``C - 1`` top directions of ``diag(p) - p pᵀ`` give the expected Fisher exactly (its
    rank is ``C - 1``); fewer give a smaller part of it, more with each direction."""
    payloads = [p for _, p in list(digits.examples())[:24]]
    feat = Featurizer(digits, CompressionConfig(keep=1.0), device="cpu")
    exact = feat.fisher(payloads, "expected").double()
    target = exact.T @ exact
    errors = []
    for rank in (1, 2, 4, 9):
        rows = feat.fisher(payloads, "expected", rank=rank).double()
        assert rows.shape[0] == rank * len(payloads)
        errors.append(float(torch.linalg.norm(rows.T @ rows - target) /
                            torch.linalg.norm(target)))
    assert errors[0] > errors[1] > errors[2] > 0.01 and errors[3] < 1e-5
    logits = torch.randn(5, 7)
    p = torch.softmax(logits, -1)
    h = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    for rank in (None, 6):
        v = expected_cotangents(logits, rank=rank)
        torch.testing.assert_close(torch.einsum("rbi,rbj->bij", v, v), h, atol=1e-6, rtol=0)


def test_a_batchs_fisher_rows_reuse_its_collation_and_no_other(digits: DigitsTask) -> None:
    """Rows right after the same payloads' vectors reuse their batch; other payloads (even
    equal ones, or a list changed in place) are collated afresh."""
    payloads = [p for _, p in list(digits.examples())[:BATCH]]
    others = [p for _, p in list(digits.examples())[BATCH : 2 * BATCH]]
    fresh = Featurizer(digits, CompressionConfig(batch_size=BATCH), device="cpu")
    want = fresh.fisher(others, "expected", rank=2)
    feat = Featurizer(digits, CompressionConfig(batch_size=BATCH), device="cpu")
    feat.raw(payloads)
    batch = feat._collated(payloads)
    assert feat._collated(payloads) is batch and feat._collated(list(payloads)) is batch
    torch.testing.assert_close(feat.fisher(others, "expected", rank=2), want)
    changed = list(payloads)
    feat.raw(changed)
    changed[0] = others[0]
    assert feat._collated(changed) is not batch
    torch.testing.assert_close(feat.raw(changed)[0], fresh.raw(others[:1])[0], atol=ATOL,
                               rtol=RTOL)
