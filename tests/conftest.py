"""Shared fixtures: small trained models on scikit-learn's bundled digits, built once."""

from __future__ import annotations

import pytest

from indexer.tasks import DigitsTask

from .factories import SequenceTask

WEIGHT_DECAY = 1e-3


@pytest.fixture(scope="session")
def logreg_task() -> DigitsTask:
    """Multinomial logistic regression on 1,000 digits, trained to convergence."""
    return DigitsTask("logreg", train_size=1000, weight_decay=WEIGHT_DECAY)


@pytest.fixture(scope="session")
def mlp_task() -> DigitsTask:
    """A 64-16-10 tanh MLP on 300 digits (small enough for an exact Hessian)."""
    return DigitsTask("mlp", train_size=300, hidden=16, weight_decay=WEIGHT_DECAY)


@pytest.fixture()
def seq_task() -> SequenceTask:
    return SequenceTask()
