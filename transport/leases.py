"""Shared arrays lent over a shared-memory link, and the peer's arrays read here.

Arrays that already live in shared memory (`transport.shared`) are not copied into the
ring: the frame carries a reference with a lease id, the receiver maps the sender's
memfd read-only and reads the array in place, and when the last view of it is gone it
writes the lease id to the link's socketpair, which tells the sender the memory is its
own again. A lost peer settles every lease it held.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import socket
import struct
import threading
import weakref
from collections.abc import Callable

import numpy as np

from . import shared
from .errors import DecodeError
from .frame import OutFrame, encode_frame

log = logging.getLogger(__name__)

LEASE = struct.Struct("<Q")  # a returned lease, on the socketpair


class LeaseTable:
    """Both sides of lending over one link: the leases this side holds for the peer,
    and the peer's memory this side maps. `gone()` says the link is closed or lost (no
    lease goes back then); returns travel over `sock`, non-blocking."""

    def __init__(self, sock: socket.socket, gone: Callable[[], bool],
                 stats: dict[str, int]) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.get_ident()
        self._sock = sock
        self._gone = gone
        self._stats = stats
        self._ids = itertools.count(1)
        self._leases: dict[int, tuple[shared.Segment, np.ndarray]] = {}
        self._mappings = shared.Mappings()
        self._in = bytearray()
        self._out = bytearray()

    # -- lending ----------------------------------------------------------------

    def lend(self, frame: OutFrame) -> tuple[OutFrame, list[int]]:
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
            lease = next(self._ids)
            self._leases[lease] = (segment, wire)
            shared.lend(segment)
            refs[index] = shared.reference(segment, offset, lease)
            leases.append(lease)
        if not refs:
            return frame, []
        return encode_frame(frame.kind, frame.meta, frame.arrays, frame.flags, refs), leases

    def settle(self, lease: int) -> bool:
        """The peer no longer reads what `lease` lent it; False if no such lease."""
        entry = self._leases.pop(lease, None)
        if entry is not None:
            shared.give_back(entry[0])
        return entry is not None

    def settle_all(self) -> None:
        for lease in list(self._leases):
            self.settle(lease)

    def returned(self, data: bytes) -> None:
        """Bytes the peer wrote to the socketpair: lease ids it gives back."""
        self._in += data
        whole = len(self._in) - len(self._in) % LEASE.size
        for (lease,) in LEASE.iter_unpack(self._in[:whole]):
            if not self.settle(lease):
                log.warning("shm peer returned unknown lease %d; ignored", lease)
        del self._in[:whole]

    # -- borrowing --------------------------------------------------------------

    def resolve(self, ref: memoryview, dtype: np.dtype[np.generic],
                shape: tuple[int, ...]) -> np.ndarray:
        """The peer's shared array `ref` names, mapped here; its lease goes back to the
        peer when the last view of it is gone (or at once, if it cannot be mapped)."""
        lease = shared.lease_of(ref)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        try:
            base = self._mappings.view(ref, nbytes)
        except DecodeError:
            self._give_back(lease)
            raise
        weakref.finalize(base, self._give_back, lease)
        self._stats["by_reference"] += 1
        return base.view(dtype).reshape(shape)

    def _give_back(self, lease: int) -> None:
        if threading.get_ident() != self._thread:
            with contextlib.suppress(RuntimeError):  # the loop is closed: peer sees us go
                self._loop.call_soon_threadsafe(self._give_back, lease)
            return
        if self._gone():
            return
        self._out += LEASE.pack(lease)
        self._flush()

    def _flush(self) -> None:
        try:
            sent = self._sock.send(self._out)
        except BlockingIOError:
            sent = 0
        except OSError:
            self._out.clear()
            return
        del self._out[:sent]
        if self._out:
            self._loop.add_writer(self._sock.fileno(), self._on_writable)

    def _on_writable(self) -> None:
        self._loop.remove_writer(self._sock.fileno())
        if not self._gone():
            self._flush()

    def close(self) -> None:
        """Settle everything lent (the peer cannot return it now) and unmap the peer's
        memory (views still alive keep their mapping)."""
        self.settle_all()
        self._mappings.clear()
