"""In-process channels: two ends in one event loop, for embedding and tests.

Frames are serialised to bytes and parsed again on the way, exactly as on the other
transports, so code that works here meets the same wire format everywhere. The
buffer is bounded in bytes; a frame larger than the buffer is admitted once the
buffer is empty, so nothing is ever too large to pass.
"""

from __future__ import annotations

import asyncio
from collections import deque

from .base import Channel, register_transport
from .errors import ChannelClosed, MessageTooLarge
from .frame import DEFAULT_MAX_FRAME_BYTES, Frame, OutFrame, parse_frame

DEFAULT_CAPACITY = 8 << 20


class InprocChannel(Channel):
    scheme = "inproc"

    def __init__(self, capacity: int = DEFAULT_CAPACITY,
                 max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> None:
        self.capacity = capacity
        self.max_frame_bytes = max_frame_bytes
        self._peer: InprocChannel | None = None
        self._inbox: deque[bytes] = deque()
        self._inbox_bytes = 0
        self._closed = False
        self._peer_gone = False
        self._readable = asyncio.Event()
        self._writable = asyncio.Event()
        self._writable.set()

    @property
    def closed(self) -> bool:
        return self._closed or self._peer_gone

    async def send(self, frame: OutFrame) -> None:
        peer = self._peer
        if peer is not None and frame.nbytes > peer.max_frame_bytes:
            raise MessageTooLarge(f"frame of {frame.nbytes} bytes is over the "
                                  f"{peer.max_frame_bytes}-byte limit of this channel")
        data = frame.to_bytes()
        while True:
            peer = self._peer
            if self.closed or peer is None:
                raise ChannelClosed("in-process channel is closed")
            if peer._inbox_bytes == 0 or peer._inbox_bytes + len(data) <= peer.capacity:
                break
            peer._writable.clear()
            await peer._writable.wait()
        peer._inbox.append(data)
        peer._inbox_bytes += len(data)
        peer._readable.set()

    async def receive(self) -> Frame:
        while not self._inbox:
            if self._closed:
                raise ChannelClosed("in-process channel is closed")
            if self._peer_gone:
                raise ChannelClosed("peer closed the in-process channel")
            self._readable.clear()
            await self._readable.wait()
        data = self._inbox.popleft()
        self._inbox_bytes -= len(data)
        self._writable.set()
        return parse_frame(data, self.max_frame_bytes)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._readable.set()
        self._writable.set()
        peer = self._peer
        if peer is not None:
            peer._peer_gone = True
            peer._readable.set()
            peer._writable.set()


async def inproc_pair(capacity: int = DEFAULT_CAPACITY,
                      max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
                      ) -> tuple[InprocChannel, InprocChannel]:
    a = InprocChannel(capacity, max_frame_bytes)
    b = InprocChannel(capacity, max_frame_bytes)
    a._peer, b._peer = b, a
    return a, b


register_transport("inproc", inproc_pair)
