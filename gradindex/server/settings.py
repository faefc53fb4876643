"""Server settings: the storage settings plus what ``gradindex serve`` reads (``GRADINDEX_*``)."""

from __future__ import annotations

import ipaddress
from typing import Literal

from pydantic import Field, model_validator

from gradindex.indexer.settings import Settings

__all__ = ["LOOPBACK_HOSTS", "ServerSettings", "is_loopback"]

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
"""The ``Host`` names a keyless server answers to by default."""


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
    requires keys. ``/v1/health``, ``/v1/health/ready``, ``/docs`` and the page at ``/`` stay
    open, and ``/metrics`` too unless ``metrics_key`` is set. A keyless server answers loopback
    ``Host`` names only (``allowed_hosts``).
    """

    host: str = Field(default="127.0.0.1", description="Address to listen on.")
    port: int = Field(default=8000, ge=0, le=65535, description="Port to listen on.")
    auth: Literal["on", "off"] = Field(
        default="on", description="API keys required (`on`), or not (`off`, loopback only).")
    device: str | None = Field(
        default=None,
        description="Torch device of the models; unset means cuda when present, else cpu.")
    workers: int = Field(
        default=1, ge=1, le=64,
        description="Server processes sharing the address; each opens the indexes (their "
                    "vectors memory-mapped: one copy in the page cache) and loads its own "
                    "models.")
    max_batch: int = Field(default=64, ge=1, le=4096,
                           description="Examples per model pass at most.")
    max_wait_ms: float = Field(
        default=0.0, ge=0, le=10_000,
        description="How long a pass waits for more queries to batch; 0 starts at once "
                    "(the queries that arrive during a pass form the next one).")
    search_threads: int = Field(
        default=1, ge=0, le=1024,
        description="BLAS threads of the vector search (process-wide for numpy). The "
                    "searches of concurrent requests are ranked together on one thread, "
                    "beside the model passes' thread; one BLAS thread each keeps them from "
                    "fighting over the cores. 0 leaves BLAS's own default.")
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

    # ---------------------------------------------------------------- production limits
    max_ids: int = Field(
        default=10_000, ge=1, le=60_000,
        description="Training ids one `/scores` request may name (413 beyond).")
    max_results: int = Field(
        default=20_000, ge=1,
        description="Hits one request may return: examples × k × directions (413 beyond).")
    allowed_hosts: str | None = Field(
        default=None,
        description="Comma-separated `Host` names the server answers to (`*`: any; "
                    "`.example.org`: it and its subdomains); others get 421. Unset: loopback "
                    "names only when keys are off, any otherwise.")
    metrics_key: str | None = Field(
        default=None,
        description="When set, `/metrics` needs `Authorization: Bearer <metrics_key>`.")
    serve_only: str | None = Field(
        default=None,
        description="Comma-separated names of the only indexes this server serves "
                    "(the demo serves its own); unset: every index of the data directory.")
    timeout_keep_alive_s: int = Field(
        default=5, ge=1, le=3600,
        description="Seconds an idle keep-alive connection is kept open.")
    header_timeout_s: float = Field(
        default=10.0, gt=0, le=3600,
        description="Seconds a connection may take to send a request's headers (slow "
                    "clients are closed; slowloris).")
    limit_concurrency: int = Field(
        default=512, ge=1,
        description="Connections and requests at once; beyond, new ones get 503. Keep it "
                    "below the open-file limit (`ulimit -n`).")
    max_header_bytes: int = Field(
        default=64 * 1024, ge=1024,
        description="Bytes of request line and headers at most (h11).")

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

    @property
    def host_allow_list(self) -> list[str] | None:
        """The ``Host`` names answered to, or None for any (see ``allowed_hosts``)."""
        if self.allowed_hosts is not None and self.allowed_hosts.strip():
            return [h.strip() for h in self.allowed_hosts.split(",") if h.strip()]
        if not self.auth_required:
            return list(LOOPBACK_HOSTS)
        return None

    @property
    def served_names(self) -> set[str] | None:
        """The only indexes served (``serve_only``), or None for all."""
        if self.serve_only is None or not self.serve_only.strip():
            return None
        return {n.strip() for n in self.serve_only.split(",") if n.strip()}
