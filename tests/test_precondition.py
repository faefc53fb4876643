"""The preconditioner against exact influence, and its streaming, storage and damping."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gradindex import (
    CompressionConfig,
    ExactInfluence,
    Featurizer,
    GradindexError,
    InMemoryIndex,
    PreconditionerConfig,
)
from gradindex.indexer.errors import ConfigError
from gradindex.indexer.precondition import (
    FLOAT32_MAX_CONDITION,
    FisherAccumulator,
    Preconditioner,
    self_influence,
)
from gradindex.indexer.tasks import DigitsTask

from .conftest import WEIGHT_DECAY

RTOL = 1e-3
VECTOR_RTOL = 1e-5
"""Float32 passes against float64 ones, on the whole matrix of vectors or scores."""


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("task_name", ["logreg_task", "mlp_task"])
def test_full_expected_fisher_reproduces_exact_gauss_newton(request, task_name: str) -> None:
    """keep=1, `full`, damping → 0: the index's scores are exact GGN influence."""
    task = request.getfixturevalue(task_name)
    train = [p for _, p in task.examples()][:300]
    index = InMemoryIndex.fit(
        task, CompressionConfig(keep=1.0),
        PreconditionerConfig(shape="full", fisher="expected", damping=1e-4),
        examples=list(task.examples())[:300], device="cpu")
    lam = index.preconditioner.lambdas[0]
    exact = ExactInfluence(task, train, curvature="ggn", damping=lam)
    torch.testing.assert_close(index.preconditioner.fishers[0], exact.curvature
                               - lam * torch.eye(exact.curvature.shape[0], dtype=torch.float64),
                               atol=1e-6, rtol=RTOL)
    queries = task.test_payloads(20)
    assert _rel(index.scores(queries), exact.scores(queries)) < RTOL
    assert _rel(index.self_influence, exact.self_influence()) < RTOL


def test_exact_hessian_equals_gauss_newton_for_a_linear_model(logreg_task) -> None:
    """Softmax regression is linear in θ, so its Hessian is its GGN: two code paths agree."""
    train = [p for _, p in logreg_task.examples()][:200]
    hess = ExactInfluence(logreg_task, train, curvature="hessian", l2=WEIGHT_DECAY)
    ggn = ExactInfluence(logreg_task, train, curvature="ggn", l2=WEIGHT_DECAY)
    torch.testing.assert_close(hess.curvature, ggn.curvature, atol=1e-8, rtol=1e-6)


def test_exact_hessian_differs_from_gauss_newton_for_an_mlp(mlp_task) -> None:
    train = [p for _, p in mlp_task.examples()][:100]
    hess = ExactInfluence(mlp_task, train, curvature="hessian", damping=1.0)
    ggn = ExactInfluence(mlp_task, train, curvature="ggn", damping=1.0)
    assert _rel(hess.curvature, ggn.curvature) > 1e-3
    with pytest.raises(GradindexError, match="not positive definite"):
        ExactInfluence(mlp_task, train, curvature="hessian")


def test_streaming_accumulation_does_not_depend_on_batch_size(mlp_task) -> None:
    pairs = list(mlp_task.examples())[:90]
    cfg = PreconditionerConfig(shape="block", fisher="expected")
    a = InMemoryIndex.fit(mlp_task, CompressionConfig(keep=0.3, batch_size=7), cfg,
                          examples=pairs, device="cpu")
    b = InMemoryIndex.fit(mlp_task, CompressionConfig(keep=0.3, batch_size=90), cfg,
                          examples=pairs, device="cpu")
    for fa, fb in zip(a.preconditioner.fishers, b.preconditioner.fishers, strict=True):
        # per-batch float32 sums: a few float32 roundings of the matrix's scale (measured
        # 3e-7 of its largest entry); a batch missed or counted twice would be 1e-2 and more
        assert float((fa - fb).abs().max()) <= 2e-6 * float(fb.abs().max())
    # float32 sums per batch: the Fishers differ by ~1e-7, which the inverse (condition ~900
    # here) amplifies on the smallest coordinates, so the bound is on the whole matrix
    assert _rel(a.vectors, b.vectors) < VECTOR_RTOL


def test_block_shape_has_one_matrix_per_layer_and_group(mlp_task) -> None:
    feat = Featurizer(mlp_task, CompressionConfig(keep=0.3, masks=3), device="cpu")
    block = FisherAccumulator(feat.blocks, "block")
    full = FisherAccumulator(feat.blocks, "full")
    assert len(block.ranges) == 3 * len(feat.layers)
    assert len(full.ranges) == 3
    assert FisherAccumulator(feat.blocks, "identity").ranges == []
    with pytest.raises(ConfigError, match="`shape`"):
        FisherAccumulator(feat.blocks, "diagonal")


