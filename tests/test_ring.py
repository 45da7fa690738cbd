"""The ring's wake-up protocol: the reader-sleeping flag, one signal per batch, no signal
to a polling reader, and no lost wake-up between two real processes."""

from __future__ import annotations

import asyncio
import json
import random
import sys
import time

import pytest

from asyncdb.transport import ChannelClosed, encode_frame
from asyncdb.transport.shm import ShmChannel, create_link


def frame(i: int, pad: int = 0):
    return encode_frame(1, str(i).encode() + b" " * pad)


@pytest.fixture
async def link():
    """Two ends of one link in this process, neither polling (each wake-up visible)."""
    end_a, end_b = create_link(64 << 10)
    a, b = ShmChannel(end_a, poll_seconds=0), ShmChannel(end_b, poll_seconds=0)
    yield a, b
    await a.close()
    await b.close()


async def test_a_sleeping_reader_is_signalled_once_per_batch(link):
    a, b = link
    assert b.reader.idle()  # b says it sleeps: the next write signals it
    for i in range(5):  # written before b wakes up: one signal for all of them
        await a.send(frame(i))
    assert a.stats["wakeups_sent"] == 1
    got = [int((await b.receive()).meta) for _ in range(5)]
    assert got == list(range(5))
    assert b.reader.idle()
    await a.send(frame(5))
    assert a.stats["wakeups_sent"] == 2
    assert int((await b.receive()).meta) == 5


async def test_a_polling_reader_is_not_signalled(link):
    a, b = link
    assert b.reader.idle()
    b.reader.polling()  # b looks at the ring itself: no writer needs to wake it
    await a.send(frame(0))
    assert a.stats["wakeups_sent"] == 0
    assert b.reader.pending()
    assert int((await b.receive()).meta) == 0
    assert not b.reader.pending()


async def test_an_expected_reply_is_polled_for_and_costs_the_peer_no_signal():
    """`expect` (an ask went out) turns a sleeping pump into a polling one: the reply
    that comes meanwhile is written without an eventfd signal."""
    end_a, end_b = create_link(64 << 10)
    a = ShmChannel(end_a, poll_seconds=10.0)  # polls long enough for any machine
    b = ShmChannel(end_b, poll_seconds=0)
    got: asyncio.Queue = asyncio.Queue()
    pump = asyncio.create_task(a.pump(got.put_nowait))
    try:
        await b.send(frame(0))  # a sleeps, so this one is signalled
        assert int((await got.get()).meta) == 0
        signalled = b.stats["wakeups_sent"]
        a.expect()  # a reply is due from b
        give_up = time.monotonic() + 30
        while a.reader.sleeping() and time.monotonic() < give_up:  # noqa: ASYNC110
            await asyncio.sleep(0)  # until a's pump polls (a flag in shared memory)
        await b.send(frame(1))
        assert int((await got.get()).meta) == 1
        assert b.stats["wakeups_sent"] == signalled
    finally:
        pump.cancel()
        await asyncio.gather(pump, return_exceptions=True)
        await a.close()
        await b.close()


async def test_a_signalled_reader_learns_how_long_its_wake_up_took(link):
    a, b = link
    assert b.reader.wake_latency(0.0) == 0.0  # never signalled
    before = time.monotonic()
    assert b.reader.idle()
    await a.send(frame(0))
    assert int((await b.receive()).meta) == 0
    took = b.reader.wake_latency(before)
    assert 0.0 < took <= time.monotonic() - before
    assert b.reader.wake_latency(time.monotonic()) == 0.0  # a signal from before then


# Echoes every frame back; receives through `receive` (its own sleep and wake-ups).
_ECHO = """
import asyncio, json, random, sys, time
from asyncdb.loop import run
from asyncdb.transport import ChannelClosed, encode_frame
from asyncdb.transport.shm import ShmChannel, ShmEndpoint

async def main():
    channel = ShmChannel(ShmEndpoint.from_config(json.loads(sys.argv[1])), poll_seconds=0)
    rng = random.Random(12)
    while True:
        try:
            item = await channel.receive()
        except ChannelClosed:
            return
        await channel.send(encode_frame(item.kind, item.meta))
        end = time.perf_counter() + rng.uniform(0, 30e-6)  # busy: shift the phase
        while time.perf_counter() < end:
            pass

run(main())
"""


def _busy(us: float) -> None:
    """Hold the CPU for `us` microseconds (shifts where the two sides meet)."""
    end = time.perf_counter() + us / 1e6
    while time.perf_counter() < end:
        pass


@pytest.mark.slow
@pytest.mark.parametrize("poll_seconds", [0.0, 30e-6])
async def test_no_frame_is_lost_or_stalls_between_two_processes(poll_seconds):
    """Bursts and single frames, with the writer pausing at random points, so both
    sides keep crossing between sleeping, polling and reading: every frame comes back,
    in order, and nothing waits for a signal that never comes."""
    total = 20_000
    mine, theirs = create_link(16 << 10)  # small: the ring also fills and empties
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _ECHO, json.dumps(theirs.to_config()), pass_fds=theirs.fds())
    theirs.close_fds()
    channel = ShmChannel(mine, poll_seconds=poll_seconds)
    got: list[int] = []
    progress = asyncio.Event()

    def handler(item):
        got.append(int(item.meta))
        progress.set()

    async def until(count: int) -> None:
        while len(got) < count:  # a lost wake-up stalls here, and times out
            progress.clear()
            await asyncio.wait_for(progress.wait(), 60)

    pump = asyncio.create_task(channel.pump(handler))
    rng = random.Random(14)
    try:
        sent = 0
        while sent < total:
            burst = min(total - sent, rng.choice([1, 1, 1, 2, 5, 40, 300]))
            # Frames land at any moment of the reader's cycle: in ping-pong each waits
            # for its echo, so one the reader slept through would stall the test.
            mode = rng.choice(["burst", "trickle", "ping-pong"])
            for _ in range(burst):
                await channel.send(frame(sent, pad=rng.choice([0, 0, 200, 3000])))
                sent += 1
                if mode != "burst":
                    _busy(rng.uniform(0, 40))
                if mode == "ping-pong":
                    await until(sent)
            if rng.random() < 0.3:
                _busy(rng.uniform(0, 60))
            if rng.random() < 0.5:  # wait for the echoes: the child goes back to sleep
                await until(sent - rng.randrange(0, 3))
        await until(total)
        assert got == list(range(total))
    finally:
        pump.cancel()
        await asyncio.gather(pump, return_exceptions=True)
        await channel.close()
        assert await asyncio.wait_for(child.wait(), 30) == 0
    with pytest.raises(ChannelClosed):
        await channel.send(frame(0))
