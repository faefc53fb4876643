"""Compressors against references: the factorized path against flat masks of full gradients,
keep=1 against exact per-example gradients, and masks that every process draws alike."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest
import torch

from gradindex import CompressionConfig, ExactInfluence, Featurizer
from gradindex.indexer.compress import (
    DropoutCompressor,
    FactorizedDropoutCompressor,
    GaussianCompressor,
)
from gradindex.indexer.errors import ConfigError
from gradindex.indexer.masks import split_keep

from .factories import SequenceTask

ATOL = 1e-5
RTOL = 1e-4


def _fact(**settings: Any) -> CompressionConfig:
    """Settings of the factorized compressor, pinned where a test is about it (the default is
    `dropout-sjlt`)."""
    return CompressionConfig(compressor="factorized-dropout", **settings)


def _factorized_and_flat(task, keep: float, masks: int = 1):
    """A factorized featurizer and a flat-dropout one restricted to the same coordinates."""
    fact = Featurizer(task, _fact(keep=keep, masks=masks), device="cpu")
    flats = [
        [
            DropoutCompressor(
                fact.layers, fact.keep, fact.config, checkpoint=c, mask=m,
                coordinates={ly.name: comp.coordinates(ly.name) for ly in fact.layers},
            )
            for m, comp in enumerate(row)
        ]
        for c, row in enumerate(fact.compressors)
    ]
    flat = Featurizer(task, CompressionConfig(compressor="dropout", keep=keep, masks=masks),
                      device="cpu", compressors=flats)
    return fact, flat


@pytest.mark.parametrize("keep", [1.0, 0.3, 0.05])
@pytest.mark.parametrize("masks", [1, 3])
def test_factorized_equals_flat_mask_on_tokens(keep: float, masks: int) -> None:
    """[B, T, D] inputs, bias included, a layer called twice: hooks agree with torch.func."""
    task = SequenceTask()
    payloads = [p for _, p in task.examples()][:7]
    fact, flat = _factorized_and_flat(task, keep, masks)
    assert fact.dim == flat.dim
    torch.testing.assert_close(fact.raw(payloads), flat.raw(payloads), atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("keep", [1.0, 0.25])
def test_factorized_equals_flat_mask_on_vectors(mlp_task, keep: float) -> None:
    """[B, D] inputs, bias included."""
    payloads = [p for _, p in mlp_task.examples()][:9]
    fact, flat = _factorized_and_flat(mlp_task, keep)
    torch.testing.assert_close(fact.raw(payloads), flat.raw(payloads), atol=ATOL, rtol=RTOL)


def test_bias_column_is_drawn_like_any_input(mlp_task) -> None:
    """The bias column is neither forced in nor out: over many masks it is sometimes kept."""
    fact = Featurizer(mlp_task, _fact(keep=0.1, masks=40), device="cpu")
    first = fact.layers[0]
    kept = [bool((comp.cols[first.name] == first.d_in).any()) for comp in fact.compressors[0]]
    assert 0 < sum(kept) < len(kept)


@pytest.mark.parametrize("compressor", ["factorized-dropout", "dropout"])
def test_keep_one_gives_exact_per_example_gradients(logreg_task, compressor: str) -> None:
    payloads = [p for _, p in logreg_task.examples()][:12]
    feat = Featurizer(logreg_task, CompressionConfig(compressor=compressor, keep=1.0),
                      device="cpu")
    exact = ExactInfluence(logreg_task, payloads, curvature="ggn", damping=1.0)
    got = feat.raw(payloads).double()
    torch.testing.assert_close(got, exact.train_grads, atol=ATOL, rtol=RTOL)
    # identity preconditioning: the score is the plain gradient dot product
    dots = feat.query(payloads[:4]).double() @ got.T
    torch.testing.assert_close(dots, exact.train_grads[:4] @ exact.train_grads.T,
                               atol=ATOL, rtol=RTOL)


def test_hooked_gradients_match_a_plain_backward_loop(seq_task) -> None:
    """Reference: one backward per example, reading the weights' .grad."""
    payloads = [p for _, p in seq_task.examples()][:5]
    feat = Featurizer(seq_task, _fact(keep=1.0), device="cpu")
    got = feat.raw(payloads)
    model = seq_task.model()
    for i, payload in enumerate(payloads):
        model.zero_grad()
        seq_task.loss(model, seq_task.collate([payload]))[0].backward()
        expected = torch.cat([
            torch.cat([m.weight.grad, m.bias.grad[:, None]], dim=1).reshape(-1)
            for m in (model.inp, model.shared, model.head)
        ])
        torch.testing.assert_close(got[i], expected, atol=ATOL, rtol=RTOL)
    model.zero_grad()


