"""Fidelity on digits logistic regression: LDS against models retrained on random halves.

Every figure measured here is printed (run with ``-s`` to see them); the assertions are the
floors the approximations must keep.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gradindex import CompressionConfig, ExactInfluence, InMemoryIndex, PreconditionerConfig, lds
from gradindex.indexer.evaluate import random_subsets, retrain_losses
from gradindex.indexer.tasks import make_digits_model, train_classifier

from .conftest import WEIGHT_DECAY

SUBSETS = 50
QUERIES = 100


@pytest.fixture(scope="module")
def ground_truth(logreg_task):
    """Test losses of 50 models retrained on random 50% subsets, and the subsets."""
    xq = torch.tensor(logreg_task.x_test[:QUERIES])
    yq = torch.tensor(logreg_task.y_test[:QUERIES])

    def train_and_eval(idx: np.ndarray) -> np.ndarray:
        model = make_digits_model("logreg", seed=0)
        train_classifier(model, logreg_task.x[idx], logreg_task.y[idx],
                         weight_decay=WEIGHT_DECAY)
        with torch.no_grad():
            return F.cross_entropy(model(xq), yq, reduction="none").numpy()

    subsets = random_subsets(len(logreg_task.x), SUBSETS, seed=1)
    return subsets, retrain_losses(subsets, train_and_eval)


def _lds(task, ground_truth, scores) -> float:
    subsets, losses = ground_truth
    value = float(np.nanmean(lds(np.asarray(scores), subsets, losses)))
    return value


def _index(task, keep: float, masks: int = 1, **pcfg) -> InMemoryIndex:
    return InMemoryIndex.fit(task, CompressionConfig(keep=keep, masks=masks),
                             PreconditionerConfig(**pcfg), device="cpu")


def test_lds_of_exact_and_approximate_influence(logreg_task, ground_truth) -> None:
    queries = logreg_task.test_payloads(QUERIES)
    train = [p for _, p in logreg_task.examples()]
    figures = {}

    exact = ExactInfluence(logreg_task, train, curvature="hessian", l2=WEIGHT_DECAY)
    figures["exact influence (Hessian + L2)"] = _lds(logreg_task, ground_truth,
                                                     exact.scores(queries))
    full = _index(logreg_task, 1.0, shape="full", fisher="expected", damping=0.1)
    figures["keep=1, full expected Fisher"] = _lds(logreg_task, ground_truth,
                                                   full.scores(queries))
    dot = _index(logreg_task, 1.0, shape="identity")
    figures["gradient dot product"] = _lds(logreg_task, ground_truth, dot.scores(queries))
    one = _index(logreg_task, 0.25, 1, shape="full", fisher="expected", damping=0.1)
    figures["factorized-dropout keep=0.25, 1 mask"] = _lds(logreg_task, ground_truth,
                                                           one.scores(queries))
    four = _index(logreg_task, 0.25, 4, shape="full", fisher="expected", damping=0.1)
    figures["factorized-dropout keep=0.25, 4 masks"] = _lds(logreg_task, ground_truth,
                                                            four.scores(queries))
    rng = np.random.default_rng(0)
    figures["random scores"] = _lds(logreg_task, ground_truth,
                                    rng.normal(size=(QUERIES, len(train))))
    for name, value in figures.items():
        print(f"LDS {name:45s} {value:.3f}")

    assert one.featurizer.dim <= 0.25 * one.featurizer.total_params
    assert figures["keep=1, full expected Fisher"] >= 0.8
    assert figures["factorized-dropout keep=0.25, 1 mask"] >= 0.5
    assert (figures["factorized-dropout keep=0.25, 4 masks"]
            > figures["factorized-dropout keep=0.25, 1 mask"])
    assert figures["random scores"] < 0.1
    assert figures["exact influence (Hessian + L2)"] > figures["gradient dot product"]
