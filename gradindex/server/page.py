"""The web page at ``/``: one static file that talks to the ``/v1`` API like any client.

It needs no build step: choose an index, pick a test example from the task's gallery (or paste
a payload), see its proponents and opponents rendered by the task; browse self-influence with
its histogram, and delete an example with an admin key (typed into the page, kept in the
browser's local storage, sent as ``Authorization: Bearer``).
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

__all__ = ["page_router"]

PAGE = Path(__file__).parent / "static" / "index.html"

page_router = APIRouter(include_in_schema=False)


@cache
def _page() -> str:
    return PAGE.read_text(encoding="utf-8")


@page_router.get("/", response_class=HTMLResponse)
async def index_page() -> HTMLResponse:
    return HTMLResponse(_page(), headers={"Cache-Control": "no-cache"})