def test_vectors_do_not_depend_on_batching(seq_task) -> None:
    payloads = [p for _, p in seq_task.examples()]
    feat = Featurizer(seq_task, _fact(keep=0.4, masks=2), device="cpu")
    whole = feat.raw(payloads)
    pieces = torch.cat([feat.raw(payloads[i : i + 5]) for i in range(0, len(payloads), 5)])
    reverse = feat.raw(payloads[::-1]).flip(0)
    torch.testing.assert_close(whole, pieces, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(whole, reverse, atol=ATOL, rtol=RTOL)


MASK_SCRIPT = """
import json, sys
from gradindex import CompressionConfig
from gradindex.indexer.compress import Layer, COMPRESSORS
layers = [Layer("enc.fc1", 300, 129, True, True), Layer("enc.fc2", 17, 300, True, False)]
out = {}
for name in ["factorized-dropout", "dropout", "dropout-sjlt"]:
    cfg = CompressionConfig(compressor=name, keep=0.07, seed=11)
    comp = COMPRESSORS[name](layers, 0.07, cfg, checkpoint=2, mask=1)
    state = {}
    for key in ("rows", "cols", "coords", "buckets", "signs"):
        for layer, t in getattr(comp, key, {}).items():
            state[key + ":" + layer] = t.tolist()
    out[name] = state
json.dump(out, sys.stdout)
"""


def test_masks_are_identical_across_processes() -> None:
    runs = [
        json.loads(subprocess.run([sys.executable, "-c", MASK_SCRIPT], check=True,
                                  capture_output=True, text=True).stdout)
        for _ in range(2)
    ]
    assert runs[0] == runs[1]
    assert all(runs[0][name] for name in runs[0])


def test_masks_differ_by_checkpoint_mask_and_seed(mlp_task) -> None:
    feat = Featurizer(mlp_task, _fact(keep=0.2, masks=2), device="cpu")
    layer = feat.layers[0]
    a, b = feat.compressors[0]
    assert not torch.equal(a.coordinates(layer.name), b.coordinates(layer.name))
    other_seed = FactorizedDropoutCompressor(feat.layers, feat.keep,
                                             _fact(keep=0.2, seed=1))
    assert not torch.equal(a.coordinates(layer.name), other_seed.coordinates(layer.name))
    again = FactorizedDropoutCompressor(feat.layers, feat.keep, _fact(keep=0.2))
    assert torch.equal(a.coordinates(layer.name), again.coordinates(layer.name))
    other_checkpoint = FactorizedDropoutCompressor(feat.layers, feat.keep,
                                                   _fact(keep=0.2), checkpoint=1)
    assert not torch.equal(a.coordinates(layer.name), other_checkpoint.coordinates(layer.name))
    assert all(not torch.equal(a.coordinates(ly.name), other_checkpoint.coordinates(ly.name))
               for ly in feat.layers)


@pytest.mark.parametrize(("rows", "cols", "keep"), [(10, 65, 0.25), (1024, 785, 0.003),
                                                    (3, 1000, 0.5), (7, 2, 0.9), (5, 5, 1.0)])
def test_split_keep_hits_the_budget(rows: int, cols: int, keep: float) -> None:
    k_out, k_in = split_keep(rows, cols, keep)
    assert 1 <= k_out <= rows and 1 <= k_in <= cols
    assert abs(k_out * k_in - keep * rows * cols) <= max(k_out, k_in) + 1


def test_sjlt_folds_the_wide_mask_with_one_signed_bucket_per_coordinate(mlp_task) -> None:
    """SJLT = the factorized mask at sjlt_expand·keep, each kept coordinate added with a ±1 sign
    into one of k buckets: checked against that matrix written out."""
    payloads = [p for _, p in mlp_task.examples()][:6]
    cfg = CompressionConfig(compressor="dropout-sjlt", keep=0.05, masks=1, sjlt_expand=4)
    sjlt = Featurizer(mlp_task, cfg, device="cpu")
    comp = sjlt.compressors[0][0]
    wide_keep = 0.05 * 4
    wide = Featurizer(mlp_task, _fact(keep=wide_keep, masks=1), device="cpu",
                      compressors=[[FactorizedDropoutCompressor(
                          sjlt.layers, wide_keep, _fact(keep=wide_keep))]])
    raw_wide, raw = wide.raw(payloads).double(), sjlt.raw(payloads).double()
    lo_w = lo = 0
    for (name, k), (_, wide_k) in zip(comp.blocks, wide.compressors[0][0].blocks, strict=True):
        buckets, signs = comp.buckets[name], comp.signs[name]
        assert buckets.shape == (wide_k,) and int(buckets.min()) >= 0 and int(buckets.max()) < k
        assert set(signs.tolist()) <= {-1.0, 1.0}
        fold = torch.zeros(wide_k, k, dtype=torch.float64)
        fold[torch.arange(wide_k), buckets] = signs.double()
        assert k < wide_k  # something was folded
        torch.testing.assert_close(raw[:, lo : lo + k], raw_wide[:, lo_w : lo_w + wide_k] @ fold,
                                   atol=ATOL, rtol=RTOL)
        lo, lo_w = lo + k, lo_w + wide_k
    assert lo == raw.shape[1] and lo_w == raw_wide.shape[1]


def test_sjlt_passes_coordinates_through_when_nothing_folds(mlp_task) -> None:
    payloads = [p for _, p in mlp_task.examples()][:4]
    sjlt = Featurizer(mlp_task, CompressionConfig(compressor="dropout-sjlt", keep=1.0),
                      device="cpu").raw(payloads)
    full = Featurizer(mlp_task, _fact(keep=1.0), device="cpu").raw(payloads)
    torch.testing.assert_close(sjlt, full, atol=ATOL, rtol=RTOL)


def test_sjlt_and_gaussian_are_deterministic_and_shaped(mlp_task) -> None:
    payloads = [p for _, p in mlp_task.examples()][:6]
    for name in ["dropout-sjlt", "gaussian"]:
        cfg = CompressionConfig(compressor=name, keep=0.2, masks=1)
        one, two = Featurizer(mlp_task, cfg, device="cpu"), Featurizer(mlp_task, cfg, device="cpu")
        a, b = one.raw(payloads), two.raw(payloads)
        assert a.shape == (6, one.dim) and torch.equal(a, b)
        assert abs(one.dim - 0.2 * one.total_params) <= len(one.layers)


def test_gaussian_projection_preserves_inner_products_on_average(mlp_task, monkeypatch) -> None:
    """JL: E[(Px)·(Py)] = x·y; with k large the relative error is small."""
    monkeypatch.setattr(GaussianCompressor, "CHUNK", 100)  # exercise the chunked generation
    payloads = [p for _, p in mlp_task.examples()][:6]
    full = Featurizer(mlp_task, _fact(keep=1.0), device="cpu").raw(payloads)
    proj = Featurizer(mlp_task, CompressionConfig(compressor="gaussian", keep=0.9, masks=1),
                      device="cpu").raw(payloads)
    gram_full, gram_proj = full @ full.T, proj @ proj.T
    rel = (gram_full - gram_proj).norm() / gram_full.norm()
    assert rel < 0.15, float(rel)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"keep": 1.5}, "`keep`"), ({"keep": 0}, "`keep`"), ({"dim": 0, "keep": None}, "`dim`"),
     ({"masks": 0}, "`masks`"), ({"compressor": "zip"}, "`compressor`"),
     ({"batch_size": -1}, "`batch_size`")],
)
def test_config_errors_name_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        CompressionConfig(**kwargs)


