"""API-key auth: ``Authorization: Bearer <secret>``, checked against the stored hashes.

``ReadKey`` and ``AdminKey`` are the dependencies routes declare; with ``GRADINDEX_AUTH=off``
(loopback only) they let every request through and give ``None``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated

from fastapi import Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from gradindex.indexer.store import KeyInfo, connect, verify_key

from .errors import Forbidden, Unauthorized
from .settings import ServerSettings

__all__ = ["AdminKey", "ReadKey", "require_scope"]

bearer = HTTPBearer(auto_error=False, description="An API key from `gradindex keys create`.")


def require_scope(scope: str) -> Callable[..., Awaitable[KeyInfo | None]]:
    """A dependency that admits requests whose key allows ``scope``."""

    async def check(
        request: Request,
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    ) -> KeyInfo | None:
        settings: ServerSettings = request.app.state.settings
        if not settings.auth_required:
            return None
        if credentials is None or not credentials.credentials:
            raise Unauthorized("this request needs an API key: send `Authorization: Bearer "
                               "<key>`; `gradindex keys create` makes one")
        engine = connect(settings.storage())
        key = await run_in_threadpool(lambda: verify_key(engine=engine,
                                                         secret=credentials.credentials))
        if key is None:
            raise Unauthorized("the API key is unknown or revoked")
        if not key.allows(scope):
            raise Forbidden(f"this request needs a key with scope {scope!r}; this key has "
                            f"{key.scope!r}")
        return key

    return check


ReadKey = Annotated[KeyInfo | None, Depends(require_scope("read"))]
AdminKey = Annotated[KeyInfo | None, Depends(require_scope("admin"))]
