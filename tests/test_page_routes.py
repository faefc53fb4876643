"""What the server hands a browser besides the API: the page and its script, the favicon, the
README the legend links to, and the API docs with their assets from the installed package."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from gradindex.server.app import create_app
from gradindex.server.settings import ServerSettings


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> TestClient:
    data_dir: Path = tmp_path_factory.mktemp("routes") / "data"
    return TestClient(create_app(ServerSettings(data_dir=data_dir)))  # no lifespan: no index


def test_the_page_loads_its_script_and_icon_from_the_server(client: TestClient) -> None:
    page = client.get("/")
    assert page.status_code == 200
    assert '<script src="/static/page.js"></script>' in page.text
    assert '<link rel="icon" href="/favicon.ico">' in page.text
    script = client.get("/static/page.js")
    assert script.status_code == 200 and script.headers["content-type"].startswith(
        "text/javascript")
    assert "async function attribute()" in script.text
    icon = client.get("/favicon.ico")
    assert icon.status_code == 200 and icon.content[:4] == b"\x00\x00\x01\x00"


@pytest.mark.parametrize("path", ["/static/../page.py", "/static/index.html.bak",
                                  "/static/docs/../../page.py", "/static/docs/favicon.png"])
def test_only_listed_files_are_served(client: TestClient, path: str) -> None:
    response = client.get(path)
    assert response.status_code == 404
    assert "APIRouter" not in response.text  # never the source next to the static files


def test_an_unknown_page_file_is_named_in_the_404(client: TestClient) -> None:
    response = client.get("/static/app.js")
    assert response.status_code == 404
    assert response.json()["error"]["message"] == (
        "no page file 'app.js'; the page has ['favicon.ico', 'page.js']")


def test_the_readme_the_legend_links_to_is_served(client: TestClient) -> None:
    response = client.get("/readme")
    assert response.status_code == 200
    assert "## What the scores mean" in response.text


@pytest.mark.parametrize(("path", "assets"), [
    ("/docs", ["/static/docs/swagger-ui-bundle.js", "/static/docs/swagger-ui.css"]),
    ("/redoc", ["/static/docs/redoc.standalone.js"]),
])
def test_docs_pages_load_only_local_assets(client: TestClient, path: str,
                                           assets: list[str]) -> None:
    page = client.get(path)
    assert page.status_code == 200
    assert "cdn." not in page.text and "fonts.googleapis" not in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    for asset in assets:
        assert f'"{asset}"' in page.text or f"'{asset}'" in page.text
        served = client.get(asset)
        assert served.status_code == 200 and len(served.content) > 100_000  # the real bundle


def test_the_openapi_document_still_lists_the_api_not_the_page(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    assert "/v1/indexes/{name}/influence" in paths
    assert not {"/", "/docs", "/redoc", "/readme", "/favicon.ico"} & set(paths)
