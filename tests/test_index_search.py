"""Search of a persistent index against brute force: checkpoint ensembles end to end, metadata
filters of every JSON type on both databases, and relative influence with a filter."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
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
)
from gradindex.indexer.compress import FactorizedDropoutCompressor
from gradindex.indexer.errors import ConfigError
from gradindex.indexer.query import featurizer_for, query_vectors
from gradindex.indexer.tasks import DigitsTask
from gradindex.indexer.tasks.digits import make_digits_model, train_classifier

RTOL = 1e-4
ATOL = 1e-6
SIZE = 120


class TwoCheckpoints(DigitsTask):
    """Logistic regression on digits, trained from two seeds: an ensemble of two checkpoints."""

    def __init__(self) -> None:
        super().__init__("logreg", train_size=SIZE)
        self._nets: dict[str, nn.Module] = {}

    def checkpoints(self) -> list[str]:
        return ["seed0", "seed1"]

    def model(self, checkpoint: str = "seed0") -> nn.Module:  # type: ignore[override]
        if checkpoint not in self._nets:
            net = make_digits_model("logreg", seed=int(checkpoint[-1]))
            train_classifier(net, self.x, self.y, weight_decay=1e-3)
            self._nets[checkpoint] = net.eval()
        return self._nets[checkpoint]


class OneOfTwo(TwoCheckpoints):
    """One checkpoint of :class:`TwoCheckpoints` alone, as its own task."""

    def __init__(self, which: str) -> None:
        super().__init__()
        self.which = which

    def checkpoints(self) -> list[str]:
        return [self.which]


class Tagged(DigitsTask):
    """Digits whose metadata holds every JSON type: strings, booleans, null, floats, ints."""

    def __init__(self) -> None:
        super().__init__("logreg", train_size=SIZE)

    def examples(self) -> list[tuple[str, dict[str, Any]]]:
        return [(i, {**p, "i": n}) for n, (i, p) in enumerate(super().examples())]

    def metadata(self, payload: dict[str, Any]) -> dict[str, Any]:
        n = payload["i"]
        return {"label": payload["y"], "src": ["wiki", "books", "news"][n % 3],
                "flag": n % 4 == 0, "note": None if n % 5 == 0 else "kept",
                "weight": [0.5, 1.25, 2.0][n % 3]}


def test_a_checkpoint_ensemble_scores_the_mean_of_its_checkpoints(tmp_path: Any) -> None:
    settings = Settings(data_dir=tmp_path / "data")
    compression = CompressionConfig(compressor="factorized-dropout", keep=0.3, masks=2,
                                    batch_size=40)
    pcfg = PreconditionerConfig(fisher="expected")
    build(BuildConfig(name="ensemble", task="tests.test_index_search:TwoCheckpoints",
                      compression=compression, preconditioner=pcfg), settings)
    index = open_index("ensemble", settings)
    assert index.manifest["layout"]["checkpoints"] == 2 and index.manifest["layout"]["groups"] == 4
    queries = TwoCheckpoints().test_payloads(5)
    got = index.scores(query_vectors(featurizer_for(index), queries))[1]

    # Each checkpoint alone, with the masks the ensemble drew for it: the ensemble's score is
    # the mean of theirs (each group has its own preconditioner blocks).
    per_checkpoint = []
    for c, name in enumerate(["seed0", "seed1"]):
        task = OneOfTwo(name)
        layers = Featurizer(task, compression, device="cpu").layers
        keep = compression.keep
        assert keep is not None
        comps = [[FactorizedDropoutCompressor(layers, keep, compression, checkpoint=c, mask=m)
                  for m in range(2)]]
        feat = Featurizer(task, compression, device="cpu", compressors=comps)
        per_checkpoint.append(InMemoryIndex.fit(task, compression, pcfg, featurizer=feat)
                              .scores(queries).numpy())
    # a checkpoint alone averages its 2 masks; the ensemble averages all 4 groups
    np.testing.assert_allclose(got, np.mean(per_checkpoint, axis=0), rtol=1e-3, atol=1e-5)
    assert not np.allclose(per_checkpoint[0], per_checkpoint[1], rtol=0.05)


@pytest.fixture()
def tagged(settings: Settings) -> tuple[Settings, np.ndarray, list[dict[str, Any]]]:
    """An index of :class:`Tagged` on the backend of ``settings``; all its query scores."""
    build(BuildConfig(name="tagged", task="tests.test_index_search:Tagged",
                      compression=CompressionConfig(keep=0.3, batch_size=40)), settings)
    index = open_index("tagged", settings)
    queries = Tagged().test_payloads(4)
    _, scores = index.scores(query_vectors(featurizer_for(index), queries))
    metas = [Tagged().metadata({**p, "i": n}) for n, (_, p) in enumerate(Tagged().examples())]
    return settings, scores, metas


FILTERS: list[dict[str, Any]] = [
    {"src": "wiki"},
    {"src": ["books", "news"]},
    {"flag": True},
    {"flag": False, "src": "news"},
    {"note": None},
    {"note": "kept", "label": [1, 2, 3]},
    {"weight": 1.25},
    {"weight": [0.5, 2.0], "flag": True},
    {"label": 7},
]


def _matches(meta: dict[str, Any], flt: dict[str, Any]) -> bool:
    for key, want in flt.items():
        values = want if isinstance(want, list) else [want]
        value = meta.get(key)
        # JSON equality: True is not 1, 1.0 equals 1
        if not any(type(value) is type(v) and value == v if isinstance(v, bool) or
                   isinstance(value, bool) else value == v for v in values):
            return False
    return True


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("flt", FILTERS, ids=[str(f) for f in FILTERS])
def test_filters_of_every_json_type_equal_brute_force(
    tagged: tuple[Settings, np.ndarray, list[dict[str, Any]]], flt: dict[str, Any],
    normalize: bool,
) -> None:
    settings, scores, metas = tagged
    index = open_index("tagged", settings)
    queries = query_vectors(featurizer_for(index), Tagged().test_payloads(4))
    keep = np.array([_matches(m, flt) for m in metas])
    assert 0 < keep.sum() < len(metas)
    values = scores
    if normalize:
        values = scores / np.sqrt(np.maximum(index.self_influence_values, 1e-30))[None, :]
    k = 6
    for direction, sign in (("proponents", 1.0), ("opponents", -1.0)):
        hits = index.search(queries, k, direction=direction, filter=flt, normalize=normalize)
        for q, found in enumerate(hits):
            masked = np.where(keep, sign * values[q], -np.inf)
            signed = int((masked > 0).sum())  # proponents score > 0, opponents < 0
            want = np.argsort(-masked, kind="stable")[: min(k, signed)]
            assert [h.external_id for h in found] == [f"train-{i}" for i in want]
            np.testing.assert_allclose([h.score for h in found], values[q][want],
                                       rtol=1e-3, atol=1e-5)


def test_filters_compare_json_values_not_text(
    tagged: tuple[Settings, np.ndarray, list[dict[str, Any]]],
) -> None:
    settings, _, metas = tagged
    index = open_index("tagged", settings)
    q = query_vectors(featurizer_for(index), Tagged().test_payloads(1))
    with pytest.raises(ConfigError, match="'label' holds integer values, got string"):
        index.search(q, 200, filter={"label": "7"})  # a string against ints
    ints = index.examples.matching({"label": 7})
    assert ints is not None and len(ints) == sum(m["label"] == 7 for m in metas) > 0
    assert len(index.examples.matching({"label": 7.0})) == len(ints)  # 7.0 equals 7
    with pytest.raises(ConfigError, match="'flag' holds boolean values"):
        index.search(q, 200, filter={"flag": 1})  # true is not 1 in JSON
    assert torch.is_tensor(q)
