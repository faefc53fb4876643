"""Where indexes live: the data directory and the database, read from ``GRADINDEX_*``.

Defaults work with neither variable set: ``./.gradindex`` and a SQLite file inside it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError

__all__ = ["Settings"]

DATA_DIR_ENV = "GRADINDEX_DATA_DIR"
DATABASE_URL_ENV = "GRADINDEX_DATABASE_URL"
DEFAULT_DATA_DIR = ".gradindex"
SQLITE_NAME = "gradindex.db"
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def check_name(name: str) -> str:
    """``name`` if it is a valid index name (it becomes a folder name), else a ConfigError."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise ConfigError(
            f"`name` must be 1-128 letters, digits, '.', '_' or '-' and start with a letter or "
            f"digit, got {name!r}"
        )
    return name


@dataclass(frozen=True)
class Settings:
    """Storage locations shared by the build pipeline, the reader and the CLI."""

    data_dir: Path = Path(DEFAULT_DATA_DIR)
    """Folder holding one subfolder per index (staging chunks and published versions) and, by
    default, the SQLite database."""

    database_url: str | None = None
    """SQLAlchemy URL (``postgresql+psycopg://user@host/db`` for deployments); ``None`` means a
    SQLite file ``gradindex.db`` in `data_dir`."""

    retain_versions: int = 2
    """Published versions kept per index (the current one included); a reader that opened the
    previous version keeps working while a new one is published."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "data_dir", Path(self.data_dir).expanduser().absolute())
        if self.database_url is not None and "://" not in self.database_url:
            raise ConfigError(
                f"`database_url` must be an SQLAlchemy URL such as "
                f"'postgresql+psycopg://user@host/db', got {self.database_url!r}"
            )
        if not isinstance(self.retain_versions, int) or self.retain_versions < 1:
            raise ConfigError(
                f"`retain_versions` must be a positive integer, got {self.retain_versions!r}"
            )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Settings from ``GRADINDEX_DATA_DIR`` and ``GRADINDEX_DATABASE_URL``."""
        env = os.environ if environ is None else environ
        return cls(
            data_dir=Path(env.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR),
            database_url=env.get(DATABASE_URL_ENV) or None,
        )

    @property
    def url(self) -> str:
        """The database URL actually used."""
        return self.database_url or f"sqlite:///{self.data_dir / SQLITE_NAME}"

    @property
    def is_sqlite(self) -> bool:
        return self.url.startswith("sqlite")

    def index_dir(self, name: str) -> Path:
        """The folder of one index: ``staging/``, ``versions/`` and its lock file."""
        check_name(name)
        return self.data_dir / "indexes" / name
