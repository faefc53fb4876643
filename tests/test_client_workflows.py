"""What a data team does through the client, against the real server: partial scores, paging
through every example (filtered), the histogram's bins as self-influence filters, the key's
scope, and train-to-train from the async client."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from gradindex_client import AsyncClient, AuthenticationError, Client, InvalidRequest, NotFound

from gradindex import Settings, open_index
from gradindex.indexer.query import featurizer_for

from .conftest import SERVED_INDEX, LiveServer


@pytest.fixture(scope="module")
def api(live_server: LiveServer, server_keys: dict[str, str]) -> Iterator[Client]:
    with Client(live_server.url, api_key=server_keys["read"], retries=0) as c:
        yield c


def _payloads(api: Client, n: int) -> list[dict[str, object]]:
    return [e.payload for e in api.examples(SERVED_INDEX, limit=n, offset=100).results]


def test_scores_leave_out_missing_ids_and_list_them(api: Client) -> None:
    live = [e.id for e in api.examples(SERVED_INDEX, limit=3, offset=10).results]
    payloads = _payloads(api, 2)
    asked = [live[0], "never-indexed", live[1], "gone/2", live[2]]
    got = api.scores(SERVED_INDEX, payloads, asked)
    assert got.ids == live and got.missing == ["never-indexed", "gone/2"]
    whole = api.scores(SERVED_INDEX, payloads, live, strict=True)
    np.testing.assert_allclose(got.scores, whole.scores, rtol=1e-6)
    assert whole.missing == []
    with pytest.raises(NotFound, match="never-indexed"):
        api.scores(SERVED_INDEX, payloads, asked, strict=True)

    async def run() -> None:
        async with AsyncClient(api.base_url, api_key=api.api_key, retries=0) as a:
            partial = await a.scores(SERVED_INDEX, payloads, asked)
            assert partial.ids == live and partial.missing == ["never-indexed", "gone/2"]

    asyncio.run(run())


def test_iter_examples_pages_through_every_live_example(api: Client) -> None:
    count = api.index(SERVED_INDEX).count
    seen = [e.id for e in api.iter_examples(SERVED_INDEX, page_size=97)]
    assert len(seen) == len(set(seen)) == count
    threes = list(api.iter_examples(SERVED_INDEX, page_size=10, filter={"label": 3}))
    page = api.examples(SERVED_INDEX, limit=5, filter={"label": 3})
    assert page.total == len(threes) > 10 and all(e.meta["label"] == 3 for e in threes)
    assert [e.id for e in page.results] == [e.id for e in threes[:5]]
    frame = page.to_pandas(payloads=True)
    assert list(frame["id"]) == [e.id for e in page.results]
    assert (frame["meta.label"] == 3).all() and (frame["payload.y"] == 3).all()
    assert len(frame["payload.x"][0]) == 64

    async def run() -> list[str]:
        async with AsyncClient(api.base_url, api_key=api.api_key, retries=0) as a:
            return [e.id async for e in a.iter_examples(SERVED_INDEX, page_size=10,
                                                        filter={"label": 3})]

    assert asyncio.run(run()) == [e.id for e in threes]


def test_iter_self_influence_takes_a_filter(api: Client) -> None:
    ranked = list(api.iter_self_influence(SERVED_INDEX, page_size=7,
                                          filter={"label": {"$in": [1, 7]}}))
    assert len(ranked) == api.examples(SERVED_INDEX, limit=1,
                                       filter={"label": [1, 7]}).total
    values = [e.self_influence for e in ranked]
    assert values == sorted(values, reverse=True)
    assert {e.meta["label"] for e in ranked} == {1, 7}


@pytest.mark.parametrize("log", [False, True])
def test_each_histogram_bin_is_a_self_influence_filter_with_its_count(api: Client,
                                                                    log: bool) -> None:
    answer = api._http.get(f"{api.base_url}/v1/indexes/{SERVED_INDEX}/self-influence/histogram",
                           params={"bins": 12, "log": str(log).lower()}, headers=api._headers())
    hist = answer.json()
    count = api.index(SERVED_INDEX).count
    assert hist["count"] == sum(hist["counts"]) == count  # every live example
    edges = hist["edges"]
    for i, want in enumerate(hist["counts"]):
        low = edges[i] if i > 0 else None  # the first bin also holds values <= 0 (log)
        high = edges[i + 1] if i + 1 < len(hist["counts"]) else None  # the last is closed
        page = api.self_influence(SERVED_INDEX, limit=5, min_self_influence=low,
                                  max_self_influence=high)
        assert page.total == want, f"bin {i}"
        assert all((low is None or e.self_influence >= low) and
                   (high is None or e.self_influence < high) for e in page.results)


def test_bad_filters_are_422_naming_the_key(api: Client) -> None:
    with pytest.raises(InvalidRequest, match=r"'label' holds integer values, got string"):
        api.influence(SERVED_INDEX, _payloads(api, 1), filter={"label": "1"})
    with pytest.raises(InvalidRequest, match=r"'color' is not .* known keys: \['label'\]"):
        api.examples(SERVED_INDEX, filter={"color": "red"})
    with pytest.raises(InvalidRequest, match="more than 256 values"):
        api.self_influence(SERVED_INDEX, filter={"label": list(range(300))})
    schema = api.index(SERVED_INDEX).metadata_schema
    assert schema is not None and schema["keys"]["label"]["types"] == ["integer"]
    assert schema["keys"]["label"]["values"] == list(range(10))


def test_whoami_tells_the_keys_scope(live_server: LiveServer, server_keys: dict[str, str],
                                     tmp_path: Path) -> None:
    for scope in ("read", "admin"):
        with Client(live_server.url, api_key=server_keys[scope], retries=0) as c:
            assert c.whoami().scope == scope and c.whoami().auth
    with Client(live_server.url, api_key="", retries=0) as c, \
            pytest.raises(AuthenticationError, match="needs an API key"):
        c.whoami()
    empty = Settings(data_dir=tmp_path / "empty")  # no index to load: starts fast
    keyless = LiveServer(empty, tmp_path / "keyless.log", auth="off").wait()
    try:
        with Client(keyless.url, api_key="", retries=0) as c:
            me = c.whoami()
            assert (me.scope, me.auth, me.key) == ("keyless", False, None)
    finally:
        keyless.stop()


def test_the_async_client_queries_with_stored_examples(api: Client) -> None:
    ids = [e.id for e in api.examples(SERVED_INDEX, limit=2, offset=200).results]

    async def run() -> None:
        async with AsyncClient(api.base_url, api_key=api.api_key, retries=0) as a:
            got = await a.influence(SERVED_INDEX, ids=ids, k=4, direction="both")
            assert [r.id for r in got.results] == ids
            for r, i in zip(got.results, ids, strict=True):
                assert len(r.proponents) == 4 and i not in [h.id for h in r.proponents]
                assert r.prediction is not None and r.loss is not None

    asyncio.run(run())


def _predicted(server_settings: Settings, payloads: list[Any]) -> list[int]:
    """The served model's classes of ``payloads``, computed in this process."""
    index = open_index(SERVED_INDEX, server_settings)
    feat = featurizer_for(index)
    with torch.no_grad():
        logits = feat.task.logits(feat.models[0], feat.collate(payloads))
    return [int(c) for c in logits.argmax(dim=1)]


