"""Shared-memory links: one single-producer single-consumer byte ring per direction.

A link between two endpoints is one anonymous memfd (a control page and two rings),
one eventfd per endpoint, and a socketpair used to notice that the peer is gone and to
give back leases. The memfd has no name in /dev/shm, so nothing can be left behind
there: the kernel frees it when the last process holding it exits, `kill -9` included.

`ShmChannel` is one endpoint. Its rooms are the ring writer and the ring reader
(`transport.ring`: record layout, wake-up protocol, frames read in place) and the lease
table (`transport.leases`: shared arrays sent by reference and given back). The channel
owns the descriptors, turns eventfd wake-ups and socketpair traffic into calls on those
three, and decides when the link is closed.

Whole frames of 64 KiB and more are parsed in place and marked `borrowed`: their arrays
are views into the ring. The layer above decides who may keep such views (the node
copies them for any actor that has not declared it lets go of received arrays when its
handler returns), because ring space held for long stops the writer.
"""

from __future__ import annotations

import asyncio
import contextlib
import mmap
import os
import socket
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any

from .base import Channel, FrameHandler, register_transport
from .errors import ChannelClosed, DecodeError, MessageTooLarge
from .frame import DEFAULT_MAX_FRAME_BYTES, Frame, OutFrame
from .leases import LeaseTable
from .ring import DIRECTION_WORDS, RECORD_BYTES, RingReader, RingWriter

CONTROL_BYTES = 4096
DEFAULT_RING_BYTES = 32 << 20
MIN_RING_BYTES = 4096
# Before sleeping on its eventfd a reader polls for up to this long, yielding to the
# loop, when a reply is due (`expect`) or frames have lately come this close together
# (a burst): a frame that comes meanwhile costs neither side a wake-up. 0 turns
# polling off.
DEFAULT_POLL_SECONDS = 100e-6


