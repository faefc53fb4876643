"""What the web page browses: the task's query gallery and the self-influence histogram.

Both are paged or summarised on the server, so the page stays light at 1e5+ examples.
"""

from __future__ import annotations

import weakref
from typing import Annotated, Any

from fastapi import APIRouter, Query
from fastapi.concurrency import run_in_threadpool

from gradindex.indexer.filters import matches, parse_filter

from .auth import ReadKey
from .indexes import Served
from .predicted import check_can_tell, gallery_cache, is_misclassified, predict_many
from .routes import ERRORS, FilterParam, IndexDep, parse_filter_param, render_payload
from .schemas import GalleryItem, GalleryPage, Histogram

__all__ = ["browse_router"]

browse_router = APIRouter(prefix="/v1/indexes", tags=["browse"], responses=ERRORS)

Item = tuple[str, Any, dict[str, Any]]
_galleries: weakref.WeakKeyDictionary[Any, list[Item]] = weakref.WeakKeyDictionary()


def _metadata(served: Served, payload: Any) -> dict[str, Any]:
    try:
        return served.task.metadata(payload)
    except Exception:  # noqa: BLE001 - a gallery item the task cannot describe: no metadata
        return {}


def _gallery(served: Served) -> list[Item]:
    """``task.queries()`` as ``(id, payload, metadata)``, read once per task."""
    task = served.task
    found = _galleries.get(task)
    if found is None:
        found = _galleries[task] = [(i, p, _metadata(served, p)) for i, p in task.queries()]
    return found


@browse_router.get("/{name}/gallery", response_model=GalleryPage)
async def gallery(
    _key: ReadKey, served: IndexDep,
    limit: Annotated[int, Query(ge=1, le=500, description="Examples per page.")] = 24,
    offset: Annotated[int, Query(ge=0, le=2**62, description="Examples to skip.")] = 0,
    filter: FilterParam = None,
    misclassified: Annotated[bool, Query(
        description="Only examples whose predicted class differs from their `label` "
                    "metadata (tasks with `logits`; 422 otherwise).")] = False,
    predict: Annotated[bool, Query(
        description="Add each example's `prediction`, `confidence` and `loss`.")] = False,
) -> GalleryPage:
    """Held-out examples the task offers to query with (``task.queries()``), rendered, with
    their metadata; filtered like the training examples, or to the misclassified ones."""
    node = parse_filter(parse_filter_param(filter), served.index.metadata_schema)
    if misclassified:
        check_can_tell(served)
    items = await run_in_threadpool(_gallery, served)
    chosen = [item for item in items if matches(node, item[2])]
    cache = gallery_cache(served)
    if misclassified:
        found = await predict_many(served, [(i, p) for i, p, _ in chosen], cache)
        chosen = [item for item in chosen if is_misclassified(item[2], found[item[0]])]
    page = chosen[offset : offset + limit]
    shown = {}
    if predict or misclassified:
        shown = await predict_many(served, [(i, p) for i, p, _ in page], cache)
    results = []
    for i, p, m in page:
        view = shown.get(i)
        results.append(GalleryItem(
            id=i, payload=p, render=render_payload(served, p), meta=m,
            prediction=view.prediction if view else None,
            confidence=view.confidence if view else None, loss=view.loss if view else None))
    return GalleryPage(index=served.index.name, total=len(chosen), limit=limit, offset=offset,
                       next_offset=offset + limit if offset + limit < len(chosen) else None,
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