def test_misclassified_training_examples_agree_with_the_model(
        api: Client, server_settings: Settings) -> None:
    """The served model fits its 300 training digits (none misclassified: the listing is empty,
    as the model says); the gallery test below finds real misclassified examples."""
    every = list(api.iter_examples(SERVED_INDEX, page_size=500))
    classes = _predicted(server_settings, [e.payload for e in every])
    wrong = [e.id for e, c in zip(every, classes, strict=True) if c != e.meta["label"]]
    page = api.examples(SERVED_INDEX, limit=1000, misclassified=True)
    assert page.total == len(wrong) and [e.id for e in page.results] == wrong
    assert all(e.prediction != e.meta["label"] and e.loss is not None for e in page.results)
    shown = api.examples(SERVED_INDEX, limit=5, predict=True).results
    assert [e.prediction for e in shown] == classes[:5]
    assert all(0 < (e.confidence or 0) <= 1 for e in shown)


def test_the_gallery_filters_by_label_and_misclassified(api: Client,
                                                        server_settings: Settings) -> None:
    url = f"{api.base_url}/v1/indexes/{SERVED_INDEX}/gallery"

    def get(**params: Any) -> dict[str, Any]:
        answer = api._http.get(url, params=params, headers=api._headers())
        assert answer.status_code == 200, answer.text
        body: dict[str, Any] = answer.json()
        return body

    everything: list[dict[str, Any]] = []
    offset: int | None = 0
    while offset is not None:
        page = get(limit=500, offset=offset)
        everything += page["results"]
        offset = page["next_offset"]
    assert len(everything) == page["total"]
    threes = get(limit=500, filter=json.dumps({"label": 3}))
    assert threes["total"] == sum(g["meta"]["label"] == 3 for g in everything) > 0
    assert all(g["meta"]["label"] == 3 for g in threes["results"])
    classes = _predicted(server_settings, [g["payload"] for g in everything])
    wrong = [g["id"] for g, c in zip(everything, classes, strict=True)
             if c != g["meta"]["label"]]
    got = get(limit=500, misclassified="true")
    assert got["total"] == len(wrong) > 0 and [g["id"] for g in got["results"]] == wrong[:500]
    assert all(g["prediction"] != g["meta"]["label"] for g in got["results"])
    bad = api._http.get(url, params={"filter": json.dumps({"label": "3"})},
                        headers=api._headers())
    assert bad.status_code == 422 and "'label' holds integer values" in bad.text