@dataclass(frozen=True)
class ShmEndpoint:
    """What one side of a link holds: plain file descriptors, so a parent can hand
    them to a child process (`pass_fds`) and describe them with `to_config`."""

    memfd: int
    wake_fd: int
    peer_wake_fd: int
    sock_fd: int
    side: int
    ring_bytes: int

    def fds(self) -> list[int]:
        return [self.memfd, self.wake_fd, self.peer_wake_fd, self.sock_fd]

    def to_config(self) -> dict[str, int]:
        return {
            "memfd": self.memfd, "wake_fd": self.wake_fd, "peer_wake_fd": self.peer_wake_fd,
            "sock_fd": self.sock_fd, "side": self.side, "ring_bytes": self.ring_bytes,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ShmEndpoint:
        return cls(**{k: int(config[k]) for k in (
            "memfd", "wake_fd", "peer_wake_fd", "sock_fd", "side", "ring_bytes")})

    def close_fds(self) -> None:
        for fd in self.fds():
            with contextlib.suppress(OSError):
                os.close(fd)


def create_link(ring_bytes: int = DEFAULT_RING_BYTES) -> tuple[ShmEndpoint, ShmEndpoint]:
    """Make the shared resources of one link; each endpoint owns its own descriptors."""
    if ring_bytes < MIN_RING_BYTES or ring_bytes % RECORD_BYTES:
        raise ValueError(f"ring_bytes must be a multiple of 64 and at least {MIN_RING_BYTES}")
    memfd = os.memfd_create("asyncdb-ring", os.MFD_CLOEXEC)
    try:
        os.ftruncate(memfd, CONTROL_BYTES + 2 * ring_bytes)
        flags = os.EFD_NONBLOCK | os.EFD_CLOEXEC
        wake_a, wake_b = os.eventfd(0, flags), os.eventfd(0, flags)
        sock_a, sock_b = socket.socketpair()
    except BaseException:
        os.close(memfd)
        raise
    a = ShmEndpoint(memfd, wake_a, os.dup(wake_b), sock_a.detach(), 0, ring_bytes)
    b = ShmEndpoint(os.dup(memfd), wake_b, os.dup(wake_a), sock_b.detach(), 1, ring_bytes)
    return a, b


class ShmChannel(Channel):
    """One endpoint of a shared-memory link. Construct it inside a running event loop;
    it takes ownership of the endpoint's descriptors and closes them on `close`."""

    scheme = "shm"

    def __init__(self, end: ShmEndpoint, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
                 poll_seconds: float = DEFAULT_POLL_SECONDS) -> None:
        self._loop = asyncio.get_running_loop()
        self.poll_seconds = poll_seconds
        self._gap = float("inf")  # moving average of the waits for a frame, seconds
        self._expecting = False  # a reply is due: poll for it before sleeping
        self._idle_since = 0.0
        self._end = end
        self.ring_bytes = ring = end.ring_bytes
        self.max_frame_bytes = max_frame_bytes
        self._mm = mmap.mmap(end.memfd, CONTROL_BYTES + 2 * ring)
        self._ctl = memoryview(self._mm)[:CONTROL_BYTES].cast("Q")
        out_base = CONTROL_BYTES + end.side * ring
        in_base = CONTROL_BYTES + (1 - end.side) * ring
        self._sock = socket.socket(fileno=end.sock_fd)
        self._sock.setblocking(False)
        self._closed = False
        self._peer_gone = False
        self._recv_waiter: asyncio.Future[None] | None = None
        self._handler: FrameHandler | None = None  # set while `pump` runs
        self._later: Awaitable[None] | None = None  # a follow-up `pump` must await
        self._failure: Exception | None = None  # what the handler raised
        self._lent = {"by_reference": 0}
        self.leases = LeaseTable(self._sock, lambda: self.closed, self._lent)
        self.writer = RingWriter(memoryview(self._mm)[out_base : out_base + ring], self._ctl,
                                 end.side * DIRECTION_WORDS, self._signal_peer,
                                 self._check_open)
        self.reader = RingReader(self._mm, in_base, ring, self._ctl,
                                 (1 - end.side) * DIRECTION_WORDS, max_frame_bytes,
                                 self.leases.resolve, self._signal_peer, self._broken)
        self._wakeups_sent = 0
        self._loop.add_reader(end.wake_fd, self._on_wake)
        self._loop.add_reader(end.sock_fd, self._on_sock)

    @property
    def closed(self) -> bool:
        return self._closed or self._peer_gone

    @property
    def stats(self) -> dict[str, int]:
        return {"frames_sent": self.writer.frames_sent, **self.reader.stats,
                "wakeups_sent": self._wakeups_sent, **self._lent}

    def _check_open(self) -> None:
        if self.closed:
            raise ChannelClosed(self._closed_reason())

    def expect(self) -> None:
        if self.poll_seconds <= 0:
            return
        self._expecting = True
        waiter = self._recv_waiter
        if self._handler is not None and waiter is not None and not waiter.done():
            waiter.set_result(None)  # `pump` sleeps: it polls instead

    # -- wake-ups and the socketpair --------------------------------------------

    def _signal_peer(self) -> None:
        self._wakeups_sent += 1
        try:  # noqa: SIM105 (suppress() builds a context manager per message)
            os.eventfd_write(self._end.peer_wake_fd, 1)
        except OSError:
            pass

    def _on_wake(self) -> None:
        try:  # noqa: SIM105 (as above)
            os.eventfd_read(self._end.wake_fd)
        except BlockingIOError:
            pass
        waiter = self._recv_waiter
        if self._handler is not None and waiter is not None and not waiter.done():
            # `pump` sleeps: hand the frames over from here, a task switch sooner. The
            # wait the frame cost is what it took, less what sleeping added.
            if self.reader.pending():
                since = self._idle_since
                self._waited(time.monotonic() - since - self.reader.wake_latency(since))
            while True:
                self._deliver()
                if self._later is not None or self._failure is not None or self.closed \
                        or self._gap < self.poll_seconds or self._expecting:  # `pump` polls
                    waiter.set_result(None)
                    break
                if self.reader.idle():
                    self._idle_since = time.monotonic()
                    break
            self.writer.wake()
            return
        self._wake_waiters()

    def _on_sock(self) -> None:
        try:
            data = self._sock.recv(1 << 16)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._peer_gone = True
            self._loop.remove_reader(self._end.sock_fd)
            self.leases.settle_all()
            self._wake_waiters()
            return
        self.leases.returned(data)

    def _broken(self) -> None:
        self._peer_gone = True  # the ring is out of step: nothing after this can be trusted

    def _wake_waiters(self) -> None:
        fut = self._recv_waiter
        if fut is not None and not fut.done():
            fut.set_result(None)
        self.writer.wake()

    # -- sending and receiving --------------------------------------------------

    async def send(self, frame: OutFrame) -> None:
        self._check_open()
        frame, leases = self.leases.lend(frame) if frame.arrays else (frame, [])
        if frame.nbytes > self.max_frame_bytes:
            for lease in leases:
                self.leases.settle(lease)
            raise MessageTooLarge(f"frame of {frame.nbytes} bytes is over the "
                             f"{self.max_frame_bytes}-byte limit of this channel")
        try:
            await self.writer.write(frame)
        except BaseException:
            for lease in leases:
                self.leases.settle(lease)
            raise

    async def receive(self) -> Frame:
        reader, inbox = self.reader, self.reader.inbox
        while True:
            if inbox:
                item = inbox.popleft()
                if isinstance(item, DecodeError):
                    raise item
                return item
            if self._closed:
                raise ChannelClosed(self._closed_reason())
            reader.drain()
            if inbox:
                continue
            if self._peer_gone:
                raise ChannelClosed(self._closed_reason())
            if not reader.idle():
                continue
            self._recv_waiter = self._loop.create_future()
            try:
                await self._recv_waiter
            finally:
                self._recv_waiter = None

    async def pump(self, handler: FrameHandler) -> None:
        self._handler = handler
        try:
            while True:
                self._deliver()
                if self._failure is not None:
                    failure, self._failure = self._failure, None
                    raise failure
                if self._later is not None:
                    later, self._later = self._later, None
                    await later
                    continue
                if self.closed:
                    raise ChannelClosed(self._closed_reason())
                if await self._poll() or not self.reader.idle():
                    continue
                self._idle_since = time.monotonic()
                self._recv_waiter = self._loop.create_future()
                try:
                    await self._recv_waiter
                finally:
                    self._recv_waiter = None
        finally:
            self._handler = None

    async def _poll(self) -> bool:
        """When frames have lately come within `poll_seconds` of each other, watch the
        ring for that long, yielding to the loop between looks (its other tasks run,
        its other descriptors are polled), instead of sleeping: True if a frame came.
        The reader's sleeping flag is clear meanwhile, so the writer does not signal."""
        limit = self.poll_seconds
        expecting, self._expecting = self._expecting, False
        if self._gap >= limit and not expecting:
            return False
        reader = self.reader
        reader.polling()  # awake: a frame that comes meanwhile need not be signalled
        began = time.monotonic()
        while True:
            await asyncio.sleep(0)
            if reader.pending() or self.closed:
                self._waited(time.monotonic() - began)
                return True
            if time.monotonic() - began >= limit:
                self._gap = limit  # nothing came: sleep until frames come closer again
                return False

    def _waited(self, seconds: float) -> None:
        seconds = min(max(seconds, 0.0), 4 * self.poll_seconds)  # an idle spell counts once
        gap = self._gap
        self._gap = seconds if gap == float("inf") else 0.75 * gap + 0.25 * seconds

    def _deliver(self) -> None:
        """Hand what the ring holds to the handler, until it is empty or the handler
        returns a follow-up (or raises)."""
        handler, inbox, reader = self._handler, self.reader.inbox, self.reader
        assert handler is not None
        while self._later is None and self._failure is None:
            if not inbox:
                if self._closed:
                    return
                reader.drain()
                if not inbox:
                    return
            item = inbox.popleft()
            try:
                self._later = handler(item)
            except Exception as exc:  # ends `pump`, as it would a reader task
                self._failure = exc
            del item

    def _closed_reason(self) -> str:
        return "shm channel closed" if self._closed else "shm peer is gone"

    # -- closing ----------------------------------------------------------------

    async def close(self) -> None:
        self._close()

    def _close(self) -> None:
        if self._closed:
            return
        self._closed = True
        end = self._end
        for fd in (end.wake_fd, end.sock_fd):
            self._loop.remove_reader(fd)
        self._loop.remove_writer(end.sock_fd)
        self._sock.close()
        self.leases.close()
        for fd in (end.memfd, end.wake_fd, end.peer_wake_fd):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._wake_waiters()
        self._ctl.release()
        self.writer.close()
        self.reader.close()
        # In-place arrays still alive keep the mapping; it goes when they do.
        with contextlib.suppress(BufferError):
            self._mm.close()

    def __del__(self) -> None:
        if not getattr(self, "_closed", True) and not self._loop.is_closed():
            self._close()


async def shm_pair(ring_bytes: int = DEFAULT_RING_BYTES,
                   max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
                   ) -> tuple[ShmChannel, ShmChannel]:
    a, b = create_link(ring_bytes)
    return ShmChannel(a, max_frame_bytes), ShmChannel(b, max_frame_bytes)


register_transport("shm", shm_pair)
