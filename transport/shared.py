"""Arrays in shared memory, sent between the processes of one host without a copy.

`empty(shape, dtype)` returns a numpy array backed by an anonymous memfd of its own.
Over a shared-memory ring such an array travels by reference: the frame says where it
lives, the receiver maps it read-only (once, then cached) and reads it in place, and
the sender hears back when the receiver has let go of it. Until then the sender must
not write to it; `await released(array)` waits for that moment. Over every other
transport it is an ordinary array, copied as usual, and nothing waits.

Nothing is named in /dev/shm: the memory goes when the array is garbage and every
receiver has dropped its mapping, `kill -9` included.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import mmap
import os
import struct
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import DecodeError
from .frame import REF_BYTES

MIN_REF_BYTES = 64 << 10  # smaller shared arrays are cheaper to copy than to map
MAPPINGS_KEPT = 16  # peers' segments kept mapped per process for reuse

REF = struct.Struct("<IIQQQ")  # sender pid, fd, inode, byte offset, lease id
assert REF.size == REF_BYTES


@dataclass(eq=False)
class Segment:
    """One memfd mapped in this process, and how many receivers still read it."""

    fd: int
    inode: int
    address: int
    nbytes: int
    lent: int = 0
    waiters: list[asyncio.Future[None]] = field(default_factory=list)


_lock = threading.Lock()
_starts: list[int] = []  # sorted segment addresses
_by_start: dict[int, Segment] = {}


def empty(shape: int | tuple[int, ...], dtype: Any = np.float32) -> np.ndarray:
    """A new uninitialised array in shared memory of this process."""
    dt = np.dtype(dtype)
    dims = (shape,) if isinstance(shape, int) else tuple(shape)
    nbytes = int(np.prod(dims, dtype=np.int64)) * dt.itemsize
    size = max(-(-nbytes // mmap.PAGESIZE) * mmap.PAGESIZE, mmap.PAGESIZE)
    fd = os.memfd_create("asyncdb-shared", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, size)
        mm = mmap.mmap(fd, size)
    except BaseException:
        os.close(fd)
        raise
    base = np.frombuffer(mm, np.uint8, size)
    segment = Segment(fd, os.fstat(fd).st_ino, base.ctypes.data, size)
    with _lock:
        bisect.insort(_starts, segment.address)
        _by_start[segment.address] = segment
    weakref.finalize(base, _free, segment)
    out: np.ndarray = base[:nbytes].view(dt).reshape(dims)
    return out


def zeros(shape: int | tuple[int, ...], dtype: Any = np.float32) -> np.ndarray:
    """A new zero-filled array in shared memory (a fresh memfd reads as zeros)."""
    return empty(shape, dtype)


def copy(array: np.ndarray) -> np.ndarray:
    """A copy of `array` in shared memory."""
    out = empty(array.shape, array.dtype)
    np.copyto(out, array)
    return out


def _free(segment: Segment) -> None:
    with _lock:
        index = bisect.bisect_left(_starts, segment.address)
        if index < len(_starts) and _starts[index] == segment.address:
            del _starts[index]
        _by_start.pop(segment.address, None)
    with contextlib.suppress(OSError):
        os.close(segment.fd)


def find(array: np.ndarray) -> tuple[Segment, int] | None:
    """The segment holding a C-contiguous `array`, and the array's offset in it."""
    if not array.flags.c_contiguous or not _starts:
        return None
    address = array.__array_interface__["data"][0]
    with _lock:
        index = bisect.bisect_right(_starts, address) - 1
        if index < 0:
            return None
        segment = _by_start[_starts[index]]
    if address + array.nbytes > segment.address + segment.nbytes:
        return None
    return segment, address - segment.address


def in_flight(array: np.ndarray) -> int:
    """How many sends of the segment holding `array` receivers still read."""
    found = find(array)
    return found[0].lent if found else 0


async def released(array: np.ndarray) -> None:
    """Wait until no receiver reads the shared memory holding `array` any more, so
    writing to it is safe. Returns at once for arrays not in shared memory."""
    found = find(array)
    if found is None:
        return
    segment = found[0]
    while segment.lent:
        waiter = asyncio.get_running_loop().create_future()
        segment.waiters.append(waiter)
        await waiter


def lend(segment: Segment) -> None:
    segment.lent += 1


def give_back(segment: Segment) -> None:
    segment.lent -= 1
    if segment.lent:
        return
    waiters, segment.waiters = segment.waiters, []
    for waiter in waiters:
        if not waiter.done():
            loop = waiter.get_loop()
            if loop.is_closed():
                continue
            loop.call_soon_threadsafe(_wake, waiter)


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


def reference(segment: Segment, offset: int, lease: int) -> bytes:
    return REF.pack(os.getpid(), segment.fd, segment.inode, offset, lease)


def lease_of(ref: memoryview) -> int:
    return int(REF.unpack_from(ref)[4])


class Mappings:
    """Peers' segments mapped read-only in this process, the most recent kept."""

    def __init__(self, keep: int = MAPPINGS_KEPT) -> None:
        self.keep = keep
        self._maps: OrderedDict[tuple[int, int, int], mmap.mmap] = OrderedDict()

    def view(self, ref: memoryview, nbytes: int) -> np.ndarray:
        """A read-only uint8 base array of `nbytes` where `ref` points; DecodeError
        if the memory cannot be reached or is not what the reference says."""
        pid, fd, inode, offset, _lease = REF.unpack_from(ref)
        key = (pid, fd, inode)
        mm = self._maps.get(key)
        if mm is None:
            mm = self._open(pid, fd, inode)
            self._maps[key] = mm
            while len(self._maps) > self.keep:
                self._maps.popitem(last=False)  # live views keep their mapping
        else:
            self._maps.move_to_end(key)
        if offset + nbytes > len(mm):
            raise DecodeError(f"shared array reference runs past its segment "
                              f"({offset} + {nbytes} > {len(mm)} bytes)")
        return np.frombuffer(mm, np.uint8, nbytes, offset)

    @staticmethod
    def _open(pid: int, fd: int, inode: int) -> mmap.mmap:
        try:
            handle = os.open(f"/proc/{pid}/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise DecodeError(f"shared array of process {pid} cannot be opened: {exc}") from exc
        try:
            info = os.fstat(handle)
            if info.st_ino != inode:
                raise DecodeError(f"shared array of process {pid} is gone (fd {fd} now "
                                  "names other memory)")
            if info.st_size == 0:
                raise DecodeError(f"shared array of process {pid} is empty")
            # Page tables filled in one go: cheaper than a fault for every page.
            flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
            return mmap.mmap(handle, info.st_size, flags=flags, prot=mmap.PROT_READ)
        finally:
            os.close(handle)

    def clear(self) -> None:
        self._maps.clear()
