"""Arrays in shared memory travel over rings by reference, with leases back."""

from __future__ import annotations

import asyncio
import gc
import logging
import os

import numpy as np
import pytest

import asyncdb
from asyncdb.transport import shared
from asyncdb.transport.errors import DecodeError
from asyncdb.transport.frame import encode_frame, parse_frame
from asyncdb.transport.shm import shm_pair
from asyncdb.transport.ws import ws_pair


async def settle() -> None:
    gc.collect()
    for _ in range(3):
        await asyncio.sleep(0.01)


def test_shared_arrays_look_like_numpy_arrays():
    a = shared.empty((3, 4), np.float64)
    assert a.shape == (3, 4) and a.dtype == np.float64 and a.flags.writeable
    assert not shared.zeros(10).any()
    b = shared.copy(np.arange(5))
    np.testing.assert_array_equal(b, np.arange(5))
    assert shared.find(b[1:]) is not None and shared.find(np.arange(5)) is None
    assert shared.find(a[:, 1]) is None  # not contiguous: travels as a copy


async def test_ring_sends_a_shared_array_by_reference_and_gets_it_back():
    a, b = await shm_pair(ring_bytes=1 << 16)
    try:
        src = shared.copy(np.arange(1 << 18, dtype=np.float32))  # 1 MiB, 16x the ring
        await a.send(encode_frame(1, b"m", [src]))
        assert shared.in_flight(src) == 1
        frame = await b.receive()
        got = frame.arrays[0]
        assert frame.borrowed and frame.external == (0,)
        np.testing.assert_array_equal(got, src)
        assert not got.flags.writeable  # receivers read the sender's memory, never write it
        waiting = asyncio.ensure_future(shared.released(src))
        await settle()
        assert not waiting.done()
        del frame, got
        await settle()
        assert waiting.done() and shared.in_flight(src) == 0
        assert a.stats["frames_sent"] == 1 and b.stats["by_reference"] == 1
    finally:
        await a.close()
        await b.close()


async def test_small_or_strided_shared_arrays_are_copied_inline():
    a, b = await shm_pair(ring_bytes=1 << 20)
    try:
        small = shared.copy(np.arange(100.0))
        big = shared.copy(np.arange(40_000.0).reshape(200, 200))
        await a.send(encode_frame(1, b"", [small, big[:, ::2]]))
        frame = await b.receive()
        assert frame.external == ()
        np.testing.assert_array_equal(frame.arrays[1], big[:, ::2])
        assert shared.in_flight(small) == shared.in_flight(big) == 0
    finally:
        await a.close()
        await b.close()


async def test_a_closed_peer_settles_every_lease():
    a, b = await shm_pair(ring_bytes=1 << 20)
    src = shared.empty(1 << 17)
    await a.send(encode_frame(1, b"", [src]))
    kept = await b.receive()  # held and never dropped
    await b.close()
    await asyncio.wait_for(shared.released(src), 2)
    await a.close()
    assert kept.arrays[0].shape == (1 << 17,)  # the mapping outlives the channel


async def test_a_bad_reference_is_a_decode_error_and_the_link_goes_on(caplog):
    a, b = await shm_pair(ring_bytes=1 << 20)
    try:
        bogus = shared.REF.pack(os.getpid(), 987_654, 1, 0, 77)
        forged = encode_frame(1, b"", [np.zeros(1 << 16, np.float32)], refs={0: bogus})
        with caplog.at_level(logging.WARNING, "asyncdb.transport.shm"):
            await a.send(forged)
            with pytest.raises(DecodeError, match="cannot be opened"):
                await b.receive()
            await settle()
        assert "unknown lease 77" in caplog.text  # the receiver still gave it back
        src = shared.copy(np.full(1 << 16, 2.0, np.float32))
        # a reference running past its segment
        too_far = shared.REF.pack(os.getpid(), shared.find(src)[0].fd,
                                  shared.find(src)[0].inode, 1 << 20, 78)
        forged = encode_frame(1, b"", [src], refs={0: too_far})
        forged.arrays = ()  # sent as laid out, not laid out again
        await a.send(forged)
        with pytest.raises(DecodeError, match="runs past"):
            await b.receive()
        await a.send(encode_frame(1, b"ok", [src]))
        frame = await b.receive()
        assert frame.meta == b"ok" and float(frame.arrays[0].sum()) == 2.0 * (1 << 16)
    finally:
        await a.close()
        await b.close()


def test_a_decoder_without_a_resolver_refuses_references():
    frame = encode_frame(1, b"", [np.zeros(4)], refs={0: bytes(shared.REF.size)})
    with pytest.raises(DecodeError, match="shared memory"):
        parse_frame(frame.to_bytes())


async def test_shared_arrays_over_websockets_are_plain_copies():
    a, b = await ws_pair()
    try:
        src = shared.copy(np.arange(1 << 17, dtype=np.float32))
        await a.send(encode_frame(1, b"", [src]))
        frame = await b.receive()
        np.testing.assert_array_equal(frame.arrays[0], src)
        assert frame.external == () and shared.in_flight(src) == 0
    finally:
        await a.close()
        await b.close()


class Holder(asyncdb.Actor):
    borrow_arrays = True

    def __init__(self) -> None:
        self.held: list[np.ndarray] = []

    async def receive(self, message):
        if message == "drop":
            self.held.clear()
            gc.collect()
            return 0
        array, keep = message["array"], message["keep"]
        if keep:
            self.held.append(array)
        return [float(array.sum()), bool(array.flags.writeable)]


class Copier(asyncdb.Actor):
    def __init__(self) -> None:
        self.kept: list[np.ndarray] = []

    async def receive(self, message):
        self.kept.append(message)
        return bool(message.flags.writeable)


async def test_actors_in_another_process_read_shared_arrays_in_place(cluster):
    node, nodes = cluster
    holder = await node.spawn(Holder, node=nodes.ids[0])
    src = shared.copy(np.ones(1 << 20, np.float32))  # 4 MiB through a 1 MiB ring
    assert await holder.ask({"array": src, "keep": False}) == [float(1 << 20), False]
    await asyncio.wait_for(shared.released(src), 2)
    src[:] = 2  # the sender's again
    assert await holder.ask({"array": src, "keep": True}) == [float(2 << 20), False]
    await asyncio.sleep(0.05)
    assert shared.in_flight(src) == 1  # the holder still reads it
    await holder.ask("drop")
    await asyncio.wait_for(shared.released(src), 2)


async def test_actors_that_do_not_borrow_get_a_private_copy(cluster):
    node, nodes = cluster
    copier = await node.spawn(Copier, node=nodes.ids[0])
    src = shared.copy(np.ones(1 << 18, np.float32))
    assert await copier.ask(src) is True
    await asyncio.wait_for(shared.released(src), 2)


async def test_a_killed_receiver_gives_back_what_it_held(cluster):
    node, nodes = cluster
    holder = await node.spawn(Holder, node=nodes.ids[0])
    src = shared.empty(1 << 18)
    await holder.ask({"array": src, "keep": True})
    assert shared.in_flight(src) == 1
    nodes.kill(nodes.ids[0])
    await asyncio.wait_for(shared.released(src), 2)
