"""How ``gradindex serve`` runs the app: uvicorn with the connection limits of the settings.

Uvicorn times out idle keep-alive connections, caps connections and requests at once
(``limit_concurrency``: beyond it, 503) and the size of a request's headers; it has no timeout
for a client that trickles its headers a byte at a time (slowloris), so
:func:`header_timeout_protocol` adds one: a connection that has not sent a whole request line
and headers within ``header_timeout_s`` of being opened (or of its previous response) is closed.
"""

from __future__ import annotations

import asyncio
import os
import socket
from typing import Any

from .settings import ServerSettings

__all__ = ["SETTINGS_VARIABLE", "WORKER_PROTOCOL", "header_timeout_protocol", "set_nodelay",
           "uvicorn_options"]

SETTINGS_VARIABLE = "GRADINDEX_SERVE_SETTINGS"
"""How ``run`` hands its settings, as JSON, to the worker processes of ``workers > 1``."""

WORKER_PROTOCOL = f"{__name__}:HeaderTimeoutProtocol"
"""The protocol of a worker process, by name: uvicorn's workers import what they run."""


def __getattr__(name: str) -> Any:
    if name == "HeaderTimeoutProtocol":  # a worker process's protocol, from the settings
        settings = ServerSettings.model_validate_json(os.environ[SETTINGS_VARIABLE])
        return header_timeout_protocol(settings.header_timeout_s)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def set_nodelay(transport: asyncio.BaseTransport) -> None:
    """Send small writes at once (``TCP_NODELAY``) on a TCP connection.

    asyncio sets it only on sockets whose ``proto`` is ``IPPROTO_TCP``; the listening socket
    uvicorn binds for ``--workers N`` is made with ``proto`` 0, so its connections kept Nagle's
    algorithm: a response's headers and body, written separately, then waited for the client's
    delayed ACK, and every request took 40 ms more (a health check 48 ms instead of 0.5 ms).
    """
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6) \
            and sock.type == socket.SOCK_STREAM:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def header_timeout_protocol(seconds: float) -> type[asyncio.Protocol]:
    """Uvicorn's h11 protocol, closing connections whose headers take over ``seconds``."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderTimeoutProtocol(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None

        def _arm(self) -> None:
            self._disarm()
            self._header_timer = self.loop.call_later(seconds, self._too_slow)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _waiting_for_headers(self) -> bool:
            return self.cycle is None or self.cycle.response_complete

        def _too_slow(self) -> None:
            self._header_timer = None
            if self._waiting_for_headers() and not self.transport.is_closing():
                self.transport.close()

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            set_nodelay(transport)
            super().connection_made(transport)
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def handle_events(self) -> None:
            super().handle_events()
            if not self._waiting_for_headers():
                self._disarm()  # a whole request line and headers arrived

        def on_response_complete(self) -> None:
            self._arm()  # the next request's headers are due within the timeout too
            super().on_response_complete()

    return HeaderTimeoutProtocol


def uvicorn_options(settings: ServerSettings) -> dict[str, Any]:
    """The keyword arguments of ``uvicorn.run`` that bound connections (see the settings)."""
    return {
        "timeout_keep_alive": settings.timeout_keep_alive_s,
        "limit_concurrency": settings.limit_concurrency,
        "h11_max_incomplete_event_size": settings.max_header_bytes,
        "http": header_timeout_protocol(settings.header_timeout_s),
        "server_header": False,
    }