def test_identity_shape_is_the_gradient_dot_product(mlp_task) -> None:
    pairs = list(mlp_task.examples())[:40]
    index = InMemoryIndex.fit(mlp_task, CompressionConfig(keep=0.5, masks=2),
                              PreconditionerConfig(shape="identity"), examples=pairs,
                              device="cpu")
    queries = mlp_task.test_payloads(5)
    expected = index.featurizer.raw(queries) @ index.raw.T / 2
    torch.testing.assert_close(index.scores(queries), expected, atol=1e-6, rtol=1e-5)


def test_masks_fold_into_the_mean_of_per_mask_scores(mlp_task) -> None:
    pairs = list(mlp_task.examples())[:60]
    queries = mlp_task.test_payloads(4)
    pcfg = PreconditionerConfig(shape="block", fisher="empirical")
    ensemble = InMemoryIndex.fit(mlp_task, CompressionConfig(keep=0.2, masks=3), pcfg,
                                 examples=pairs, device="cpu")
    per_mask = []
    for m, comp in enumerate(ensemble.featurizer.compressors[0]):
        feat = Featurizer(mlp_task, CompressionConfig(keep=0.2), device="cpu",
                          compressors=[[comp]])
        single = InMemoryIndex.fit(mlp_task, None, pcfg, featurizer=feat, examples=pairs)
        per_mask.append(single.scores(queries))
        assert m == comp.mask
    torch.testing.assert_close(ensemble.scores(queries), torch.stack(per_mask).mean(0),
                               atol=1e-5, rtol=1e-4)


