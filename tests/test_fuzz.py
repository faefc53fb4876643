"""Property-based fuzzing of the OpenAPI contract: hundreds of generated requests, no 5xx, and
the server still answers correctly afterwards, with nothing in the index changed."""

from __future__ import annotations

import math
from typing import Any

import httpx
import numpy as np
import pytest
import schemathesis
from gradindex_client import Client
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gradindex import Settings, open_index
from gradindex.indexer.query import featurizer_for, query_vectors
from gradindex.indexer.tasks import DigitsTask
from gradindex.server import ServerSettings, create_app

from .conftest import SERVED_INDEX, LiveServer

MIN_REQUESTS = 20
"""Fuzzed requests each operation with parameters sends at least (hundreds in all)."""
SENT: list[int] = []
"""Status codes of every fuzzed request."""
FUZZ = settings(max_examples=70, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def before(server_settings: Settings, live_server: LiveServer, server_keys: dict[str, str],
           store_task: DigitsTask) -> dict[str, Any]:
    """What the index answers before the fuzz, to compare with after it."""
    payloads = store_task.test_payloads(3)
    with Client(live_server.url, api_key=server_keys["read"]) as c:
        info = c.index(SERVED_INDEX)
        result = c.influence(SERVED_INDEX, payloads, 10, direction="both")
    return {"payloads": payloads, "version": info.version, "count": info.count,
            "result": result}


# The contract, as the app states it (building the app starts nothing).
SCHEMA = schemathesis.openapi.from_dict(create_app(ServerSettings(auth="off")).openapi())
OPERATIONS = {op.label: op for op in (r.ok() for r in SCHEMA.get_all_operations())}


@pytest.mark.parametrize("label", sorted(OPERATIONS))
def test_generated_requests_never_get_a_5xx(label: str, live_server: LiveServer,
                                             server_keys: dict[str, str],
                                             before: dict[str, Any]) -> None:
    headers = {"Authorization": f"Bearer {server_keys['admin']}"}

    @FUZZ
    @given(case=OPERATIONS[label].as_strategy())
    def fuzz(case: Any) -> None:
        # Most requests go to the served index, so bodies reach the task and the worker.
        if "name" in (case.path_parameters or {}) and len(SENT) % 4:
            case.path_parameters["name"] = SERVED_INDEX
        response = case.call(base_url=live_server.url, headers=headers, timeout=30)
        SENT.append(response.status_code)
        assert response.status_code < 500, (label, response.text[:500])
        if response.status_code >= 400:
            error = response.json()["error"]
            assert error["type"] and error["message"]

    sent_before = len(SENT)
    fuzz()
    # an operation without parameters or body has one request to make
    least = MIN_REQUESTS if "{" in label or label.startswith(("POST", "PUT", "DELETE")) else 1
    assert len(SENT) - sent_before >= least, f"only {len(SENT) - sent_before} requests"
    _assert_unchanged(live_server, server_keys, before)


NUMBERS = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(),
                    st.sampled_from([0.0, 1.0, 1e30, -1e30, 1e308]), st.booleans(), st.none())


@given(x=st.lists(NUMBERS, min_size=60, max_size=68), y=st.one_of(st.integers(), NUMBERS,
                                                                   st.text(max_size=3)),
       k=st.integers(min_value=-2, max_value=1002), normalize=st.booleans())
@FUZZ
def test_near_valid_payloads_never_get_a_5xx(live_server: LiveServer,
                                             server_keys: dict[str, str],
                                             x: list[Any], y: Any, k: int,
                                             normalize: bool) -> None:
    body = {"examples": [{"x": x, "y": y}], "k": k, "normalize": normalize,
            "direction": "both"}
    content = _dumps(body)
    response = httpx.post(f"{live_server.url}/v1/indexes/{SERVED_INDEX}/influence",
                          content=content, timeout=30,
                          headers={"Authorization": f"Bearer {server_keys['read']}",
                                   "Content-Type": "application/json"})
    SENT.append(response.status_code)
    assert response.status_code < 500, response.text[:500]
    valid = (len(x) == 64 and 1 <= k <= 1000 and isinstance(y, int) and not isinstance(y, bool)
             and 0 <= y < 10 and all(isinstance(v, int | float) and not isinstance(v, bool)
                                     and math.isfinite(v) and abs(v) < 1e3 for v in x))
    if valid:
        assert response.status_code == 200, response.text[:500]


def _dumps(body: Any) -> str:
    import json

    return json.dumps(body)  # NaN and Infinity as JS literals, as many clients send them


def test_the_server_still_answers_correctly_after_the_fuzz(
    live_server: LiveServer, server_keys: dict[str, str], before: dict[str, Any],
) -> None:
    """Whatever ran before (every operation's test checks the same after its fuzz)."""
    assert not [s for s in SENT if s >= 500]
    _assert_unchanged(live_server, server_keys, before)


def _assert_unchanged(live_server: LiveServer, server_keys: dict[str, str],
                      before: dict[str, Any]) -> None:
    """The server is healthy and answers as before and as the indexer does, in process."""
    with Client(live_server.url, api_key=server_keys["read"]) as c:
        assert c.health().status == "ok"
        info = c.index(SERVED_INDEX)
        after = c.influence(SERVED_INDEX, before["payloads"], 10, direction="both")
    assert (info.version, info.count) == (before["version"], before["count"])
    reference = open_index(SERVED_INDEX, live_server.settings)
    q = query_vectors(featurizer_for(reference), before["payloads"])
    for d in ("proponents", "opponents"):
        want = reference.search(q, 10, direction=d)
        for i, result in enumerate(after.results):
            hits = getattr(result, d)
            assert [h.id for h in hits] == [h.external_id for h in want[i]]
            assert [h.id for h in hits] == [h.id for h in getattr(before["result"].results[i], d)]
            np.testing.assert_allclose([h.score for h in hits], [h.score for h in want[i]],
                                       rtol=1e-4, atol=1e-4)
