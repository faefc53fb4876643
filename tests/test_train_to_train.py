"""Train-to-train queries (a stored training example as the query, no model pass) and what the
influence answer says about its query: sign counts, prediction, confidence and loss."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from gradindex_client import Client, InvalidRequest, NotFound

from gradindex import Settings, open_index
from gradindex.indexer.featurize import Featurizer
from gradindex.indexer.query import featurizer_for, query_vectors
from gradindex.indexer.reader import Index

from .conftest import SERVED_INDEX, LiveServer

RTOL = 1e-3
ATOL = 1e-5
"""A stored vector is float32 and goes back through ``(F̃+λI)``: scores agree to rounding."""
K = 10


@pytest.fixture(scope="module")
def api(live_server: LiveServer, server_keys: dict[str, str]) -> Iterator[Client]:
    with Client(live_server.url, api_key=server_keys["read"], retries=0) as c:
        yield c


@pytest.fixture(scope="module")
def index(server_settings: Settings) -> Index:
    return open_index(SERVED_INDEX, server_settings)


@pytest.fixture(scope="module")
def featurizer(index: Index) -> Featurizer:
    return featurizer_for(index)


def _live(api: Client, n: int) -> list[Any]:
    """``n`` live training examples of the served index (other tests delete some)."""
    return api.examples(SERVED_INDEX, limit=n, offset=40).results


def test_a_stored_vector_gives_back_the_query_of_its_payload(index: Index,
                                                             featurizer: Featurizer) -> None:
    ids = [f"train-{i}" for i in (0, 7, 123)]
    rows, stored = index.stored_queries(ids)
    payloads = [index.example(i).payload for i in ids]
    fresh = query_vectors(featurizer, payloads).numpy()
    np.testing.assert_allclose(stored, fresh, rtol=RTOL, atol=1e-4 * np.abs(fresh).max())
    assert rows.tolist() == [index.example(i).id for i in ids]
    every = index.vectors
    np.testing.assert_allclose(stored @ np.asarray(every).T, fresh @ np.asarray(every).T,
                               rtol=RTOL, atol=ATOL * np.abs(fresh @ np.asarray(every).T).max())


def test_ids_queries_equal_querying_with_the_stored_payloads(api: Client) -> None:
    examples = _live(api, 3)
    ids = [e.id for e in examples]
    by_id = api.influence(SERVED_INDEX, ids=ids, k=K, direction="both", include_self=True)
    by_payload = api.influence(SERVED_INDEX, [e.payload for e in examples], K,
                               direction="both")
    for e, got, want in zip(examples, by_id.results, by_payload.results, strict=True):
        assert got.id == e.id and want.id is None
        for d in ("proponents", "opponents"):
            g, w = getattr(got, d), getattr(want, d)
            assert [h.id for h in g] == [h.id for h in w]
            np.testing.assert_allclose([h.score for h in g], [h.score for h in w],
                                       rtol=RTOL, atol=ATOL)
        assert (got.positives, got.negatives) == (want.positives, want.negatives)
        assert got.prediction == want.prediction
        assert got.confidence == pytest.approx(want.confidence, rel=1e-6)
        assert got.loss == pytest.approx(want.loss, rel=1e-6)


def test_an_example_is_left_out_of_its_own_results_unless_asked(api: Client) -> None:
    examples = _live(api, 2)
    ids = [e.id for e in examples]
    with_self = api.influence(SERVED_INDEX, ids=ids, k=K, include_self=True).results
    without = api.influence(SERVED_INDEX, ids=ids, k=K).results
    for e, w, wo in zip(examples, with_self, without, strict=True):
        assert e.id in [h.id for h in w.proponents]  # its own strongest supporter, usually
        assert e.id not in [h.id for h in wo.proponents]
        others = [h.id for h in w.proponents if h.id != e.id]
        assert [h.id for h in wo.proponents][: len(others)] == others
        assert len(wo.proponents) == K
        assert wo.positives == w.positives - 1  # itself, scoring its self-influence > 0


def test_proponents_are_positive_opponents_negative_and_counted(api: Client,
                                                                index: Index) -> None:
    example = _live(api, 1)[0]
    count = api.index(SERVED_INDEX).count
    got = api.influence(SERVED_INDEX, ids=[example.id], k=1000, direction="both").results[0]
    assert all(h.score > 0 for h in got.proponents) and all(h.score < 0 for h in got.opponents)
    assert got.positives == len(got.proponents) and got.negatives == len(got.opponents)
    assert 0 < got.positives < count - 1 and got.positives + got.negatives <= count - 1
    few = api.influence(SERVED_INDEX, ids=[example.id], k=3).results[0]
    assert len(few.proponents) == 3 and few.positives == got.positives


def test_prediction_confidence_and_loss_come_from_the_model(api: Client, index: Index,
                                                            featurizer: Featurizer) -> None:
    payloads = [e.payload for e in _live(api, 4)]
    payloads[0] = {**payloads[0], "y": (payloads[0]["y"] + 1) % 10}  # a mislabel: high loss
    got = api.influence(SERVED_INDEX, payloads, 2).results
    model = featurizer.models[0]
    batch = featurizer.collate(payloads)
    with torch.no_grad():
        probs = torch.softmax(featurizer.task.logits(model, batch).double(), -1)
        losses = featurizer.task.loss(model, batch).double()
    for i, r in enumerate(got):
        assert r.prediction == int(probs[i].argmax())
        assert r.confidence == pytest.approx(float(probs[i].max()), rel=1e-5)
        assert r.loss == pytest.approx(float(losses[i]), rel=1e-5)
    assert got[0].loss > max(r.loss for r in got[1:])


def test_bad_id_queries_are_refused_naming_the_problem(api: Client) -> None:
    example = _live(api, 1)[0]
    with pytest.raises(NotFound, match="no-such-id"):
        api.influence(SERVED_INDEX, ids=[example.id, "no-such-id"])
    post = api._http.post  # the client refuses these before sending: check the server too
    url = f"{api.base_url}/v1/indexes/{SERVED_INDEX}/influence"
    headers = api._headers()
    for body in ({"k": 3}, {"ids": [example.id], "examples": [example.payload]}):
        answer = post(url, json=body, headers=headers)
        assert answer.status_code == 422
        assert "exactly one of `examples`" in answer.json()["error"]["message"]
    with pytest.raises(ValueError, match="exactly one of `examples`"):
        api.influence(SERVED_INDEX, [example.payload], ids=[example.id])
    with pytest.raises(InvalidRequest, match="'color' is not in this index's metadata"):
        api.influence(SERVED_INDEX, ids=[example.id], filter={"color": "red"})