def test_factorized_rejects_non_linear_modules(seq_task) -> None:
    class ConvTask(type(seq_task)):  # type: ignore[misc]
        def modules(self, model):
            return {"norm": torch.nn.LayerNorm(4)}

    with pytest.raises(ConfigError, match="nn.Linear"):
        Featurizer(ConvTask(), _fact(keep=0.5), device="cpu")


@pytest.mark.parametrize("compressor", ["dropout", "gaussian"])
def test_full_gradient_path_records_no_outer_graph(compressor: str) -> None:
    """With trainable parameters left out of the attribution, the per-example gradients must
    not stay in an autograd graph (which kept every projection chunk alive: 13 GB)."""

    class HeadOnly(SequenceTask):
        def modules(self, model):
            return {"head": model.head}

    task = HeadOnly()
    feat = Featurizer(task, CompressionConfig(compressor=compressor, keep=0.5), device="cpu")
    vectors = feat.raw([p for _, p in task.examples()][:4])
    assert not vectors.requires_grad and vectors.grad_fn is None


ENSEMBLE_TASK = '''
import numpy as np
import torch
from torch import nn

from gradindex.indexer.tasks import ArrayClassificationTask

RNG = np.random.default_rng(0)
X = RNG.normal(size=(40, 6)).astype(np.float32)
Y = RNG.integers(0, 3, size=40)


def make(checkpoint=None):
    torch.manual_seed(0 if checkpoint is None else int(checkpoint))
    return nn.Sequential(nn.Linear(6, 80), nn.Tanh(), nn.Linear(80, 3))


class Ensemble(ArrayClassificationTask):
    def __init__(self, checkpoints=1):
        super().__init__(make, X, Y, checkpoints=[str(c) for c in range(checkpoints)])
'''


