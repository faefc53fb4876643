"""Index administration that needs no model: list, describe and delete indexes.

Kept apart from the build pipeline so that the command line's ``list``, ``info`` and ``delete``
(and the server's listings) never import torch.
"""

from __future__ import annotations

import logging
import shutil
from typing import Any

from sqlalchemy.orm import Session

from .errors import IndexNotFound
from .settings import Settings, check_name
from .store import connect, delete_index_rows, list_index_rows

__all__ = ["delete_index", "index_info", "list_indexes"]

log = logging.getLogger(__name__)



def list_indexes(settings: Settings) -> list[dict[str, Any]]:
    """Every index: name, current version, live example count and its manifest."""
    with Session(connect(settings)) as session:
        return list_index_rows(session=session)


def index_info(settings: Settings, name: str) -> dict[str, Any]:
    """One index's listing entry, with its staging state.

    Raises:
        IndexNotFound: no index of that name.
    """
    check_name(name)
    for row in list_indexes(settings):
        if row["name"] == name:
            return row
    raise IndexNotFound(f"no index named {name!r}; `gradindex list` shows the indexes")


def delete_index(settings: Settings, name: str) -> None:
    """Delete index ``name``: its rows, versions and staged gradients.

    Raises:
        IndexNotFound: no index of that name (and nothing staged under it).
    """
    index_dir = settings.index_dir(name)
    engine = connect(settings)
    try:
        with Session(engine) as session, session.begin():
            delete_index_rows(session=session, name=name)
    except IndexNotFound:
        if not index_dir.exists():
            raise
    shutil.rmtree(index_dir, ignore_errors=True)
    log.info("index %r deleted", name)
