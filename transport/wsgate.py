"""The websocket server's door: connections not authenticated yet get a deadline and
a bounded number of places, and what is logged of them is rate limited."""

from __future__ import annotations

import asyncio
import logging
import resource
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from .wsauth import short

log = logging.getLogger("asyncdb.transport.ws")


class _Throttled:
    """Log at most one line per `period` seconds, counting the ones left out."""

    def __init__(self, period: float = 1.0) -> None:
        self.period = period
        self._last = -period
        self._skipped = 0

    def warning(self, text: str, *args: Any) -> None:
        now = time.monotonic()
        if now - self._last < self.period:
            self._skipped += 1
            return
        if self._skipped:
            text += f" (and {self._skipped} more since the last such line)"
        self._last, self._skipped = now, 0
        log.warning(text, *args)


class Gate(web.Server):
    """aiohttp's server, minding connections that are not authenticated yet: each has
    `auth_timeout` seconds from its accept (HTTP headers and handshake included), and
    beyond `max_pending` of them the oldest is dropped to make room."""

    def __init__(self, handler: Callable[[web.BaseRequest], Awaitable[web.StreamResponse]],
                 *, auth_timeout: float, max_pending: int, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.auth_timeout = auth_timeout
        self.max_pending = max(1, min(max_pending, _fd_budget()))
        self._pending: dict[RequestHandler, asyncio.TimerHandle] = {}
        self.throttled = _Throttled()

    @property
    def pending(self) -> int:
        return len(self._pending)

    def connection_made(self, handler: RequestHandler, transport: asyncio.Transport) -> None:
        super().connection_made(handler, transport)
        while len(self._pending) >= self.max_pending:
            self._drop(next(iter(self._pending)), f"over {self.max_pending} connections "
                       "waiting to authenticate")
        self._pending[handler] = asyncio.get_running_loop().call_later(
            self.auth_timeout, self._drop, handler,
            f"not authenticated within {self.auth_timeout:g} s")

    def connection_lost(self, handler: RequestHandler,
                        exc: BaseException | None = None) -> None:
        timer = self._pending.pop(handler, None)
        if timer is not None:
            timer.cancel()
        super().connection_lost(handler, exc)

    def admit(self, handler: RequestHandler) -> None:
        """`handler`'s connection is authenticated: no deadline, not pending."""
        timer = self._pending.pop(handler, None)
        if timer is not None:
            timer.cancel()

    def _drop(self, handler: RequestHandler, why: str) -> None:
        self.admit(handler)
        transport = handler.transport
        if transport is not None:
            self.throttled.warning("dropped a connection from %s: %s",
                              short(transport.get_extra_info("peername"), 60), why)
            transport.abort()


def _fd_budget() -> int:
    """How many pending connections this process's descriptor limit leaves room for."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 1 << 30
    return max(4, (soft - 64) // 2)