@pytest.mark.parametrize("checkpoints,picked", [
    (1, ("factorized-dropout", 2048, 2)), (2, ("dropout-sjlt", 4096, 1)),
    (10, ("dropout-sjlt", 4096, 1)),
])
def test_auto_compression_follows_the_checkpoint_count(checkpoints: int, picked: tuple) -> None:
    resolved = CompressionConfig().resolve(checkpoints)
    assert (resolved.compressor, resolved.dim, resolved.masks) == picked
    assert resolved.resolve(checkpoints) == resolved  # what a manifest records stays itself
    # what a user names stays, and fills in the rest as before `auto`
    mine = CompressionConfig(compressor="dropout-sjlt").resolve(checkpoints)
    assert (mine.compressor, mine.dim, mine.masks) == ("dropout-sjlt", 2048, 2)
    mine = CompressionConfig(masks=3, keep=0.5).resolve(checkpoints)
    assert (mine.compressor, mine.dim, mine.keep, mine.masks) == (picked[0], None, 0.5, 3)


def test_an_ensemble_build_records_what_auto_picked(tmp_path, settings) -> None:
    from gradindex import BuildConfig, build, open_index

    (tmp_path / "ensemble_task.py").write_text(ENSEMBLE_TASK)
    spec = f"{tmp_path / 'ensemble_task.py'}:Ensemble"
    for name, checkpoints, picked in (("one", 1, "factorized-dropout"),
                                      ("two", 2, "dropout-sjlt")):
        build(BuildConfig(name=name, task=spec, task_args={"checkpoints": checkpoints}),
              settings)
        manifest = open_index(name, settings).manifest
        recorded = CompressionConfig.from_json(manifest["compression"])
        assert recorded.compressor == picked and recorded.masks in (1, 2)
        # 80·6+80 + 3·80+3 coordinates: fewer than k, so one mask keeps them all
        assert manifest["layout"]["keep"] == 1.0 and manifest["layout"]["masks"] == 1
        assert manifest["layout"]["dim"] == 803 * checkpoints
        # a query featurizer made from the manifest (as the server makes it) is the same
        feat = Featurizer(spec_task(tmp_path, checkpoints), recorded, device="cpu")
        assert feat.config == recorded and feat.dim == manifest["layout"]["dim"]


def spec_task(folder, checkpoints: int):
    """The ensemble task of :data:`ENSEMBLE_TASK`, loaded from its file."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("ensemble_task_mod", folder / "ensemble_task.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.Ensemble(checkpoints)
