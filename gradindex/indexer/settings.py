"""Where indexes live, read from ``GRADINDEX_*``: the one settings source of gradindex.

:class:`Settings` holds what the build pipeline, the reader, the command line and the server
share (the data directory and the database); the server's own settings extend it
(``gradindex.server.settings.ServerSettings``), so every ``GRADINDEX_*`` variable is read in one
place. Defaults work with nothing set: ``./.gradindex`` and a SQLite file inside it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from .errors import ConfigError

__all__ = ["Settings", "check_name"]

ENV_PREFIX = "GRADINDEX_"
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


def _problems(exc: ValidationError, prefix: str) -> str:
    parts = []
    for err in exc.errors():
        field = ".".join(str(p) for p in err["loc"])
        message = str(err["msg"]).removeprefix("Value error, ")
        parts.append(f"`{field}` ({prefix}{field.upper()}): {message}" if field else message)
    return "; ".join(parts)


class Settings(BaseSettings):
    """Storage locations shared by the build pipeline, the reader, the CLI and the server.

    Each field is read from ``GRADINDEX_<FIELD>`` unless given; a bad value raises
    :class:`~gradindex.indexer.errors.ConfigError` naming the field and its variable.
    """

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, frozen=True, extra="ignore")

    data_dir: Path = Field(
        default=Path(DEFAULT_DATA_DIR),
        description="Folder of the indexes (staging chunks, published versions, recorded task "
                    "files and weights) and, by default, the SQLite database.")
    database_url: str | None = Field(
        default=None,
        description="SQLAlchemy URL (`postgresql+psycopg://user@host/db` for deployments); "
                    "unset means a SQLite file `gradindex.db` in the data directory.")
    retain_versions: int = Field(
        default=2, ge=1,
        description="Published versions kept per index (the current one included); a reader "
                    "that opened the previous version keeps working while a new one is "
                    "published.")

    vector_store: str | None = Field(
        default=None,
        description="The Milvus of indexes built with `--store milvus`: a milvus-lite file "
                    "(`path/to/milvus.db`, one process at a time) or a server "
                    "(`http://host:19530`, credentials as `http://user:password@host:19530`); "
                    "unset means a milvus-lite file `milvus.db` in the data directory.")

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as exc:
            raise ConfigError(f"invalid settings: {_problems(exc, ENV_PREFIX)}") from None

    @field_validator("data_dir", mode="after")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        return Path(value).expanduser().absolute()

    @field_validator("database_url", mode="after")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if not value:
            return None
        if "://" not in value:
            raise ValueError(f"must be an SQLAlchemy URL such as "
                             f"'postgresql+psycopg://user@host/db', got {value!r}")
        return value

    @field_validator("vector_store", mode="after")
    @classmethod
    def _vector_store(cls, value: str | None) -> str | None:
        if not value:
            return None
        if re.match(r"(https?|tcp|unix)://", value) or value.startswith("unix:"):
            return value
        if value.endswith(".db"):
            return str(Path(value).expanduser().absolute())
        raise ValueError(f"must be a milvus-lite file ending in '.db' or a Milvus URL such as "
                         f"'http://host:19530', got {value!r}")

    @classmethod
    def from_env(cls) -> Settings:
        """Settings from the process's ``GRADINDEX_*`` variables alone (the same as ``cls()``)."""
        return cls()

    @property
    def url(self) -> str:
        """The database URL actually used."""
        return self.database_url or f"sqlite:///{self.data_dir / SQLITE_NAME}"

    @property
    def is_sqlite(self) -> bool:
        return self.url.startswith("sqlite")

    def storage(self) -> Settings:
        """Only the storage part: what the indexer's functions take."""
        return Settings(**{name: getattr(self, name) for name in Settings.model_fields})

    def index_dir(self, name: str) -> Path:
        """The folder of one index: ``staging/``, ``versions/`` and its lock file."""
        check_name(name)
        return self.data_dir / "indexes" / name
