"""The demo as a newcomer meets it: built by ``gradindex demo --build-only``, served, queried
through the client, and used through the web page in a real headless Chromium."""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest
from gradindex_client import Client, NotFound

from gradindex import Settings
from gradindex.indexer.tasks import load_digits_split

from .conftest import REPO, LiveServer, gradindex_cli, make_key

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LiveServer, dict[str, str]]]:
    """The demo index built by the CLI, served with API keys on."""
    settings = Settings(data_dir=tmp_path_factory.mktemp("demo") / "data")
    gradindex_cli(settings, "demo", "--build-only")
    keys = {scope: make_key(settings, scope, "web")[1] for scope in ("read", "admin")}
    log = tmp_path_factory.mktemp("demo-log") / "server.log"
    server = LiveServer(settings, log).wait()
    yield server, keys
    server.stop()


def test_demo_build_path_answers_through_the_client(demo) -> None:
    server, keys = demo
    _, _, x_test, y_test = load_digits_split()
    payload = {"x": [float(v) for v in x_test[0]], "y": int(y_test[0])}
    with Client(server.url, api_key=keys["read"]) as api:
        assert [i.name for i in api.indexes()] == ["digits"]
        result = api.influence("digits", [payload], k=10, direction="both").results[0]
        assert len(result.proponents) == 10 and len(result.opponents) == 10
        assert result.proponents[0].score > 0 > result.opponents[0].score
        labels = [h.meta["label"] for h in result.proponents]
        assert labels.count(payload["y"]) >= 5  # a digit's proponents mostly share its label


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (.ci/run installs it)")
def test_web_page_queries_browses_and_deletes(demo) -> None:
    from playwright.sync_api import expect, sync_playwright

    server, keys = demo
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1300, "height": 950})
        page.goto(server.url + "/")
        # with keys on, the page asks for one before it can list the indexes
        expect(page.locator("#status")).to_contain_text("401")
        page.fill("#api-key", keys["admin"])
        page.dispatch_event("#api-key", "change")
        expect(page.locator("#index-select")).to_contain_text("digits")

        gallery = page.locator("#gallery .card")
        expect(gallery).to_have_count(24)
        assert gallery.first.locator("canvas").count() == 1  # digits are drawn as images
        gallery.nth(2).click()
        proponents = page.locator("#proponents .card")
        expect(proponents).to_have_count(12)
        assert proponents.locator("canvas").count() == 12
        scores = [float(s) for s in proponents.locator(".score").all_inner_texts()]
        assert scores == sorted(scores, reverse=True) and scores[-1] > 0
        opponents = [float(s) for s in page.locator("#opponents .score").all_inner_texts()]
        assert len(opponents) == 12 and max(opponents) < 0
        page.screenshot(path=str(ARTIFACTS / "web-influence.png"), full_page=True)

        page.click("#tab-self")
        rows = page.locator("#self-table tbody tr")
        expect(rows).to_have_count(25)
        first_id = rows.first.get_attribute("data-id")
        assert first_id
        bins = page.locator("#histogram g.bin-group")
        expect(bins).to_have_count(40)
        counts = [int(c or 0) for c in bins.evaluate_all(
            "gs => gs.map(g => g.getAttribute('data-count'))")]
        assert sum(counts) > 0
        page.on("dialog", lambda dialog: dialog.accept())
        rows.first.locator("button.delete").click()
        expect(page.locator("#status")).to_contain_text(f"deleted {first_id}")
        expect(page.locator(f'#self-table tbody tr[data-id="{first_id}"]')).to_have_count(0)
        page.screenshot(path=str(ARTIFACTS / "web-self-influence.png"), full_page=True)
        browser.close()

    with Client(server.url, api_key=keys["read"]) as api, pytest.raises(NotFound):
        api.example("digits", first_id)
