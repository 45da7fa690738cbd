"""One direction of a shared-memory link: a single-producer single-consumer byte ring.

Each frame is written once into the ring, as records aligned to 64 bytes:

    WHOLE   a frame of at most half the ring, contiguous (a PAD record fills the
            ring's tail when it would not fit before the wrap)
    FIRST / MIDDLE / LAST   a larger frame, streamed through the ring in pieces of a
            quarter of the ring and assembled in a pooled buffer (one copy)

Each direction has six control words (u64), each on its own cache line: HEAD (bytes
written), TAIL (bytes the writer may reuse), READ_POS (bytes the reader has looked at),
WRITER_WAITING, READER_SLEEPING and WAKE_STAMP (CLOCK_MONOTONIC, in ns, of the writer's
last signal: the reader learns from it how long its wake-up took). Wake-ups are
signalled only on transitions: the writer signals when the reader said it is about to
sleep (READER_SLEEPING; the writer clears it, so a batch of frames written while the
reader wakes up costs one signal), the reader signals when the writer said it is
waiting for space (full to not-full). A reader that expects frames soon may poll HEAD
instead, with READER_SLEEPING clear, and no writer signals it.

No wake-up is lost: both sides store their own word, then fence, then load the other's
(Dekker). The reader stores READER_SLEEPING = 1, fences, loads HEAD; the writer stores
HEAD, fences, loads READER_SLEEPING. With a full fence between each store and load, at
least one side sees the other's store: the reader sees the new HEAD and does not sleep,
or the writer sees the flag and signals (an eventfd write, which the sleeping reader
wakes on). A writer that saw the flag and clears it late, after the reader re-armed it,
signals right after its store, so the reader wakes, reads, and arms the flag again.

Whole frames of 64 KiB and more are parsed in place and marked `borrowed`: their arrays
are views into the ring, whose space is reused only once the last view is gone. Small
frames are copied out at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import mmap
import struct
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from typing import Any

import numpy as np

from .errors import DecodeError
from .frame import Frame, OutFrame, Resolver, align, parse_frame, parse_plain
from .pool import BufferPool

INPLACE_MIN_BYTES = 64 << 10
RECEIVE_BATCH = 64

RECORD = struct.Struct("<IIQ")  # payload bytes, record type, whole frame bytes
RECORD_BYTES = 64
WHOLE, FIRST, MIDDLE, LAST, PAD = 1, 2, 3, 4, 5

# Control words (u64) per direction, each on its own cache line.
HEAD, TAIL, READ_POS, WRITER_WAITING, READER_SLEEPING, WAKE_STAMP = 0, 8, 16, 24, 32, 40
DIRECTION_WORDS = 64

_FENCE = threading.Lock()


def fence() -> None:
    # An uncontended lock round trip is an atomic read-modify-write: a full barrier.
    _FENCE.acquire()
    _FENCE.release()


class RingWriter:
    """Writes frames into one ring. `signal` wakes the reader; `check_open` raises
    ChannelClosed once the link is gone (while waiting for space too)."""

    def __init__(self, ring: memoryview, ctl: memoryview, words: int,
                 signal: Callable[[], None], check_open: Callable[[], None]) -> None:
        self.ring_bytes = len(ring)
        self._out = ring
        self._ctl = ctl
        self._w = words  # index of this direction's control words
        self._signal = signal
        self._check_open = check_open
        self._head = int(ctl[words + HEAD])
        self._lock = asyncio.Lock()
        self._space_waiter: asyncio.Future[None] | None = None
        self.frames_sent = 0

    async def write(self, frame: OutFrame) -> None:
        record = RECORD_BYTES + align(frame.nbytes)
        whole = record <= self.ring_bytes // 2
        if whole and not self._lock.locked() and self._fits(record):
            self._write_whole(frame)
            return
        async with self._lock:
            if whole:
                await self._wait_space(record)
                self._write_whole(frame)
            else:
                await self._write_pieces(frame)

    def wake(self) -> None:
        """The reader freed space (or the link changed state): look again."""
        fut = self._space_waiter
        if fut is not None and not fut.done():
            fut.set_result(None)

    def _fits(self, record: int) -> bool:
        ring = self.ring_bytes
        to_end = ring - self._head % ring
        needed = record if record <= to_end else to_end + record
        return ring - (self._head - int(self._ctl[self._w + TAIL])) >= needed

    async def _wait_space(self, record: int) -> None:
        ctl, w = self._ctl, self._w
        loop = asyncio.get_running_loop()
        while True:
            self._check_open()
            if self._fits(record):
                return
            ctl[w + WRITER_WAITING] = 1
            fence()
            if self._fits(record):
                ctl[w + WRITER_WAITING] = 0
                return
            self._space_waiter = loop.create_future()
            try:
                await self._space_waiter
            finally:
                self._space_waiter = None

    def _begin_record(self, payload: int) -> int:
        """Reserve a contiguous record for `payload` bytes; return its offset."""
        ring, pos = self.ring_bytes, self._head % self.ring_bytes
        if ring - pos < RECORD_BYTES + align(payload):
            RECORD.pack_into(self._out, pos, ring - pos - RECORD_BYTES, PAD, 0)
            self._head += ring - pos
            pos = 0
        return pos

    def _write_whole(self, frame: OutFrame) -> None:
        nbytes = frame.nbytes
        pos = self._begin_record(nbytes)
        RECORD.pack_into(self._out, pos, nbytes, WHOLE, nbytes)
        frame.write_into(self._out[pos + RECORD_BYTES : pos + RECORD_BYTES + nbytes])
        self._head += RECORD_BYTES + align(nbytes)
        self.frames_sent += 1
        self._publish()

    async def _write_pieces(self, frame: OutFrame) -> None:
        piece = self.ring_bytes // 4 - RECORD_BYTES
        total = frame.nbytes
        for start in range(0, total, piece):
            stop = min(start + piece, total)
            kind = FIRST if start == 0 else LAST if stop == total else MIDDLE
            await self._wait_space(RECORD_BYTES + align(stop - start))
            pos = self._begin_record(stop - start)
            RECORD.pack_into(self._out, pos, stop - start, kind, total)
            body = pos + RECORD_BYTES
            frame.copy_range(start, stop, self._out[body : body + stop - start])
            self._head += RECORD_BYTES + align(stop - start)
            self._publish()
        self.frames_sent += 1

    def _publish(self) -> None:
        ctl, w = self._ctl, self._w
        ctl[w + HEAD] = self._head
        fence()
        if ctl[w + READER_SLEEPING]:
            ctl[w + READER_SLEEPING] = 0
            ctl[w + WAKE_STAMP] = time.monotonic_ns()
            self._signal()

    def close(self) -> None:
        self._out.release()


class RingReader:
    """Reads frames out of one ring into `inbox` (frames, or the DecodeError a bad
    frame raised). `signal` wakes the writer; `resolve` maps arrays sent by reference;
    `on_broken` is told when the ring is out of step and nothing more can be trusted."""

    def __init__(self, mm: mmap.mmap, base: int, ring_bytes: int, ctl: memoryview,
                 words: int, max_frame_bytes: int, resolve: Resolver,
                 signal: Callable[[], None], on_broken: Callable[[], None]) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.get_ident()
        self.ring_bytes = ring_bytes
        self.max_frame_bytes = max_frame_bytes
        self._mm = mm
        self._base = base
        self._in: np.ndarray | None = np.frombuffer(mm, np.uint8, ring_bytes, base)
        self._ctl = ctl
        self._r = words  # index of this direction's control words
        self._resolve = resolve
        self._signal = signal
        self._on_broken = on_broken
        self._read_pos = int(ctl[words + READ_POS])
        self._held: deque[list[Any]] = deque()  # [end, released] per record, in order
        self._pool = BufferPool()
        self._assembly: np.ndarray | None = None
        self._assembled = 0
        self._closed = False
        self.inbox: deque[Frame | DecodeError] = deque()
        self.stats = {"frames_received": 0, "in_place": 0, "copied": 0, "streamed": 0}

    def pending(self) -> bool:
        """Whether the writer wrote past where this side has read."""
        return bool(self._ctl[self._r + HEAD] != self._read_pos)

    def idle(self) -> bool:
        """Say that this side is about to sleep, then check whether the writer wrote
        since: True when it is safe to sleep until the writer's signal."""
        ctl, r = self._ctl, self._r
        ctl[r + READ_POS] = self._read_pos
        ctl[r + READER_SLEEPING] = 1
        fence()
        if ctl[r + HEAD] == self._read_pos:
            return True
        ctl[r + READER_SLEEPING] = 0
        return False

    def sleeping(self) -> bool:
        """Whether this side has said it sleeps (a writer would signal it)."""
        return bool(self._ctl[self._r + READER_SLEEPING])

    def wake_latency(self, since: float) -> float:
        """Called on a wake-up: how long it took, if the writer signalled after `since`
        (CLOCK_MONOTONIC seconds, when this side went to sleep), else 0.0 (the wake-up
        was for something else, such as freed space)."""
        stamp = int(self._ctl[self._r + WAKE_STAMP]) / 1e9
        return max(0.0, time.monotonic() - stamp) if stamp and stamp >= since else 0.0

    def polling(self) -> None:
        """This side stays awake and polls `pending`: writers need not signal. Call
        `idle` before sleeping again."""
        self._ctl[self._r + READER_SLEEPING] = 0

    def drain(self) -> None:
        """Move up to RECEIVE_BATCH frames from the ring into the inbox."""
        ring_in = self._in
        if ring_in is None:
            return
        ring = self.ring_bytes
        head = int(self._ctl[self._r + HEAD])
        while self._read_pos != head and len(self.inbox) < RECEIVE_BATCH:
            pos = self._read_pos % ring
            nbytes, kind, total = RECORD.unpack_from(self._mm, self._base + pos)
            length = RECORD_BYTES + align(nbytes)
            if kind not in (WHOLE, FIRST, MIDDLE, LAST, PAD) or length > ring - pos:
                self._corrupt(f"bad ring record (type {kind}, {nbytes} bytes at {pos})")
                return
            body = pos + RECORD_BYTES
            self._read_pos += length
            if kind == WHOLE:
                self._take_whole(body, nbytes)
                continue
            if kind != PAD:
                self._take_piece(kind, ring_in[body : body + nbytes], total)
            self._consumed(self._read_pos)

    def _take_whole(self, body: int, nbytes: int) -> None:
        end = self._read_pos
        keep = nbytes >= INPLACE_MIN_BYTES
        if not keep:  # most messages: no arrays, metadata copied straight out
            plain = parse_plain(self._mm, self._base + body, nbytes, self.max_frame_bytes)
            if plain is not None:
                self._consumed(end)
                self.stats["frames_received"] += 1
                self.stats["copied"] += 1
                self.inbox.append(plain)
                return
        if keep:
            # A base array of its own, so its finalizer runs after the last view dies.
            region = np.frombuffer(self._mm, np.uint8, nbytes, self._base + body)
        else:
            assert self._in is not None
            region = self._in[body : body + nbytes]
        try:
            frame = parse_frame(region, self.max_frame_bytes, self._resolve)
        except DecodeError as exc:
            self.inbox.append(exc)
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
        self.inbox.append(frame)

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
                self.inbox.append(frame)
                self.stats["frames_received"] += 1
                self.stats["streamed"] += 1
            except DecodeError as exc:
                self.inbox.append(exc)

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
        ctl[r + TAIL] = end
        fence()
        if ctl[r + WRITER_WAITING]:
            ctl[r + WRITER_WAITING] = 0
            self._signal()

    def _corrupt(self, reason: str) -> None:
        self.inbox.append(DecodeError(f"shared-memory ring out of step: {reason}"))
        self._in = None
        self._on_broken()

    def close(self) -> None:
        self._closed = True
        self._in = None
