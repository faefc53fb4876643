"""Server settings: the storage settings plus what ``gradindex serve`` reads (``GRADINDEX_*``)."""

from __future__ import annotations

import ipaddress
from typing import Literal

from pydantic import Field, model_validator

from gradindex.indexer.settings import Settings

__all__ = ["ServerSettings", "is_loopback"]


def is_loopback(host: str) -> bool:
    """Whether ``host`` is reachable from this machine only (``127.0.0.0/8``, ``::1``,
    ``localhost``)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class ServerSettings(Settings):
    """Everything ``gradindex serve`` reads, from ``GRADINDEX_<FIELD>`` (e.g. ``GRADINDEX_PORT``).

    Auth: with ``auth=on`` (the default) every ``/v1`` request needs an API key
    (``gradindex keys create``). ``auth=off`` is accepted only when the server listens on
    loopback, and must be set explicitly; a server that listens beyond loopback always
    requires keys. ``/v1/health``, ``/metrics``, ``/docs`` and the page at ``/`` stay open.
    """

    host: str = Field(default="127.0.0.1", description="Address to listen on.")
    port: int = Field(default=8000, ge=0, le=65535, description="Port to listen on.")
    auth: Literal["on", "off"] = Field(
        default="on", description="API keys required (`on`), or not (`off`, loopback only).")
    device: str | None = Field(
        default=None,
        description="Torch device of the models; unset means cuda when present, else cpu.")
    max_batch: int = Field(default=64, ge=1, le=4096,
                           description="Examples per model pass at most.")
    max_wait_ms: float = Field(
        default=5.0, ge=0, le=10_000,
        description="How long a pass waits for more queries to batch.")
    queue_size: int = Field(
        default=256, ge=1, le=1_000_000,
        description="Requests waiting per device worker; beyond it the server answers 503.")
    retry_after_s: int = Field(default=1, ge=1,
                               description="`Retry-After` of a 503 for a full queue.")
    max_body_bytes: int = Field(
        default=4 * 1024 * 1024, ge=1024, description="Request bodies above this get 413.")
    max_examples: int = Field(default=256, ge=1, description="Examples per request at most.")
    reload_ttl_s: float = Field(
        default=2.0, ge=0,
        description="How often a request checks for a newly published version (seconds).")

    @model_validator(mode="after")
    def _auth_beyond_loopback(self) -> ServerSettings:
        if self.auth == "off" and not is_loopback(self.host):
            raise ValueError(
                f"`auth` must be 'on' when the server listens beyond loopback (host "
                f"{self.host!r}); create keys with `gradindex keys create`"
            )
        return self

    @property
    def auth_required(self) -> bool:
        return self.auth == "on"
