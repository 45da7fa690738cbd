"""The channel interface and the registry that picks an implementation by scheme.

A channel moves frames between exactly two endpoints, in order, and knows nothing of
actors. Every implementation honours the same contract, checked by one test suite:

- frames arrive whole and in the order they were sent;
- `send` waits while the peer is not keeping up (backpressure) and never drops;
- frames of any size travel, also ones larger than the channel's buffer;
- after either side closes, or the peer dies, `send` raises `ChannelClosed`, and
  `receive` returns what had already arrived and then raises `ChannelClosed`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from typing import Any

from .errors import DecodeError
from .frame import Frame, OutFrame

# Takes each arriving frame (or the DecodeError a malformed one raised); returns None,
# or a follow-up that must finish before the next frame is handed over.
FrameHandler = Callable[[Frame | DecodeError], Awaitable[None] | None]


class Channel(ABC):
    """One end of a bidirectional, ordered frame stream."""

    scheme: str = ""

    @abstractmethod
    async def send(self, frame: OutFrame) -> None:
        """Queue `frame` for the peer; wait while the peer's buffer is full."""

    @abstractmethod
    async def receive(self) -> Frame:
        """The next frame from the peer; `ChannelClosed` once there will be none."""

    async def pump(self, handler: FrameHandler) -> None:
        """Hand every frame to `handler`, in order, until the channel closes; then raise
        ChannelClosed (or what `handler` raised). Channels that can call `handler`
        straight from their wake-up, without a task switch per frame, override this."""
        while True:
            try:
                item: Frame | DecodeError = await self.receive()
            except DecodeError as exc:
                item = exc
            later = handler(item)
            del item  # frames read in place free their buffer space once handled
            if later is not None:
                await later

    def expect(self) -> None:
        """A frame is due from the peer soon (the answer to a request just sent): a
        channel that can watch for it instead of sleeping does so for a short while.
        Only a hint; nothing else changes."""
        return  # optional for a transport: by default, nothing to do

    @abstractmethod
    async def close(self) -> None:
        """Close this end. The peer sees `ChannelClosed` after the frames already sent."""

    @property
    @abstractmethod
    def closed(self) -> bool:
        """True once this end can neither send nor receive anything new."""

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"<{type(self).__name__} {state}>"


PairFactory = Callable[..., Awaitable[tuple[Channel, Channel]]]
_PAIR_FACTORIES: dict[str, PairFactory] = {}


def register_transport(scheme: str, pair: PairFactory) -> None:
    """Make a transport available under `scheme`; `pair(**options)` returns two
    connected channel ends (in this process: for tests and embedding)."""
    _PAIR_FACTORIES[scheme] = pair


def transport_schemes() -> list[str]:
    """The schemes registered so far, in registration order."""
    return list(_PAIR_FACTORIES)


async def open_pair(scheme: str, **options: Any) -> tuple[Channel, Channel]:
    """Two connected ends of a channel of the given scheme."""
    try:
        factory = _PAIR_FACTORIES[scheme]
    except KeyError:
        known = ", ".join(_PAIR_FACTORIES) or "none"
        raise ValueError(f"unknown transport scheme {scheme!r} (known: {known})") from None
    return await factory(**options)