def test_save_load_and_refit_with_another_damping(mlp_task, tmp_path: Path) -> None:
    pairs = list(mlp_task.examples())[:50]
    index = InMemoryIndex.fit(mlp_task, CompressionConfig(keep=0.3),
                              PreconditionerConfig(damping=0.1), examples=pairs,
                              device="cpu")
    path = tmp_path / "fisher.npz"
    index.preconditioner.save(path)
    loaded = Preconditioner.load(path)
    torch.testing.assert_close(loaded.apply(index.raw), index.vectors)
    redamped = index.with_damping(1.0)
    fresh = InMemoryIndex.fit(mlp_task, CompressionConfig(keep=0.3),
                              PreconditionerConfig(damping=1.0), examples=pairs,
                              device="cpu")
    torch.testing.assert_close(redamped.vectors, fresh.vectors, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(redamped.vectors, index.vectors)


def test_sampled_fisher_is_reproducible_and_converges_to_the_expected_one(mlp_task) -> None:
    """Monte-Carlo error shrinks like 1/√samples: the sampled Fisher is unbiased."""
    payloads = [p for _, p in mlp_task.examples()][:100]
    feat = Featurizer(mlp_task, CompressionConfig(keep=1.0), device="cpu")
    e = feat.fisher(payloads, "expected").double()
    expected = e.T @ e / len(payloads)
    errors = {}
    for samples in (16, 256):
        rows = feat.fisher(payloads, "sampled", samples=samples)
        assert torch.equal(rows, feat.fisher(payloads, "sampled", samples=samples))
        r = rows.double()
        errors[samples] = _rel(r.T @ r / len(payloads), expected)
    assert errors[256] < 0.15
    assert errors[16] / errors[256] > 2.5  # 4 in expectation


def test_damping_must_be_finite() -> None:
    with pytest.raises(ConfigError, match="`damping`"):
        PreconditionerConfig(damping=float("nan"))
    with pytest.raises(ConfigError, match="`fisher`"):
        PreconditionerConfig(fisher="true")


def _solve64(precond: Preconditioner, raw: torch.Tensor) -> torch.Tensor:
    """The float64 reference: ``(F̃+λI)⁻¹ g̃`` by Cholesky solves on the float64 factors."""
    out = raw.to(torch.float64, copy=True)
    for factor, (lo, hi) in zip(precond.factors, precond.ranges, strict=True):
        out[:, lo:hi] = torch.cholesky_solve(out[:, lo:hi].T.contiguous(), factor).T
    return out


@pytest.fixture(scope="module")
def digits_mlp() -> DigitsTask:
    return DigitsTask("mlp", train_size=300, hidden=16, weight_decay=WEIGHT_DECAY)


@pytest.fixture(scope="module")
def fitted_mlp(digits_mlp: DigitsTask) -> InMemoryIndex:
    task = digits_mlp
    return InMemoryIndex.fit(task, CompressionConfig(keep=0.5, masks=2),
                             PreconditionerConfig(shape="block", fisher="expected"),
                             examples=list(task.examples())[:200], device="cpu")


def test_float32_fisher_sums_match_float64_ones(fitted_mlp: InMemoryIndex) -> None:
    """Staged (float32) rows summed by float32 GEMMs into float64 totals, against float64."""
    rows = fitted_mlp.raw
    f32 = FisherAccumulator(fitted_mlp.featurizer.blocks, "block")
    f64 = FisherAccumulator(fitted_mlp.featurizer.blocks, "block")
    for lo in range(0, len(rows), 64):
        f32.update(rows[lo : lo + 64], len(rows[lo : lo + 64]))
        f64.update(rows[lo : lo + 64].double(), len(rows[lo : lo + 64]))
    assert f32.count == f64.count == len(rows)
    for a, b in zip(f32.sums, f64.sums, strict=True):
        assert a.dtype == torch.float64
        assert _rel(a, b) < 1e-6


def test_float32_vectors_and_scores_match_float64_solves(
    fitted_mlp: InMemoryIndex, digits_mlp: DigitsTask
) -> None:
    """The default damping takes the float32 GEMM with the inverse; its vectors, scores and
    self-influence agree with float64 Cholesky solves."""
    precond = fitted_mlp.preconditioner
    assert all(inv is not None for inv in precond.inverses())
    exact = _solve64(precond, fitted_mlp.raw)
    vectors = precond.apply(fitted_mlp.raw)
    assert vectors.dtype == torch.float32
    assert _rel(vectors, exact) < VECTOR_RTOL
    queries = fitted_mlp.queries(digits_mlp.test_payloads(20))
    assert _rel(queries @ vectors.T, queries.double() @ exact.T) < VECTOR_RTOL
    groups = fitted_mlp.featurizer.groups
    exact_si = (fitted_mlp.raw.double() * exact).sum(dim=1) / groups
    assert _rel(self_influence(fitted_mlp.raw, vectors, 1.0 / groups), exact_si) < VECTOR_RTOL


def test_ill_conditioned_blocks_are_solved_in_float64(fitted_mlp: InMemoryIndex) -> None:
    """A damping so small that the condition bound passes FLOAT32_MAX_CONDITION: no float32
    inverse, and the vectors are the float64 solves rounded to float32."""
    precond = fitted_mlp.preconditioner.with_damping(1e-7)
    assert min(precond.conditions) > FLOAT32_MAX_CONDITION
    assert precond.inverses() == [None] * len(precond.ranges)
    vectors = precond.apply(fitted_mlp.raw)
    torch.testing.assert_close(vectors, _solve64(precond, fitted_mlp.raw).float())


def test_condition_bound_is_an_upper_bound(fitted_mlp: InMemoryIndex) -> None:
    precond = fitted_mlp.preconditioner
    for fisher, lam, bound in zip(precond.fishers, precond.lambdas, precond.conditions,
                                  strict=True):
        eig = torch.linalg.eigvalsh(fisher)
        assert (eig.max() + lam) / (eig.min() + lam) <= bound * (1 + 1e-9)


def test_apply_into_a_given_buffer_equals_a_fresh_one(fitted_mlp: InMemoryIndex) -> None:
    """Into a reused buffer (finalize's windows) the same vectors; columns outside every block
    pass through unchanged."""
    precond = fitted_mlp.preconditioner
    raw = fitted_mlp.raw[:37]
    fresh = precond.apply(raw)
    buffer = torch.full((64, precond.dim), float("nan"))
    torch.testing.assert_close(precond.apply(raw, out=buffer[:37]), fresh, rtol=0, atol=0)
    assert torch.isnan(buffer[37:]).all()
    with pytest.raises(GradindexError, match="an output of"):
        precond.apply(raw, out=buffer[:36])
    lo, hi = precond.ranges[0]
    partial = Preconditioner(precond.shape, precond.dim, [(lo, hi)], [precond.fishers[0]],
                             precond.damping, precond.count)
    got = partial.apply(raw, out=torch.full((37, precond.dim), float("nan")))
    torch.testing.assert_close(got[:, hi:], raw[:, hi:].float(), rtol=0, atol=0)
    torch.testing.assert_close(got[:, lo:hi], fresh[:, lo:hi], rtol=0, atol=0)
