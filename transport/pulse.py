"""Liveness off the event loop: one thread per process pings and answers over UDP.

A websocket ping is answered by the event loop, so a peer busy for seconds in one call
(a BLAS step, a large fsync) looks as dead as a frozen one. A frozen process (SIGSTOP)
or a lost host answers nothing at all, while a busy one still runs its other threads.
So every process with websocket channels runs one `Pulse`: a daemon thread with one
UDP socket that answers each authenticated ping at once and pings every watched peer
`deadline / PINGS_PER_DEADLINE` seconds. A peer from which neither a pulse nor a
websocket message came for `deadline` seconds is reported silent, from the thread, to
the loop that registered it (`call_soon_threadsafe`); the channel then closes.

Datagram (little-endian, 40 bytes):

    b"adbp" | kind u8 (PING 1, PONG 2) | 3 zero bytes | sender id (8) | seq u64 | tag (16)

The id and the key of each direction come from the websocket's session key of that
direction (`transport.wsauth`), so only the two ends of that connection can make a
valid datagram, and the two ends of one connection in one process do not collide; a
datagram carries its sender's id, tag = HMAC-SHA256(key, kind | id | seq) cut to 16
bytes. A ping is answered only when its seq is newer than the last one answered, and a
pong counts only for the newest ping sent, so replayed datagrams prove nothing.
Anything else is counted and dropped.

Where UDP does not get through (no pong ever came), websocket traffic alone keeps a
channel alive, and a busy peer can then be mistaken for a frozen one; that is logged
once per channel. A thread that was itself stopped (its process frozen and woken)
gives every peer a fresh deadline instead of blaming them for its own silence.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import selectors
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

log = logging.getLogger("asyncdb.transport.pulse")

MAGIC = b"adbp"
PING, PONG = 1, 2
DATAGRAM = struct.Struct("<4sB3x8sQ16s")
PINGS_PER_DEADLINE = 5

Silent = Callable[[str], None]  # called (from the pulse thread) with the reason


@dataclass(frozen=True)
class PulseKeys:
    """One side's ids and keys: it sends datagrams as `send_id` under `send_key` and
    takes those that come as `receive_id` under `receive_key`."""

    send_id: bytes
    send_key: bytes
    receive_id: bytes
    receive_key: bytes


def pulse_keys(send_key: bytes, receive_key: bytes) -> PulseKeys:
    """Derived from a websocket's session keys of the two directions."""
    def derive(key: bytes, label: bytes) -> bytes:
        return hmac.new(key, b"asyncdb-pulse|" + label, hashlib.sha256).digest()

    return PulseKeys(derive(send_key, b"id")[:8], derive(send_key, b"key"),
                     derive(receive_key, b"id")[:8], derive(receive_key, b"key"))


def _tag(key: bytes, kind: int, sender: bytes, seq: int) -> bytes:
    return hmac.new(key, struct.pack("<B8sQ", kind, sender, seq), hashlib.sha256).digest()[:16]


def datagram(key: bytes, kind: int, sender: bytes, seq: int) -> bytes:
    return DATAGRAM.pack(MAGIC, kind, sender, seq, _tag(key, kind, sender, seq))


@dataclass
class Watch:
    """One watched channel. `heard` is when the peer was last heard from by either
    path: the pulse thread sets it on a pong or ping, the channel on a message."""

    name: str
    keys: PulseKeys
    address: tuple[str, int] | None
    deadline: float
    on_silent: Silent
    heard: float = field(default_factory=time.monotonic)
    pinged: float = 0.0
    seq: int = 0  # of our last ping
    answered: int = 0  # the peer's newest ping we answered
    confirmed: bool = False  # a pong came: UDP gets through
    warned: bool = False
    reported: bool = False

    def touch(self) -> None:
        self.heard = time.monotonic()


