"""One contract, every transport: ordering, large frames, backpressure, close."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from asyncdb.transport import ChannelClosed, encode_frame, open_pair, transport_schemes

# Small buffers, so that "larger than the buffer" and "full" are cheap to reach.
BUFFER_OPTIONS = {"inproc": {"capacity": 64 << 10}, "shm": {"ring_bytes": 64 << 10}}


@pytest.fixture(params=transport_schemes())
async def pair(request):
    scheme = request.param
    a, b = await open_pair(scheme, **BUFFER_OPTIONS.get(scheme, {}))
    yield a, b
    await a.close()
    await b.close()


def frame(i: int, size: int = 0):
    arrays = [np.full(size, i, np.float32)] if size else []
    return encode_frame(1, str(i).encode(), arrays)


async def test_frames_arrive_whole_and_in_order(pair):
    a, b = pair
    sizes = [0, 3, 5000, 0, 100_000, 7]

    async def produce():
        for i, size in enumerate(sizes * 20):
            await a.send(frame(i, size))

    task = asyncio.create_task(produce())
    for i, size in enumerate(sizes * 20):
        got = await asyncio.wait_for(b.receive(), 10)
        assert got.meta == str(i).encode()
        if size:
            assert got.arrays[0].shape == (size,) and (got.arrays[0] == i).all()
    await task


async def test_both_directions_at_once(pair):
    a, b = pair

    async def ping(src, dst, tag):
        for i in range(200):
            await src.send(encode_frame(1, f"{tag}{i}".encode()))
        return [(await dst.receive()).meta for _ in range(200)]

    got_b, got_a = await asyncio.gather(ping(a, b, "x"), ping(b, a, "y"))
    assert got_b == [f"x{i}".encode() for i in range(200)]
    assert got_a == [f"y{i}".encode() for i in range(200)]


async def test_frame_larger_than_the_buffer(pair):
    a, b = pair
    big = np.random.default_rng(1).standard_normal(300_000)  # 2.4 MB, buffer is 64 KiB
    sender = asyncio.create_task(a.send(encode_frame(3, b"big", [big])))
    got = await asyncio.wait_for(b.receive(), 10)
    await sender
    np.testing.assert_array_equal(got.arrays[0], big)


async def test_backpressure_makes_the_sender_wait_and_drops_nothing(pair):
    a, b = pair
    count, size = 1024, 16384  # 64 KiB frames, 64 MiB in all: more than any buffer
    sent = 0

    async def produce():
        nonlocal sent
        for i in range(count):
            await a.send(frame(i, size))
            sent += 1

    task = asyncio.create_task(produce())
    before = -1
    while sent != before:  # wait until the sender stops making progress
        before = sent
        await asyncio.sleep(0.3)
    assert sent < count, "a full buffer must make the sender wait"
    for i in range(count):
        got = await asyncio.wait_for(b.receive(), 10)
        assert got.meta == str(i).encode() and got.arrays[0][0] == i
    await task


async def test_close_delivers_what_was_sent_then_raises(pair):
    a, b = pair
    for i in range(3):
        await a.send(frame(i))
    await a.close()
    assert a.closed
    with pytest.raises(ChannelClosed):
        await a.send(frame(9))
    assert [(await b.receive()).meta for _ in range(3)] == [b"0", b"1", b"2"]
    with pytest.raises(ChannelClosed):
        await asyncio.wait_for(b.receive(), 5)
    with pytest.raises(ChannelClosed):
        await b.send(frame(10))


async def test_close_wakes_a_waiting_receiver(pair):
    a, b = pair
    waiting = asyncio.create_task(b.receive())
    await asyncio.sleep(0.05)
    await a.close()
    with pytest.raises(ChannelClosed):
        await asyncio.wait_for(waiting, 5)


async def test_close_wakes_a_blocked_sender(pair):
    a, b = pair

    async def flood():
        while True:
            await a.send(frame(0, 4000))

    task = asyncio.create_task(flood())
    await asyncio.sleep(0.1)
    assert not task.done()
    await b.close()
    with pytest.raises(ChannelClosed):
        await asyncio.wait_for(task, 5)


async def test_pump_hands_over_every_frame_in_order_and_waits_for_follow_ups(pair):
    a, b = pair
    sizes = [0, 3, 100_000, 0, 7]
    got: list[bytes] = []
    follow_ups: list[int] = []

    async def follow_up(i: int) -> None:
        await asyncio.sleep(0)
        follow_ups.append(i)

    def handler(item):
        assert not isinstance(item, Exception)
        i = int(item.meta)
        assert follow_ups == list(range(0, i, 4))  # each one finished before the next frame
        got.append(item.meta)
        return follow_up(i) if i % 4 == 0 else None

    pump = asyncio.create_task(b.pump(handler))
    for i, size in enumerate(sizes * 10):
        await a.send(frame(i, size))
    await a.close()
    with pytest.raises(ChannelClosed):
        await asyncio.wait_for(pump, 10)
    assert got == [str(i).encode() for i in range(len(sizes) * 10)]


async def test_pump_ends_with_what_the_handler_raised(pair):
    a, b = pair

    def handler(item):
        raise RuntimeError(f"handler failed on {item.meta!r}")

    pump = asyncio.create_task(b.pump(handler))
    await a.send(frame(5))
    with pytest.raises(RuntimeError, match="failed on b'5'"):
        await asyncio.wait_for(pump, 10)
