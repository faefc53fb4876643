"""What the web page browses: the task's query gallery and the self-influence histogram.

Both are paged or summarised on the server, so the page stays light at 1e5+ examples.
"""

from __future__ import annotations

import weakref
from typing import Annotated, Any

from fastapi import APIRouter, Query
from fastapi.concurrency import run_in_threadpool

from .auth import ReadKey
from .indexes import Served
from .routes import ERRORS, IndexDep, render_payload
from .schemas import GalleryItem, GalleryPage, Histogram

__all__ = ["browse_router"]

browse_router = APIRouter(prefix="/v1/indexes", tags=["browse"], responses=ERRORS)

_galleries: weakref.WeakKeyDictionary[Any, list[tuple[str, Any]]] = weakref.WeakKeyDictionary()


def _gallery(served: Served) -> list[tuple[str, Any]]:
    """``task.queries()`` as ``(id, payload)`` pairs, read once per task."""
    task = served.task
    found = _galleries.get(task)
    if found is None:
        found = _galleries[task] = task.queries()
    return found


@browse_router.get("/{name}/gallery", response_model=GalleryPage)
async def gallery(
    _key: ReadKey, served: IndexDep,
    limit: Annotated[int, Query(ge=1, le=500, description="Examples per page.")] = 24,
    offset: Annotated[int, Query(ge=0, le=2**62, description="Examples to skip.")] = 0,
) -> GalleryPage:
    """Held-out examples the task offers to query with (``task.queries()``), rendered."""
    items = await run_in_threadpool(_gallery, served)
    page = items[offset : offset + limit]
    results = [GalleryItem(id=i, payload=p, render=render_payload(served, p)) for i, p in page]
    return GalleryPage(index=served.index.name, total=len(items), limit=limit, offset=offset,
                       next_offset=offset + limit if offset + limit < len(items) else None,
                       results=results)


@browse_router.get("/{name}/self-influence/histogram", response_model=Histogram)
async def self_influence_histogram(
    _key: ReadKey, served: IndexDep,
    bins: Annotated[int, Query(ge=1, le=1000, description="Number of bins.")] = 40,
    log: Annotated[bool, Query(description="Bins evenly spaced in log10.")] = False,
) -> Histogram:
    """The distribution of self-influence over the live training examples."""
    edges, counts = await run_in_threadpool(
        lambda: served.index.self_influence_histogram(bins, log=log))
    return Histogram(index=served.index.name, version=served.index.version,
                     count=int(counts.sum()), log=log, edges=[float(e) for e in edges],
                     counts=[int(c) for c in counts])
