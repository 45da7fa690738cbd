"""The pulse thread: authenticated UDP pings answered off the event loop, silence
reported after the deadline, garbage and forgeries dropped."""

from __future__ import annotations

import os
import socket
import threading
import time

import pytest

from asyncdb.transport.pulse import DATAGRAM, PING, PONG, Pulse, Watch, datagram, pulse_keys

SEND, RECEIVE = os.urandom(32), os.urandom(32)


def wait_until(condition, timeout=20.0):
    """Poll `condition` (a cheap read of the threads' state) until it holds."""
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "condition not reached"
        time.sleep(0.005)


class Ends:
    """Two pulse threads watching each other, as the two ends of one websocket."""

    def __init__(self, deadline: float) -> None:
        self.a, self.b = Pulse("127.0.0.1"), Pulse("127.0.0.1")
        self.silent = {"a": threading.Event(), "b": threading.Event()}
        self.reasons: dict[str, str] = {}
        channel, a_send, a_receive = pulse_keys(SEND, RECEIVE, SEND)
        _same, b_send, b_receive = pulse_keys(RECEIVE, SEND, SEND)
        self.keys = {"a_send": a_send, "b_send": b_send}
        self.watch_a = self.a.watch(Watch("b", channel, a_send, a_receive,
                                          ("127.0.0.1", self.b.port), deadline,
                                          lambda why: self._silent("a", why)))
        self.watch_b = self.b.watch(Watch("a", channel, b_send, b_receive,
                                          ("127.0.0.1", self.a.port), deadline,
                                          lambda why: self._silent("b", why)))

    def _silent(self, side: str, reason: str) -> None:
        self.reasons[side] = reason
        self.silent[side].set()

    def close(self) -> None:
        self.a.close()
        self.b.close()


@pytest.fixture
def ends():
    made: list[Ends] = []
    yield lambda deadline: made.append(Ends(deadline)) or made[-1]
    for pair in made:
        pair.close()


def test_both_ends_derive_one_channel_and_crossed_keys():
    channel_a, a_send, a_receive = pulse_keys(SEND, RECEIVE, SEND)
    channel_b, b_send, b_receive = pulse_keys(RECEIVE, SEND, SEND)
    assert channel_a == channel_b and len(channel_a) == 8
    assert a_send == b_receive and b_send == a_receive and a_send != a_receive


def test_pings_are_answered_and_nobody_is_reported(ends):
    pair = ends(0.5)
    wait_until(lambda: pair.watch_a.seq >= 10 and pair.watch_b.seq >= 10)  # two deadlines
    assert pair.watch_a.confirmed and pair.watch_b.confirmed
    assert not pair.silent["a"].is_set() and not pair.silent["b"].is_set()
    assert pair.a.rejected == pair.b.rejected == 0


def test_a_peer_that_stops_answering_is_reported_after_the_deadline(ends):
    pair = ends(0.5)
    wait_until(lambda: pair.watch_a.confirmed)
    stopped = time.monotonic()
    pair.b.close()  # b's process gone or frozen: nothing answers
    assert pair.silent["a"].wait(20)
    assert time.monotonic() - stopped >= 0.5 * 0.8  # not before the deadline
    assert "nothing heard from b" in pair.reasons["a"]


def test_garbage_forgeries_and_replays_are_dropped(ends):
    pair = ends(0.5)
    wait_until(lambda: pair.watch_a.confirmed and pair.watch_b.confirmed)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        _hostile_then_genuine(pair, probe)
    assert not pair.silent["a"].is_set() and not pair.silent["b"].is_set()


def _hostile_then_genuine(pair: Ends, probe: socket.socket) -> None:
    probe.bind(("127.0.0.1", 0))
    probe.settimeout(0.3)
    channel = pair.watch_b.channel
    target = ("127.0.0.1", pair.b.port)
    before = pair.b.rejected
    forged = datagram(os.urandom(32), PING, channel, 10**9)
    replayed = datagram(pair.keys["a_send"], PING, channel, 1)  # a's first ping, again
    unknown = datagram(pair.keys["a_send"], PING, os.urandom(8), 10**9)
    bad_kind = bytearray(datagram(pair.keys["a_send"], PING, channel, 10**9))
    bad_kind[4] = 7
    hostile = [b"", b"x" * 39, os.urandom(DATAGRAM.size), b"adbp" + b"\0" * 100, forged,
               replayed, unknown, bytes(bad_kind)]
    for data in hostile:
        probe.sendto(data, target)
    wait_until(lambda: pair.b.rejected - before >= len(hostile) - 1)  # b"" may not arrive
    with pytest.raises(TimeoutError):  # none of it was answered
        probe.recvfrom(64)
    # a genuine ping from a new address still is (the next seq a has not used yet)
    seq = 10**6
    probe.sendto(datagram(pair.keys["a_send"], PING, channel, seq), target)
    answer, _ = probe.recvfrom(64)
    assert answer == datagram(pair.keys["b_send"], PONG, channel, seq)


def test_a_watch_that_is_forgotten_is_not_reported(ends):
    pair = ends(0.3)
    wait_until(lambda: pair.watch_a.confirmed)
    pair.a.forget(pair.watch_a)
    pair.b.close()
    wait_until(lambda: time.monotonic() - pair.watch_a.heard > 0.6)  # two deadlines
    assert not pair.silent["a"].is_set()