class Pulse:
    """The pulse thread of one process (see the module docstring). `acquire()` gives
    the shared one; tests make their own."""

    _shared: Pulse | None = None
    _shared_lock = threading.Lock()

    def __init__(self, host: str = "::") -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            if family == socket.AF_INET6:
                with contextlib.suppress(OSError):  # dual stack: IPv4 peers too
                    self._sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            self._sock.bind((host, 0))
        except OSError:
            self._sock.close()
            raise
        self._sock.setblocking(False)
        self.port: int = self._sock.getsockname()[1]
        self._family = family
        self._watches: dict[bytes, Watch] = {}
        self._lock = threading.Lock()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_w.setblocking(False)  # never holds up the loop that watches
        self._selector = selectors.DefaultSelector()  # any descriptor number
        self._selector.register(self._sock, selectors.EVENT_READ)
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        self._closed = False
        self._users = 0
        self.rejected = 0  # datagrams dropped: malformed, unknown, forged or replayed
        self._thread = threading.Thread(target=self._run, name="asyncdb-pulse", daemon=True)
        self._thread.start()

    @classmethod
    def acquire(cls) -> Pulse:
        """This process's pulse thread, started by its first user; `release` when done
        with it (the last release stops it)."""
        with cls._shared_lock:
            if cls._shared is None:
                try:
                    cls._shared = Pulse("::")
                except OSError:  # no IPv6 here
                    cls._shared = Pulse("0.0.0.0")
            cls._shared._users += 1
            return cls._shared

    def release(self) -> None:
        with Pulse._shared_lock:
            self._users -= 1
            last = self._users <= 0 and Pulse._shared is self
            if last:
                Pulse._shared = None
        if last:
            self.close()

    @property
    def running(self) -> bool:
        """Whether the thread still pings and judges (it stops on close, or on an error
        of its socket, which it logs)."""
        return self._thread.is_alive() and not self._closed

    def watch(self, watch: Watch) -> Watch:
        with self._lock:
            self._watches[watch.keys.receive_id] = watch
        self._nudge()  # its first ping goes now
        return watch

    def _nudge(self) -> None:
        with contextlib.suppress(OSError):  # full: the thread is awake anyway
            self._wake_w.send(b"\0")

    def forget(self, watch: Watch) -> None:
        with self._lock:
            if self._watches.get(watch.keys.receive_id) is watch:
                del self._watches[watch.keys.receive_id]

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._nudge()
        self._thread.join(5.0)  # it wakes on the nudge: a few microseconds
        self._selector.close()
        for sock in (self._sock, self._wake_r, self._wake_w):
            sock.close()

    # -- the thread ---------------------------------------------------------------

    def _run(self) -> None:
        last, interval, slack = time.monotonic(), 1.0, 0.5
        while not self._closed:
            try:
                ready = {key.fileobj for key, _ in self._selector.select(interval)}
            except OSError as exc:
                if not self._closed:
                    log.error("pulse thread stops: %r; websocket liveness rests on "
                              "websocket traffic from now on", exc)
                return
            now = time.monotonic()
            if now - last > interval + slack:
                with self._lock:  # we were stopped ourselves: nobody is to blame
                    for watch in self._watches.values():
                        watch.heard = now
            last = now
            if self._wake_r in ready:
                with contextlib.suppress(OSError):
                    self._wake_r.recv(4096)
            if self._sock in ready:
                self._receive()
            with self._lock:
                watches = list(self._watches.values())
            self._tick(watches, now)
            interval = min((w.deadline / PINGS_PER_DEADLINE for w in watches), default=1.0)
            slack = min((w.deadline for w in watches), default=1.0) / 2

    def _receive(self) -> None:
        for _ in range(256):  # what has come, without starving the pings
            try:
                data, sender = self._sock.recvfrom(64)
            except OSError:  # nothing more to read (BlockingIOError), or closed
                return
            self._take(data, sender)

    def _take(self, data: bytes, sender: tuple[str, int]) -> None:
        if len(data) != DATAGRAM.size:
            self.rejected += 1
            return
        magic, kind, sender_id, seq, tag = DATAGRAM.unpack(data)
        with self._lock:
            watch = self._watches.get(sender_id)
        if magic != MAGIC or watch is None or kind not in (PING, PONG) or not \
                hmac.compare_digest(tag, _tag(watch.keys.receive_key, kind, sender_id, seq)):
            self.rejected += 1
            return
        if kind == PING:
            if seq <= watch.answered:
                self.rejected += 1
                return
            watch.answered = seq
            watch.touch()
            keys = watch.keys
            self._send(datagram(keys.send_key, PONG, keys.send_id, seq), sender)
        elif seq == watch.seq:  # the answer to our newest ping; a late one proves nothing
            watch.confirmed = True
            watch.touch()

    def _tick(self, watches: list[Watch], now: float) -> None:
        for watch in watches:
            if watch.reported:
                continue
            if now - watch.heard > watch.deadline:
                watch.reported = True
                self._report(watch, f"nothing heard from {watch.name} for "
                                    f"{now - watch.heard:.1f} s (deadline {watch.deadline:g} s)")
                continue
            if watch.address is None or now - watch.pinged < watch.deadline / PINGS_PER_DEADLINE:
                continue
            if not watch.confirmed and watch.seq >= 2 * PINGS_PER_DEADLINE and not watch.warned:
                watch.warned = True
                log.warning("no pulse answer from %s at UDP %s:%d: its liveness rests on "
                            "websocket traffic, so a long busy spell there may be taken "
                            "for a freeze", watch.name, *watch.address[:2])
            watch.seq += 1
            watch.pinged = now
            keys = watch.keys
            self._send(datagram(keys.send_key, PING, keys.send_id, watch.seq), watch.address)

    def _send(self, data: bytes, address: tuple[str, int]) -> None:
        with contextlib.suppress(OSError):  # unreachable now: the deadline decides
            self._sock.sendto(data, self._address(address))

    def _address(self, address: tuple[str, int]) -> tuple[str, int]:
        host, port = address[0], address[1]
        if self._family == socket.AF_INET6 and ":" not in host:
            host = "::ffff:" + host  # an IPv4 peer through the dual-stack socket
        return host, port

    def _report(self, watch: Watch, reason: str) -> None:
        try:
            watch.on_silent(reason)
        except Exception:
            log.exception("pulse: silent-peer callback for %s failed", watch.name)
