"""The device path: the same vectors on cuda as on cpu (skipped where no GPU is present)."""

from __future__ import annotations

import pytest
import torch

from gradindex import CompressionConfig, Featurizer

from .factories import SequenceTask

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")

ATOL = 1e-4
RTOL = 1e-3


@pytest.mark.parametrize("compressor", ["factorized-dropout", "dropout", "dropout-sjlt",
                                        "gaussian"])
def test_cuda_vectors_equal_cpu_vectors(compressor: str) -> None:
    payloads = [p for _, p in SequenceTask().examples()][:8]
    cfg = CompressionConfig(compressor=compressor, keep=0.3, masks=2)
    cpu = Featurizer(SequenceTask(), cfg, device="cpu").raw(payloads)
    gpu_feat = Featurizer(SequenceTask(), cfg, device="cuda")
    assert next(gpu_feat.models[0].parameters()).is_cuda
    torch.testing.assert_close(gpu_feat.raw(payloads), cpu, atol=ATOL, rtol=RTOL)


def test_cuda_fisher_kinds_run(mlp_task) -> None:
    payloads = [p for _, p in mlp_task.examples()][:16]
    feat = Featurizer(mlp_task, CompressionConfig(keep=0.5), device="cuda")
    for kind in ("empirical", "sampled", "expected"):
        rows = feat.fisher(payloads, kind, samples=2)
        assert rows.isfinite().all() and rows.shape[1] == feat.dim
