"""Shared-memory rings: one single-producer single-consumer byte ring per direction.

A link between two endpoints is one anonymous memfd (a control page and two rings),
one eventfd per endpoint, and a socketpair used only to notice that the peer is gone.
The memfd has no name in /dev/shm, so nothing can be left behind there: the kernel
frees it when the last process holding it exits, `kill -9` included.

Each frame is written once into the ring, as records aligned to 64 bytes:

    WHOLE   a frame of at most half the ring, contiguous (a PAD record fills the
            ring's tail when it would not fit before the wrap)
    FIRST / MIDDLE / LAST   a larger frame, streamed through the ring in pieces of a
            quarter of the ring and assembled in a pooled buffer (one copy)

Wake-ups are signalled only on transitions: the writer signals when the reader had
consumed everything before this write (empty to non-empty), the reader signals when the
writer said it is waiting for space (full to not-full). Both sides publish their
position, then fence, then read the other's, so a wake-up is never lost; an idle
endpoint sleeps in the event loop and uses no CPU.

Whole frames of 64 KiB and more are parsed in place and marked `borrowed`: their arrays
are views into the ring, whose space is reused only once the last view is gone. The
layer above decides who may keep such views (the node copies them for any actor that
has not declared it lets go of received arrays when its handler returns), because
ring space held for long stops the writer. Small frames are copied out at once.

Arrays that already live in shared memory (`transport.shared`) are not copied at all:
the frame carries a reference, the receiver maps the sender's memfd read-only and reads
the array in place (a `borrowed` frame again), and when the last view of it is gone it
writes the reference's lease id to the socketpair, which tells the sender the memory is
its own again. A lost peer settles every lease it held.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import mmap
import os
import socket
import struct
import threading
import weakref
from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import shared
from .base import Channel, register_transport
from .errors import ChannelClosed, DecodeError
from .frame import DEFAULT_MAX_FRAME_BYTES, Frame, OutFrame, align, encode_frame, parse_frame
from .pool import BufferPool

log = logging.getLogger(__name__)

CONTROL_BYTES = 4096
DEFAULT_RING_BYTES = 32 << 20
MIN_RING_BYTES = 4096
INPLACE_MIN_BYTES = 64 << 10
RECEIVE_BATCH = 64

_RECORD = struct.Struct("<IIQ")  # payload bytes, record type, whole frame bytes
_LEASE = struct.Struct("<Q")  # a returned lease, on the socketpair
_RECORD_BYTES = 64
WHOLE, FIRST, MIDDLE, LAST, PAD = 1, 2, 3, 4, 5

# Control words (u64) per direction, each on its own cache line.
_HEAD, _TAIL, _READ_POS, _WRITER_WAITING = 0, 8, 16, 24
_DIRECTION_WORDS = 64

_FENCE = threading.Lock()


def _fence() -> None:
    # An uncontended lock round trip is an atomic read-modify-write: a full barrier.
    _FENCE.acquire()
    _FENCE.release()


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
    if ring_bytes < MIN_RING_BYTES or ring_bytes % _RECORD_BYTES:
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

    def __init__(self, end: ShmEndpoint, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.get_ident()
        self._end = end
        self.ring_bytes = ring = end.ring_bytes
        self.max_frame_bytes = max_frame_bytes
        self._mm = mmap.mmap(end.memfd, CONTROL_BYTES + 2 * ring)
        self._ctl = memoryview(self._mm)[:CONTROL_BYTES].cast("Q")
        out_base = CONTROL_BYTES + end.side * ring
        self._in_base = CONTROL_BYTES + (1 - end.side) * ring
        self._out = memoryview(self._mm)[out_base : out_base + ring]
        self._in: np.ndarray | None = np.frombuffer(self._mm, np.uint8, ring, self._in_base)
        self._w = end.side * _DIRECTION_WORDS  # control words of the ring we write
        self._r = (1 - end.side) * _DIRECTION_WORDS  # ... and of the ring we read
        self._sock = socket.socket(fileno=end.sock_fd)
        self._sock.setblocking(False)
        # Writer state.
        self._head = int(self._ctl[self._w + _HEAD])
        self._send_lock = asyncio.Lock()
        self._space_waiter: asyncio.Future[None] | None = None
        # Reader state.
        self._read_pos = int(self._ctl[self._r + _READ_POS])
        self._held: deque[list[Any]] = deque()  # [end, released] per record, in order
        self._pool = BufferPool()
        self._assembly: np.ndarray | None = None
        self._assembled = 0
        self._inbox: deque[Frame | DecodeError] = deque()
        self._recv_waiter: asyncio.Future[None] | None = None
        # Shared arrays: leases this side holds for the peer, and the peer's memory.
        self._lease_ids = itertools.count(1)
        self._leases: dict[int, tuple[shared.Segment, np.ndarray]] = {}
        self._mappings = shared.Mappings()
        self._sock_in = bytearray()
        self._sock_out = bytearray()
        self._closed = False
        self._peer_gone = False
        self.stats = {"frames_sent": 0, "frames_received": 0, "wakeups_sent": 0,
                      "in_place": 0, "copied": 0, "streamed": 0, "by_reference": 0}
        self._loop.add_reader(end.wake_fd, self._on_wake)
        self._loop.add_reader(end.sock_fd, self._on_sock)

    @property
    def closed(self) -> bool:
        return self._closed or self._peer_gone

    # -- wake-ups ---------------------------------------------------------------

    def _signal_peer(self) -> None:
        self.stats["wakeups_sent"] += 1
        with contextlib.suppress(OSError):
            os.eventfd_write(self._end.peer_wake_fd, 1)

    def _on_wake(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self._end.wake_fd)
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
            self._return_all()
            self._wake_waiters()
            return
        self._sock_in += data
        whole = len(self._sock_in) - len(self._sock_in) % _LEASE.size
        for (lease,) in _LEASE.iter_unpack(self._sock_in[:whole]):
            if not self._settle(lease):
                log.warning("shm peer returned unknown lease %d; ignored", lease)
        del self._sock_in[:whole]

    def _settle(self, lease: int) -> bool:
        """The peer no longer reads what `lease` lent it; False if no such lease."""
        entry = self._leases.pop(lease, None)
        if entry is not None:
            shared.give_back(entry[0])
        return entry is not None

    def _wake_waiters(self) -> None:
        for fut in (self._recv_waiter, self._space_waiter):
            if fut is not None and not fut.done():
                fut.set_result(None)

    # -- sending ----------------------------------------------------------------

    async def send(self, frame: OutFrame) -> None:
        if self.closed:
            raise ChannelClosed(self._closed_reason())
        frame, leases = self._by_reference(frame) if frame.arrays else (frame, [])
        try:
            await self._send(frame)
        except BaseException:
            for lease in leases:
                self._settle(lease)
            raise

    def _by_reference(self, frame: OutFrame) -> tuple[OutFrame, list[int]]:
        """`frame` with its shared-memory arrays sent as references, each on a lease."""
        refs: dict[int, bytes] = {}
        leases: list[int] = []
        for index, wire in enumerate(frame.arrays):
            if wire.nbytes < shared.MIN_REF_BYTES:
                continue
            found = shared.find(wire)
            if found is None:
                continue
            segment, offset = found
            lease = next(self._lease_ids)
            self._leases[lease] = (segment, wire)
            shared.lend(segment)
            refs[index] = shared.reference(segment, offset, lease)
            leases.append(lease)
        if not refs:
            return frame, []
        return encode_frame(frame.kind, frame.meta, frame.arrays, frame.flags, refs), leases

    async def _send(self, frame: OutFrame) -> None:
        if frame.nbytes > self.max_frame_bytes:
            raise ValueError(f"frame of {frame.nbytes} bytes is over the "
                             f"{self.max_frame_bytes}-byte limit of this channel")
        record = _RECORD_BYTES + align(frame.nbytes)
        whole = record <= self.ring_bytes // 2
        if whole and not self._send_lock.locked() and self._fits(record):
            self._write_whole(frame)
            return
        async with self._send_lock:
            if whole:
                await self._wait_space(record)
                self._write_whole(frame)
            else:
                await self._write_pieces(frame)

    def _fits(self, record: int) -> bool:
        ring = self.ring_bytes
        to_end = ring - self._head % ring
        needed = record if record <= to_end else to_end + record
        return ring - (self._head - int(self._ctl[self._w + _TAIL])) >= needed

    async def _wait_space(self, record: int) -> None:
        ctl, w = self._ctl, self._w
        while True:
            if self.closed:
                raise ChannelClosed(self._closed_reason())
            if self._fits(record):
                return
            ctl[w + _WRITER_WAITING] = 1
            _fence()
            if self._fits(record):
                ctl[w + _WRITER_WAITING] = 0
                return
            self._space_waiter = self._loop.create_future()
            try:
                await self._space_waiter
            finally:
                self._space_waiter = None

    def _begin_record(self, payload: int) -> int:
        """Reserve a contiguous record for `payload` bytes; return its offset."""
        ring, pos = self.ring_bytes, self._head % self.ring_bytes
        if ring - pos < _RECORD_BYTES + align(payload):
            _RECORD.pack_into(self._out, pos, ring - pos - _RECORD_BYTES, PAD, 0)
            self._head += ring - pos
            pos = 0
        return pos

    def _write_whole(self, frame: OutFrame) -> None:
        old_head = self._head
        pos = self._begin_record(frame.nbytes)
        _RECORD.pack_into(self._out, pos, frame.nbytes, WHOLE, frame.nbytes)
        frame.write_into(self._out[pos + _RECORD_BYTES : pos + _RECORD_BYTES + frame.nbytes])
        self._head += _RECORD_BYTES + align(frame.nbytes)
        self.stats["frames_sent"] += 1
        self._publish(old_head)

    async def _write_pieces(self, frame: OutFrame) -> None:
        piece = self.ring_bytes // 4 - _RECORD_BYTES
        total = frame.nbytes
        for start in range(0, total, piece):
            stop = min(start + piece, total)
            kind = FIRST if start == 0 else LAST if stop == total else MIDDLE
            await self._wait_space(_RECORD_BYTES + align(stop - start))
            old_head = self._head
            pos = self._begin_record(stop - start)
            _RECORD.pack_into(self._out, pos, stop - start, kind, total)
            body = pos + _RECORD_BYTES
            frame.copy_range(start, stop, self._out[body : body + stop - start])
            self._head += _RECORD_BYTES + align(stop - start)
            self._publish(old_head)
        self.stats["frames_sent"] += 1

    def _publish(self, old_head: int) -> None:
        ctl, w = self._ctl, self._w
        ctl[w + _HEAD] = self._head
        _fence()
        if ctl[w + _READ_POS] == old_head:
            self._signal_peer()

    # -- receiving --------------------------------------------------------------

    async def receive(self) -> Frame:
        ctl, r = self._ctl, self._r
        while True:
            if self._inbox:
                item = self._inbox.popleft()
                if isinstance(item, DecodeError):
                    raise item
                return item
            if self._closed:
                raise ChannelClosed(self._closed_reason())
            self._drain()
            if self._inbox:
                continue
            if self._peer_gone:
                raise ChannelClosed(self._closed_reason())
            ctl[r + _READ_POS] = self._read_pos
            _fence()
            if ctl[r + _HEAD] != self._read_pos:
                continue
            self._recv_waiter = self._loop.create_future()
            try:
                await self._recv_waiter
            finally:
                self._recv_waiter = None

    def _drain(self) -> None:
        """Move up to RECEIVE_BATCH frames from the ring into the inbox."""
        ring_in = self._in
        if ring_in is None:
            return
        ring, r = self.ring_bytes, self._r
        head = int(self._ctl[r + _HEAD])
        while self._read_pos != head and len(self._inbox) < RECEIVE_BATCH:
            pos = self._read_pos % ring
            nbytes, kind, total = _RECORD.unpack_from(self._mm, self._in_base + pos)
            length = _RECORD_BYTES + align(nbytes)
            if kind not in (WHOLE, FIRST, MIDDLE, LAST, PAD) or length > ring - pos:
                self._corrupt(f"bad ring record (type {kind}, {nbytes} bytes at {pos})")
                return
            body = pos + _RECORD_BYTES
            self._read_pos += length
            if kind == WHOLE:
                self._take_whole(body, nbytes)
                continue
            if kind == PAD:
                self._consumed(self._read_pos)
            else:
                self._take_piece(kind, ring_in[body : body + nbytes], total)
                self._consumed(self._read_pos)

    def _take_whole(self, body: int, nbytes: int) -> None:
        end = self._read_pos
        keep = nbytes >= INPLACE_MIN_BYTES
        if keep:
            # A base array of its own, so its finalizer runs after the last view dies.
            region = np.frombuffer(self._mm, np.uint8, nbytes, self._in_base + body)
        else:
            assert self._in is not None
            region = self._in[body : body + nbytes]
        try:
            frame = parse_frame(region, self.max_frame_bytes, self._resolve)
        except DecodeError as exc:
            self._inbox.append(exc)
            self._consumed(end)
            return
        self.stats["frames_received"] += 1
        if keep and len(frame.arrays) > len(frame.external):
            entry = [end, False]
            self._held.append(entry)
            weakref.finalize(region, self._release, entry)
            frame.borrowed = True
            self.stats["in_place"] += 1
        else:
            external = frame.external
            frame.arrays = [a if i in external else a.copy() for i, a in enumerate(frame.arrays)]
            frame.borrowed = bool(external)
            self._consumed(end)
            self.stats["copied"] += 1
        self._inbox.append(frame)

    def _resolve(self, ref: memoryview, dtype: np.dtype[np.generic],
                 shape: tuple[int, ...]) -> np.ndarray:
        """The peer's shared array `ref` names, mapped here; its lease goes back to the
        peer when the last view of it is gone (or at once, if it cannot be mapped)."""
        lease = shared.lease_of(ref)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        try:
            base = self._mappings.view(ref, nbytes)
        except DecodeError:
            self._return_lease(lease)
            raise
        weakref.finalize(base, self._return_lease, lease)
        self.stats["by_reference"] += 1
        return base.view(dtype).reshape(shape)

    def _return_lease(self, lease: int) -> None:
        if threading.get_ident() != self._thread:
            with contextlib.suppress(RuntimeError):  # the loop is closed: peer sees us go
                self._loop.call_soon_threadsafe(self._return_lease, lease)
            return
        if self._closed or self._peer_gone:
            return
        self._sock_out += _LEASE.pack(lease)
        self._flush_sock()

    def _flush_sock(self) -> None:
        try:
            sent = self._sock.send(self._sock_out)
        except BlockingIOError:
            sent = 0
        except OSError:
            self._sock_out.clear()
            return
        del self._sock_out[:sent]
        if self._sock_out:
            self._loop.add_writer(self._end.sock_fd, self._on_sock_writable)

    def _on_sock_writable(self) -> None:
        self._loop.remove_writer(self._end.sock_fd)
        if not self._closed:
            self._flush_sock()

    def _return_all(self) -> None:
        for lease in list(self._leases):
            self._settle(lease)

    def _take_piece(self, kind: int, data: np.ndarray, total: int) -> None:
        if kind == FIRST:
            if total > self.max_frame_bytes:
                self._corrupt(f"streamed frame of {total} bytes is over the limit")
                return
            self._assembly = self._pool.take(total)
            self._assembled = 0
        assembly = self._assembly
        if assembly is None or self._assembled + len(data) > len(assembly):
            self._corrupt("streamed frame pieces out of order")
            return
        assembly[self._assembled : self._assembled + len(data)] = data
        self._assembled += len(data)
        if kind == LAST:
            self._assembly = None
            if self._assembled != len(assembly):
                self._corrupt("streamed frame ended early")
                return
            try:
                frame = parse_frame(assembly, self.max_frame_bytes, self._resolve)
                frame.borrowed = bool(frame.external)
                self._inbox.append(frame)
                self.stats["frames_received"] += 1
                self.stats["streamed"] += 1
            except DecodeError as exc:
                self._inbox.append(exc)

    def _consumed(self, end: int) -> None:
        if self._held:
            self._held.append([end, True])
        else:
            self._set_tail(end)

    def _release(self, entry: list[Any]) -> None:
        if threading.get_ident() != self._thread:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nothing to free
                self._loop.call_soon_threadsafe(self._release, entry)
            return
        entry[1] = True
        if self._closed:
            return
        end = None
        while self._held and self._held[0][1]:
            end = self._held.popleft()[0]
        if end is not None:
            self._set_tail(end)

    def _set_tail(self, end: int) -> None:
        ctl, r = self._ctl, self._r
        ctl[r + _TAIL] = end
        _fence()
        if ctl[r + _WRITER_WAITING]:
            ctl[r + _WRITER_WAITING] = 0
            self._signal_peer()

    def _corrupt(self, reason: str) -> None:
        self._inbox.append(DecodeError(f"shared-memory ring out of step: {reason}"))
        self._peer_gone = True  # nothing after this can be trusted
        self._in = None

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
        self._return_all()
        self._mappings.clear()
        for fd in (end.memfd, end.wake_fd, end.peer_wake_fd):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._wake_waiters()
        self._ctl.release()
        self._out.release()
        self._in = None
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
