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
        self.keys_a, self.keys_b = pulse_keys(SEND, RECEIVE), pulse_keys(RECEIVE, SEND)
        self.watch_a = self.a.watch(Watch("b", self.keys_a, ("127.0.0.1", self.b.port),
                                          deadline, lambda why: self._silent("a", why)))
        self.watch_b = self.b.watch(Watch("a", self.keys_b, ("127.0.0.1", self.a.port),
                                          deadline, lambda why: self._silent("b", why)))

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


def test_the_two_ends_derive_crossed_ids_and_keys():
    a, b = pulse_keys(SEND, RECEIVE), pulse_keys(RECEIVE, SEND)
    assert a.send_id == b.receive_id and b.send_id == a.receive_id
    assert a.send_key == b.receive_key and b.send_key == a.receive_key
    assert a.send_id != a.receive_id and a.send_key != a.receive_key
    assert len(a.send_id) == 8


def test_both_ends_of_one_connection_in_one_process_are_both_watched():
    """One pulse thread, both ends of a connection (`ws_pair`, embedded nodes): two
    watches, each answered by the other."""
    pulse = Pulse("127.0.0.1")
    try:
        here = ("127.0.0.1", pulse.port)
        silent = threading.Event()
        a = pulse.watch(Watch("b", pulse_keys(SEND, RECEIVE), here, 0.5,
                              lambda why: silent.set()))
        b = pulse.watch(Watch("a", pulse_keys(RECEIVE, SEND), here, 0.5,
                              lambda why: silent.set()))
        wait_until(lambda: a.seq >= 10 and b.seq >= 10)
        assert a.confirmed and b.confirmed and not silent.is_set()
    finally:
        pulse.close()


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
    a_id, a_key = pair.keys_a.send_id, pair.keys_a.send_key  # what a's pings carry
    target = ("127.0.0.1", pair.b.port)
    before = pair.b.rejected
    forged = datagram(os.urandom(32), PING, a_id, 10**9)
    replayed = datagram(a_key, PING, a_id, 1)  # a's first ping, again
    unknown = datagram(a_key, PING, os.urandom(8), 10**9)
    bad_kind = bytearray(datagram(a_key, PING, a_id, 10**9))
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
    probe.sendto(datagram(a_key, PING, a_id, seq), target)
    answer, _ = probe.recvfrom(64)
    assert answer == datagram(pair.keys_b.send_key, PONG, pair.keys_b.send_id, seq)


def test_a_watch_that_is_forgotten_is_not_reported(ends):
    pair = ends(0.3)
    wait_until(lambda: pair.watch_a.confirmed)
    pair.a.forget(pair.watch_a)
    pair.b.close()
    wait_until(lambda: time.monotonic() - pair.watch_a.heard > 0.6)  # two deadlines
    assert not pair.silent["a"].is_set()
