"""API keys of the server: created with a random secret shown once, stored as its SHA-256.

A secret carries 256 random bits, so a plain SHA-256 is enough to make a leaked table useless
(no slow password hash is needed), and a key is found by its hash in one indexed look-up.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from ..errors import ConfigError, GradindexError
from .db import ApiKey

__all__ = [
    "SCOPES",
    "KeyInfo",
    "KeyNotFound",
    "create_key",
    "hash_secret",
    "list_keys",
    "revoke_key",
    "verify_key",
]

SCOPES = ("read", "admin")
"""``read`` queries and looks up; ``admin`` may also delete examples."""

SECRET_PREFIX = "gik_"


class KeyNotFound(GradindexError, KeyError):
    """No API key with that id (or it was already revoked)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "key not found"


@dataclass(frozen=True)
class KeyInfo:
    """An API key as listed: never its secret."""

    id: int
    name: str
    scope: str
    prefix: str
    created_at: datetime
    revoked_at: datetime | None

    @property
    def active(self) -> bool:
        return self.revoked_at is None

    def allows(self, scope: str) -> bool:
        """Whether this key may do what ``scope`` needs (``admin`` includes ``read``)."""
        return self.active and (self.scope == "admin" or self.scope == scope)


def _info(row: ApiKey) -> KeyInfo:
    return KeyInfo(row.id, row.name, row.scope, row.prefix, row.created_at, row.revoked_at)


def hash_secret(secret: str) -> str:
    """The stored form of a secret: its SHA-256, hex."""
    return hashlib.sha256(secret.encode()).hexdigest()


def create_key(*, engine: Engine, scope: str, name: str = "") -> tuple[KeyInfo, str]:
    """Create a key; returns it and its secret, which is not stored and cannot be shown again.

    Raises:
        ConfigError: ``scope`` is not one of :data:`SCOPES`, or ``name`` is too long.
    """
    if scope not in SCOPES:
        raise ConfigError(f"`scope` must be one of {list(SCOPES)}, got {scope!r}")
    if len(name) > 128:
        raise ConfigError(f"`name` must be at most 128 characters, got {len(name)}")
    secret = SECRET_PREFIX + secrets.token_urlsafe(32)
    with Session(engine, expire_on_commit=False) as session, session.begin():
        row = ApiKey(name=name, scope=scope, prefix=secret[: len(SECRET_PREFIX) + 6],
                     key_hash=hash_secret(secret), created_at=datetime.now(UTC))
        session.add(row)
        session.flush()
        return _info(row), secret


def list_keys(*, engine: Engine, include_revoked: bool = True) -> list[KeyInfo]:
    """Every key, oldest first."""
    query = select(ApiKey).order_by(ApiKey.id)
    if not include_revoked:
        query = query.where(ApiKey.revoked_at.is_(None))
    with Session(engine) as session:
        return [_info(r) for r in session.scalars(query)]


def revoke_key(*, engine: Engine, key_id: int) -> KeyInfo:
    """Revoke a key for good; requests carrying it get 401 from then on.

    Raises:
        KeyNotFound: no active key with that id.
    """
    with Session(engine, expire_on_commit=False) as session, session.begin():
        row = session.get(ApiKey, key_id)
        if row is None or row.revoked_at is not None:
            raise KeyNotFound(f"no active API key with id {key_id}; `gradindex keys list` "
                              "shows the keys")
        row.revoked_at = datetime.now(UTC)
        return _info(row)


def verify_key(*, engine: Engine, secret: str) -> KeyInfo | None:
    """The active key whose secret this is, or None."""
    if not secret.startswith(SECRET_PREFIX) or len(secret) > 256:
        return None
    with Session(engine) as session:
        row = session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_secret(secret),
                                                  ApiKey.revoked_at.is_(None)))
        return None if row is None else _info(row)
