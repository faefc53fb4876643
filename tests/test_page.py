"""The web page's flows in a real headless Chromium, against a real server and an index of a task
that defines ``logits`` (digits logistic regression on 300 examples).

One index and one browser serve the whole module. Where the server may or may not offer a
field (a query's prediction and loss, ``ids`` queries, ``/v1/whoami``), the test asks the server
first and asserts what the page must show either way: the field when it is there, nothing made
up when it is not. Screenshots go to ``test-artifacts/``.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

import httpx
import pytest

from gradindex import BuildConfig, CompressionConfig, Settings, build

from .conftest import SERVED_INDEX, STORE_TASK, STORE_TASK_ARGS, LiveServer, make_key
from .test_web import ARTIFACTS, CHROMIUM, CHROMIUM_ARGS

pytestmark = pytest.mark.skipif(CHROMIUM is None,
                                reason="Chromium is not installed (.ci/run installs it)")

VIEWPORT = {"width": 1300, "height": 950}
LOSS_RTOL = 1e-2  # the page prints three significant digits


@dataclass
class Served:
    server: LiveServer
    keys: dict[str, str]

    @property
    def url(self) -> str:
        return self.server.url

    def get(self, path: str, key: str = "read") -> Any:
        response = httpx.get(self.url + path, headers=self._auth(key), timeout=60)
        response.raise_for_status()
        return response.json()

    def post(self, path: str, body: dict[str, Any], key: str = "read") -> Any:
        response = httpx.post(self.url + path, json=body, headers=self._auth(key), timeout=60)
        response.raise_for_status()
        return response.json()

    def _auth(self, key: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[key]}"}

    def influence(self, **body: Any) -> dict[str, Any]:
        return self.post(f"/v1/indexes/{SERVED_INDEX}/influence", body)["results"][0]  # type: ignore[no-any-return]

    def gallery_item(self, offset: int) -> dict[str, Any]:
        return self.get(f"/v1/indexes/{SERVED_INDEX}/gallery?limit=1&offset={offset}")["results"][0]  # type: ignore[no-any-return]

    def has_ids_queries(self) -> bool:
        schema = self.get("/openapi.json")["components"]["schemas"]["InfluenceRequest"]
        return "ids" in schema["properties"]

    def has_whoami(self) -> bool:
        return httpx.get(self.url + "/v1/whoami", headers=self._auth("read")).status_code != 404


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    settings = Settings(data_dir=tmp_path_factory.mktemp("page") / "data")
    # built here, not by the CLI: one process start less (the CLI path has its own tests)
    build(BuildConfig(name=SERVED_INDEX, task=STORE_TASK, task_args=dict(STORE_TASK_ARGS),
                      compression=CompressionConfig(batch_size=64)), settings)
    keys = {scope: make_key(settings, scope, "page")[1] for scope in ("read", "admin")}
    server = LiveServer(settings, tmp_path_factory.mktemp("page-log") / "server.log").wait()
    ARTIFACTS.mkdir(exist_ok=True)
    yield Served(server, keys)
    server.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


def open_page(browser: Any, served: Served, key: str, path: str = "/") -> Any:
    """A new browser context whose page already holds ``key`` (as a user who typed it)."""
    context = browser.new_context(viewport=VIEWPORT, accept_downloads=True)
    context.add_init_script(
        f"localStorage.setItem('gradindex-key', {json.dumps(served.keys[key])})")
    page = context.new_page()
    page.goto(served.url + path)
    return page


def pick_gallery(page: Any, n: int) -> str:
    """Click the n-th gallery card; its id, once its results are on screen."""
    from playwright.sync_api import expect

    card = page.locator("#gallery .card").nth(n)
    example_id = card.get_attribute("data-id")
    card.click()
    expect(page.locator("#proponents")).to_have_attribute("data-query", f"gallery:{example_id}")
    return str(example_id)


def shown_ids(page: Any, side: str = "proponents") -> list[str]:
    return [str(i) for i in page.locator(f"#{side} .card").evaluate_all(
        "cards => cards.map(c => c.dataset.id)")]


def ids_of(hits: list[dict[str, Any]]) -> list[str]:
    return [h["id"] for h in hits]


def test_legend_explains_scores_labels_and_version(served: Served, browser: Any) -> None:
    from playwright.sync_api import expect

    page = open_page(browser, served, "read")
    legend = page.locator("#legend")
    expect(legend).to_be_visible()
    for words in ("proponent", "opponent", "score", "Relative influence", "Self-influence",
                  "version"):
        expect(legend).to_contain_text(words)
    readme = page.locator("#readme-link")
    assert readme.get_attribute("href") == "/readme"
    assert "What the scores mean" in httpx.get(served.url + "/readme").text
    version = served.get("/v1/indexes")["indexes"][0]["version"]
    expect(page.locator("#version")).to_have_text(f"version {version}")
    assert "rebuilt" in str(page.locator("#version").get_attribute("title"))
    first = served.gallery_item(0)
    expect(page.locator("#gallery .card").first).to_contain_text(f"label {first['payload']['y']}")

    pick_gallery(page, 0)
    pro = page.locator("#proponents .score").first
    opp = page.locator("#opponents .score").first
    assert "proponent" in str(pro.get_attribute("title"))
    assert "opponent" in str(opp.get_attribute("title"))
    expect(page.locator("#proponents .card").first).to_contain_text("label ")
    page.screenshot(path=str(ARTIFACTS / "page-legend.png"), full_page=True)
    page.screenshot(path=str(ARTIFACTS / "page-influence.png"))
    page.context.close()


def test_query_card_shows_prediction_confidence_and_loss(served: Served,
                                                          browser: Any) -> None:
    from playwright.sync_api import expect

    page = open_page(browser, served, "read")
    item = served.gallery_item(2)
    pick_gallery(page, 2)
    expect(page.locator("#query-label")).to_have_text(str(item["payload"]["y"]))
    result = served.influence(examples=[item["payload"]], k=12, direction="both")
    result = {**result.get("query", {}), **result}  # on the result, or under its `query`
    if "loss" in result:  # the server scores the query: the card must say so
        loss = float(page.locator("#query-loss").inner_text())
        assert math.isclose(loss, result["loss"], rel_tol=LOSS_RTOL, abs_tol=1e-6)
    else:  # a server without it: nothing made up
        expect(page.locator("#query-loss")).to_have_count(0)
    if result.get("prediction") is not None:
        prediction = page.locator("#query-prediction")
        expect(prediction).to_contain_text(str(result["prediction"]))
        if result.get("confidence") is not None:
            expect(prediction).to_contain_text(f"{100 * result['confidence']:.1f}%")
        if result["prediction"] != item["payload"]["y"]:
            expect(prediction).to_contain_text("misclassified")
    else:
        expect(page.locator("#query-prediction")).to_have_count(0)
    for side, count in (("pro", "positives"), ("opp", "negatives")):
        if isinstance(result.get(count), int):  # how many examples help (hurt) at all
            shown = min(12, result[count])
            expect(page.locator(f"#{side}-count")).to_contain_text(
                f"{shown} shown of {result[count]}")
        else:
            expect(page.locator(f"#{side}-count")).to_have_text("")
    page.screenshot(path=str(ARTIFACTS / "page-query-card.png"))
    page.context.close()


def test_clicking_a_proponent_queries_with_that_training_example(served: Served,
                                                                  browser: Any) -> None:
    from playwright.sync_api import expect

    page = open_page(browser, served, "read")
    pick_gallery(page, 7)
    first = page.locator("#proponents .card").first
    train_id = str(first.get_attribute("data-id"))
    first.click()
    expect(page.locator("#proponents")).to_have_attribute("data-query", f"train:{train_id}")
    expect(page.locator("#query-card")).to_contain_text(f"training example {train_id}")
    assert f"query=train%3A{train_id}" in page.url

    if served.has_ids_queries():
        expected = served.influence(ids=[train_id], k=12, direction="both")
    else:  # the page's fallback: the stored payload, itself left out
        payload = served.get(f"/v1/indexes/{SERVED_INDEX}/examples/{train_id}")["payload"]
        expected = served.influence(examples=[payload], k=13, direction="both")
        for side in ("proponents", "opponents"):
            expected[side] = [h for h in expected[side] if h["id"] != train_id][:12]
    assert shown_ids(page) == ids_of(expected["proponents"])
    assert shown_ids(page, "opponents") == ids_of(expected["opponents"])
    assert train_id not in shown_ids(page)
    page.screenshot(path=str(ARTIFACTS / "page-train-to-train.png"), full_page=True)
    page.context.close()


def test_k_and_relative_influence_rerun_the_query(served: Served, browser: Any) -> None:
    from playwright.sync_api import expect

    page = open_page(browser, served, "read")
    item = served.gallery_item(5)
    pick_gallery(page, 5)
    grid = page.locator("#proponents")
    expect(grid.locator(".card")).to_have_count(12)

    page.fill("#k", "4")
    page.press("#k", "Enter")
    expect(grid).to_have_attribute("data-k", "4")
    expect(grid.locator(".card")).to_have_count(4)
    expect(page.locator("#opponents .card")).to_have_count(4)
    assert shown_ids(page) == ids_of(served.influence(examples=[item["payload"]], k=4)[
        "proponents"])

    page.check("#normalize")
    expect(grid).to_have_attribute("data-normalize", "true")
    relative = served.influence(examples=[item["payload"]], k=4, direction="both",
                                normalize=True)
    assert shown_ids(page) == ids_of(relative["proponents"])
    assert shown_ids(page, "opponents") == ids_of(relative["opponents"])

    with page.expect_download() as download:
        page.click("#export-csv")
    rows = list(csv.DictReader(io.StringIO(download.value.path().read_text())))
    assert [r["id"] for r in rows if r["side"] == "proponents"] == ids_of(relative["proponents"])
    assert [float(r["score"]) for r in rows][:4] == [h["score"] for h in relative["proponents"]]

    page.fill("#k", "12")
    page.press("#k", "Enter")
    expect(grid).to_have_attribute("data-k", "12")
    expect(grid.locator(".card")).to_have_count(12)
    assert shown_ids(page) == ids_of(served.influence(examples=[item["payload"]], k=12,
                                                      normalize=True)["proponents"])

    label = item["payload"]["y"]  # the filter box restricts the training examples searched
    page.fill("#filter", json.dumps({"label": label}))
    page.press("#filter", "Enter")
    compact = json.dumps({"label": label}, separators=(",", ":"))  # as JSON.stringify writes
    expect(grid).to_have_attribute("data-filter", compact)
    filtered = served.influence(examples=[item["payload"]], k=12, normalize=True,
                                filter={"label": label})["proponents"]
    assert shown_ids(page) == ids_of(filtered)
    assert {h["meta"]["label"] for h in filtered} == {label}
    assert "filter=" in page.url
    page.context.close()


def test_a_read_key_sees_no_delete_buttons(served: Served, browser: Any) -> None:
    from playwright.sync_api import expect

    admin = open_page(browser, served, "admin", "/?view=self")
    expect(admin.locator("#self-table tbody tr")).to_have_count(25)
    expect(admin.locator("button.delete")).to_have_count(25)
    admin.context.close()

    page = open_page(browser, served, "read", "/?view=self")
    rows = page.locator("#self-table tbody tr")
    expect(rows).to_have_count(25)
    victim = str(rows.first.get_attribute("data-id"))
    if served.has_whoami():  # the server tells the key's scope: nothing to click at all
        expect(page.locator("#scope")).to_have_text("read-only key")
    else:  # a server that cannot: its first refusal hides every delete button
        page.on("dialog", lambda dialog: dialog.accept())
        rows.first.locator("button.delete").click()
        expect(page.locator("#status")).to_contain_text("403")
    expect(page.locator("button.delete")).to_have_count(0)
    second = rows.nth(1).get_attribute("data-id")
    rows.nth(1).locator("td.example").click()  # still browsable: query with the example
    expect(page.locator("#proponents")).to_have_attribute("data-query", f"train:{second}")
    page.context.close()
    assert served.get(f"/v1/indexes/{SERVED_INDEX}/examples/{victim}")["id"] == victim


def test_histogram_bin_click_lists_that_bins_examples(served: Served, browser: Any) -> None:
    from playwright.sync_api import expect

    page = open_page(browser, served, "read", "/?view=self")
    bins = page.locator("#histogram g.bin-group")
    expect(bins).to_have_count(40)
    assert page.locator("#histogram text.ytick").count() >= 3  # a y-axis with counts
    assert page.locator("#histogram text.xtick").count() >= 5  # x ticks, not just min and max
    expect(page.locator("#histogram")).to_contain_text("examples")

    hist = served.get(f"/v1/indexes/{SERVED_INDEX}/self-influence/histogram?bins=40&log=true")
    i = max((j for j, c in enumerate(hist["counts"]) if 2 <= c <= 25),
            key=lambda j: hist["counts"][j])
    lo, hi = hist["edges"][i], hist["edges"][i + 1]
    bins.nth(i).locator("rect.hit").click()
    rows = page.locator("#self-table tbody tr")
    expect(rows).to_have_count(hist["counts"][i])
    expect(page.locator("#self-filter")).to_contain_text(f"{hist['counts'][i]} examples")
    ranked = served.get(f"/v1/indexes/{SERVED_INDEX}/self-influence?limit=1000")["results"]
    last = len(hist["counts"]) - 1  # the outer bins are open: they hold the min and the max
    in_bin = {r["id"] for r in ranked
              if (i == 0 or lo <= r["self_influence"]) and (i == last or r["self_influence"] < hi)}
    assert set(rows.evaluate_all("rs => rs.map(r => r.dataset.id)")) == in_bin
    assert "bin=" in page.url
    page.screenshot(path=str(ARTIFACTS / "page-histogram-bin.png"), full_page=True)

    page.click("#self-all")
    expect(rows).to_have_count(25)
    page.context.close()


def test_a_shared_url_restores_the_same_view(served: Served, browser: Any) -> None:
    from playwright.sync_api import expect

    page = open_page(browser, served, "read")
    page.fill("#k", "5")
    page.press("#k", "Enter")
    page.check("#normalize")
    pick_gallery(page, 11)
    first = page.locator("#proponents .card").first
    train_id = str(first.get_attribute("data-id"))
    first.click()
    grid = page.locator("#proponents")
    expect(grid).to_have_attribute("data-query", f"train:{train_id}")
    ids, scores = shown_ids(page), page.locator("#proponents .score").all_inner_texts()
    assert len(ids) == 5
    link = page.url

    other = open_page(browser, served, "read", link.removeprefix(served.url))
    grid2 = other.locator("#proponents")
    expect(grid2).to_have_attribute("data-query", f"train:{train_id}")
    expect(other.locator("#k")).to_have_value("5")
    expect(other.locator("#normalize")).to_be_checked()
    assert grid2.get_attribute("data-normalize") == "true"
    assert shown_ids(other) == ids
    assert other.locator("#proponents .score").all_inner_texts() == scores
    expect(other.locator("#query-card")).to_contain_text(f"training example {train_id}")
    other.screenshot(path=str(ARTIFACTS / "page-shared-link.png"))
    other.context.close()

    # a pasted payload travels in the link too
    payload = served.gallery_item(3)["payload"]
    page.locator("#json-block summary").click()
    page.fill("#payload", json.dumps(payload))
    page.click("#payload-go")
    expect(grid).to_have_attribute("data-query", page.evaluate(
        "() => new URLSearchParams(location.search).get('query')"))
    fields = page.locator("#query-card table.fields")  # no render for a pasted payload
    expect(fields).to_contain_text("64 numbers")
    expect(page.locator("#query-label")).to_have_text(str(payload["y"]))
    pasted_ids = shown_ids(page)
    third = page.context.new_page()
    third.goto(page.url)
    expect(third.locator("#proponents .card")).to_have_count(5)
    assert shown_ids(third) == pasted_ids
    page.context.close()


def test_gallery_filters_by_label_and_jumps_to_a_page(served: Served, browser: Any) -> None:
    from playwright.sync_api import expect

    page = open_page(browser, served, "read")
    label = page.locator("#gallery-label")
    expect(label.locator("option")).to_have_count(11)  # all, and the ten digits
    label.select_option("3")
    gallery = [item for offset in range(0, 2000, 500) for item in served.get(
        f"/v1/indexes/{SERVED_INDEX}/gallery?limit=500&offset={offset}")["results"]]
    threes = {item["id"]: item["payload"] for item in gallery if item["payload"]["y"] == 3}
    total = len(threes)
    expect(page.locator("#gallery-pos")).to_have_text(f"1–24 of {total}")
    captions = page.locator("#gallery .card .caption").all_inner_texts()
    assert len(captions) == 24 and all("label 3" in c.splitlines() for c in captions)
    last = math.ceil(total / 24)
    page.fill("#gallery-page", str(last))
    page.press("#gallery-page", "Enter")
    expect(page.locator("#gallery-pos")).to_have_text(f"{(last - 1) * 24 + 1}–{total} of {total}")

    schemas = served.get("/openapi.json")["components"]["schemas"]
    if "prediction" in schemas["InfluenceResult"]["properties"]:  # the model can tell
        results = served.post(f"/v1/indexes/{SERVED_INDEX}/influence",
                              {"examples": list(threes.values()), "k": 1})["results"]
        expected = [i for i, r in zip(threes, results, strict=True) if r["prediction"] != 3]
        page.check("#gallery-misclassified")
        shown = min(24, len(expected))
        expect(page.locator("#gallery-pos")).to_have_text(
            f"1–{shown} of {len(expected)}" if expected else "no example")
        cards = page.locator("#gallery .card")
        assert cards.evaluate_all("cs => cs.map(c => c.dataset.id)") == expected[:24]
        expect(cards.locator(".predicted.wrong")).to_have_count(shown)
    else:  # a server that does not say: no such filter offered
        expect(page.locator("#misclassified-box")).to_be_hidden()
    page.context.close()


def test_docs_and_redoc_render_offline(served: Served, browser: Any) -> None:
    from playwright.sync_api import expect

    spec = served.get("/openapi.json")
    operations = sum(1 for methods in spec["paths"].values() for m in methods
                     if m in ("get", "post", "put", "patch", "delete"))
    context = browser.new_context(viewport=VIEWPORT)
    left: list[str] = []

    def loopback_only(route: Any) -> None:
        if urlparse(route.request.url).hostname in ("127.0.0.1", "localhost"):
            route.continue_()
        else:
            left.append(route.request.url)
            route.abort()

    context.route("**/*", loopback_only)
    page = context.new_page()
    missing: list[str] = []
    page.on("response", lambda r: missing.append(r.url) if r.status == 404 else None)

    page.goto(served.url + "/docs")
    expect(page.locator(".opblock")).to_have_count(operations)
    expect(page.locator(".opblock-summary-path", has_text="/v1/indexes/{name}/influence")
           ).to_have_count(1)
    page.screenshot(path=str(ARTIFACTS / "docs-offline.png"))

    page.goto(served.url + "/redoc")
    expect(page.locator('[data-section-id^="operation/"]')).to_have_count(operations)
    page.screenshot(path=str(ARTIFACTS / "redoc-offline.png"))

    page.goto(served.url + "/")
    icon = page.request.get(served.url + "/favicon.ico")
    assert icon.status == 200 and icon.headers["content-type"] == "image/x-icon"
    assert icon.body()[:4] == b"\x00\x00\x01\x00"  # an ICO file
    expect(page.locator("#status")).to_contain_text("401")  # no key in this context
    assert not [u for u in missing if "favicon" in u or "/static/" in u]
    assert left == []  # nothing on these pages tried to leave the machine
    context.close()
