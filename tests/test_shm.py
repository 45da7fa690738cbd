"""Shared-memory channels beyond the contract every transport meets (test_channels.py):
while frames come close together the reader polls its ring instead of sleeping, so
neither side pays a wake-up, and once they stop coming it sleeps again."""

from __future__ import annotations

import asyncio
import time

import pytest

from asyncdb.transport import encode_frame
from asyncdb.transport.shm import ShmChannel, create_link

ROUNDS = 2000


async def _pair(poll_seconds: float) -> tuple[ShmChannel, ShmChannel]:
    a, b = create_link(1 << 20)
    return ShmChannel(a, poll_seconds=poll_seconds), ShmChannel(b, poll_seconds=poll_seconds)


async def _ping_pong(a: ShmChannel, b: ShmChannel, rounds: int) -> list[int]:
    """`rounds` round trips, each side pumping: b answers every frame a sends."""
    seen: list[int] = []
    answered: asyncio.Queue[int] = asyncio.Queue()

    def on_b(frame):
        asyncio.get_running_loop().create_task(b.send(encode_frame(2, bytes(frame.meta))))

    def on_a(frame):
        seen.append(int(bytes(frame.meta)))
        answered.put_nowait(int(bytes(frame.meta)))

    pumps = [asyncio.ensure_future(a.pump(on_a)), asyncio.ensure_future(b.pump(on_b))]
    try:
        for i in range(rounds):
            await a.send(encode_frame(1, str(i).encode()))
            assert await asyncio.wait_for(answered.get(), 30) == i
    finally:
        for task in pumps:
            task.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)
    return seen


@pytest.mark.parametrize("poll_seconds", [1e-3, 0.0], ids=["polling", "sleeping"])
async def test_a_busy_reader_polls_instead_of_being_woken(poll_seconds):
    a, b = await _pair(poll_seconds)
    try:
        assert await _ping_pong(a, b, ROUNDS) == list(range(ROUNDS))
        wakeups = a.stats["wakeups_sent"] + b.stats["wakeups_sent"]
        if poll_seconds:  # a few while the pace is learnt, none after
            assert wakeups < 0.05 * 2 * ROUNDS
        else:  # every frame finds its reader asleep
            assert wakeups >= 2 * ROUNDS - 2
    finally:
        await a.close()
        await b.close()


async def test_a_reader_whose_frames_stop_coming_goes_back_to_sleep():
    a, b = await _pair(1e-3)
    arrived: list[bytes] = []
    came = asyncio.Event()
    try:
        await _ping_pong(a, b, 200)  # b has learnt to poll
        pumps = [asyncio.ensure_future(a.pump(lambda f: None)),
                 asyncio.ensure_future(b.pump(lambda f: (arrived.append(bytes(f.meta)),
                                                         came.set())))]
        cpu, wall = time.process_time(), time.perf_counter()
        await asyncio.sleep(0.3)  # idle on purpose: the CPU it costs is what is measured
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        assert cpu < 0.2 * wall  # a poll of 1 ms at most, then the eventfd
        before = a.stats["wakeups_sent"]
        await a.send(encode_frame(1, b"late"))
        await asyncio.wait_for(came.wait(), 10)
        assert arrived == [b"late"]
        assert a.stats["wakeups_sent"] == before + 1  # b slept: the frame woke it
        for task in pumps:
            task.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)
    finally:
        await a.close()
        await b.close()
