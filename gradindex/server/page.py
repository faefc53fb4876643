"""What a browser gets: the web page at ``/``, its favicon, and the API docs at ``/docs`` and
``/redoc``, all served from local files so they work on a network without internet.

The page needs no build step: ``static/index.html`` (markup and style) and ``static/page.js``
talk to the ``/v1`` API like any client. Choose an index, pick a test example from the task's
gallery (or paste a payload, or click any training example), see its proponents and opponents
rendered by the task; browse self-influence with its histogram, and delete an example with an
admin key (typed into the page, kept in the browser's local storage, sent as ``Authorization:
Bearer``).

Swagger UI and ReDoc come from the ``fastapi-offline`` distribution, which ships their bundles
(a maintained package, so the assets are upgraded with ``pip``, not copied into this repo);
FastAPI's own ``/docs`` loads them from a CDN and shows a blank page offline.
"""

from __future__ import annotations

import importlib.metadata
from functools import cache
from pathlib import Path

import fastapi_offline
from fastapi import APIRouter, Request
from fastapi.openapi.docs import (
    get_redoc_html,
    get_swagger_ui_html,
    get_swagger_ui_oauth2_redirect_html,
)
from fastapi.responses import FileResponse, HTMLResponse, PlainTextResponse, Response

from gradindex.indexer.errors import ExampleNotFound

__all__ = ["page_router"]

STATIC = Path(__file__).parent / "static"
PAGE = STATIC / "index.html"
DOCS_STATIC = Path(fastapi_offline.__file__).parent / "static"

PAGE_FILES = {"page.js": "text/javascript", "favicon.ico": "image/x-icon"}
"""The page's own files under ``/static/`` (a fixed list: no path reaches elsewhere)."""

DOCS_FILES = {"swagger-ui-bundle.js": "text/javascript", "swagger-ui.css": "text/css",
              "redoc.standalone.js": "text/javascript"}
"""Swagger UI's and ReDoc's bundles under ``/static/docs/``."""

OAUTH2_REDIRECT = "/docs/oauth2-redirect"

DOCS_POLICY = ("default-src 'self'; script-src 'self' 'unsafe-inline'; "
               "style-src 'self' 'unsafe-inline'; img-src 'self' data:; font-src 'self' data:; "
               "worker-src 'self' blob:; connect-src 'self'")
"""The docs pages load nothing from elsewhere (ReDoc's bundle, for one, asks a CDN for its
logo): on a private network such a request would leak that the docs were opened, and wait."""

page_router = APIRouter(include_in_schema=False)


@cache
def _page() -> str:
    return PAGE.read_text(encoding="utf-8")


@cache
def _readme() -> str | None:
    """The README, as the installed distribution carries it (its long description)."""
    try:
        meta = importlib.metadata.metadata("gradindex")
    except importlib.metadata.PackageNotFoundError:
        return None
    text = meta.get_payload() or meta.get("Description")  # type: ignore[attr-defined]
    return str(text) if text else None


def _file(path: Path, media_type: str, max_age: int) -> FileResponse:
    return FileResponse(path, media_type=media_type,
                        headers={"Cache-Control": f"public, max-age={max_age}"
                                 if max_age else "no-cache"})


@page_router.get("/", response_class=HTMLResponse)
async def index_page() -> HTMLResponse:
    return HTMLResponse(_page(), headers={"Cache-Control": "no-cache"})


@page_router.get("/static/{name}")
async def page_file(name: str) -> Response:
    media_type = PAGE_FILES.get(name)
    if media_type is None:
        raise ExampleNotFound(f"no page file {name!r}; the page has {sorted(PAGE_FILES)}")
    return _file(STATIC / name, media_type, 0)


@page_router.get("/favicon.ico")
async def favicon() -> Response:
    return _file(STATIC / "favicon.ico", PAGE_FILES["favicon.ico"], 86400)


@page_router.get("/readme", response_class=PlainTextResponse)
async def readme() -> PlainTextResponse:
    """The README as plain text: what the page's legend links to."""
    text = _readme()
    if text is None:
        raise ExampleNotFound("this installation carries no README")
    return PlainTextResponse(text, headers={"Cache-Control": "no-cache"})


# ------------------------------------------------------------------ API docs, offline


def _self_only(page: HTMLResponse) -> HTMLResponse:
    page.headers["Content-Security-Policy"] = DOCS_POLICY
    return page


@page_router.get("/static/docs/{name}")
async def docs_file(name: str) -> Response:
    media_type = DOCS_FILES.get(name)
    if media_type is None:
        raise ExampleNotFound(f"no docs file {name!r}; the docs have {sorted(DOCS_FILES)}")
    return _file(DOCS_STATIC / name, media_type, 86400)


@page_router.get("/docs", response_class=HTMLResponse)
async def swagger_ui(request: Request) -> HTMLResponse:
    root = request.scope.get("root_path", "")
    return _self_only(get_swagger_ui_html(
        openapi_url=f"{root}{request.app.openapi_url}", title="gradindex API",
        oauth2_redirect_url=f"{root}{OAUTH2_REDIRECT}",
        swagger_js_url=f"{root}/static/docs/swagger-ui-bundle.js",
        swagger_css_url=f"{root}/static/docs/swagger-ui.css",
        swagger_favicon_url=f"{root}/favicon.ico",
        swagger_ui_parameters={"validatorUrl": None}))


@page_router.get(OAUTH2_REDIRECT, response_class=HTMLResponse)
async def swagger_ui_redirect() -> HTMLResponse:
    return get_swagger_ui_oauth2_redirect_html()


@page_router.get("/redoc", response_class=HTMLResponse)
async def redoc(request: Request) -> HTMLResponse:
    root = request.scope.get("root_path", "")
    return _self_only(get_redoc_html(
        openapi_url=f"{root}{request.app.openapi_url}", title="gradindex API (ReDoc)",
        redoc_js_url=f"{root}/static/docs/redoc.standalone.js",
        redoc_favicon_url=f"{root}/favicon.ico", with_google_fonts=False))
