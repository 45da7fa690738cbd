"""Routing semantics that must hold on every placement: back-pressure per actor, no
head-of-line blocking, the wire format's rules on the same node, oversized replies."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

import asyncdb
from asyncdb.actor import MAILBOX_HIGH
from asyncdb.transport import open_pair, transport_schemes


class Gate(asyncdb.Actor):
    """Counts what it is told; holds every message until its gate opens."""

    def __init__(self) -> None:
        self.open = asyncio.Event()
        self.count = 0

    async def receive(self, message):
        if message == "count":
            return self.count
        await self.open.wait()
        self.count += 1
        return None


class Echo(asyncdb.Actor):
    def __init__(self) -> None:
        self.kept = np.zeros(4, np.float32)

    async def receive(self, message):
        match message:
            case {"ask": ref, "what": what}:
                return await ref.ask(what)
            case {"keep": array}:
                self.kept = array
                return None
            case "kept":
                return self.kept
            case "live":
                return self.kept  # its own array: callers must get a copy
            case {"big": n}:
                return np.zeros(n, np.uint8)
            case "leak":
                return object()
        return message


async def wait_until(predicate) -> None:
    """Yield to the loop until `predicate()` holds (the per-test timeout bounds it)."""
    while not predicate():  # noqa: ASYNC110 (the condition is set by other tasks)
        await asyncio.sleep(0.001)


async def flood(ref, count: int) -> None:
    for _ in range(count):
        await ref.tell("tick")


@pytest.fixture(params=transport_schemes())
async def two_nodes(request):
    left, right = asyncdb.Node("left", ask_timeout=30), asyncdb.Node("right", ask_timeout=30)
    a, b = await open_pair(request.param, max_frame_bytes=1 << 20)
    left.connect("right", a)
    right.connect("left", b)
    yield left, right
    await left.close()
    await right.close()


async def test_a_full_mailbox_blocks_its_senders_not_the_link(two_nodes):
    left, right = two_nodes
    gate = await right.spawn(Gate, name="gate")
    echo_right = await right.spawn(Echo, name="echo")
    echo_left = await left.spawn(Echo, name="echo")
    cell = right._cells["gate"]
    sender = asyncio.create_task(flood(left.ref("right", "gate"), 2 * MAILBOX_HIGH))
    await wait_until(lambda: len(cell.mailbox) >= MAILBOX_HIGH - 1)
    # The gate's mailbox is full: an actor there asks back across the same link, and
    # its answer arrives (it would wait behind the full mailbox without per-actor credit).
    asked = left.ref("right", "echo").ask({"ask": echo_left, "what": "pong"}, timeout=20)
    assert await asyncio.wait_for(asked, 20) == "pong"
    assert await echo_right.ask({"ask": echo_left, "what": 7}) == 7
    assert not sender.done()  # tell waits for room in that actor's mailbox
    assert len(cell.mailbox) <= MAILBOX_HIGH  # the window bounds it
    right.actor("gate").open.set()
    await asyncio.wait_for(sender, 60)
    assert await asyncio.wait_for(left.ref("right", "gate").ask("count"), 30) == 2 * MAILBOX_HIGH
    assert gate.name == "gate"


async def test_same_node_tells_wait_for_room():
    async with asyncdb.Node("here") as node:
        gate = await node.spawn(Gate)
        cell = node._cells[gate.name]
        sender = asyncio.create_task(flood(gate, MAILBOX_HIGH + 100))
        await wait_until(lambda: len(cell.mailbox) >= MAILBOX_HIGH - 1)
        for _ in range(100):
            await asyncio.sleep(0)
        assert not sender.done() and len(cell.mailbox) <= MAILBOX_HIGH
        node.actor(gate.name).open.set()
        await asyncio.wait_for(sender, 30)
        assert await gate.ask("count") == MAILBOX_HIGH + 100


async def test_a_same_node_ask_waits_for_room_within_its_timeout():
    async with asyncdb.Node("here") as node:
        gate = await node.spawn(Gate)
        sender = asyncio.create_task(flood(gate, MAILBOX_HIGH + 1))
        await wait_until(lambda: len(node._cells[gate.name].mailbox) >= MAILBOX_HIGH - 1)
        with pytest.raises(asyncdb.Timeout):
            await gate.ask("count", timeout=0.05)
        node.actor(gate.name).open.set()
        await asyncio.wait_for(sender, 30)


@pytest.mark.parametrize("bad", [object(), {1: "int key"}, {"__nd__": 0}, {1, 2}])
async def test_same_node_messages_obey_the_wire_format(bad):
    async with asyncdb.Node("here") as node:
        echo = await node.spawn(Echo)
        with pytest.raises(asyncdb.EncodeError):
            await echo.tell(bad)
        with pytest.raises(asyncdb.EncodeError):
            await echo.ask(bad)
        with pytest.raises(asyncdb.EncodeError):
            await echo.ask("leak")  # a reply that could not travel either
        assert await echo.ask((1, "a")) == [1, "a"]  # tuples arrive as lists, as remotely


async def test_no_live_array_crosses_between_actors_on_one_node():
    async with asyncdb.Node("here") as node:
        echo = await node.spawn(Echo)
        sent = np.ones(4, np.float32)
        await echo.ask({"keep": sent})
        sent[:] = 5  # the sender reuses its buffer
        kept = await echo.ask("kept")
        np.testing.assert_array_equal(kept, 1)
        kept[:] = 9  # the asker scribbles on the answer
        np.testing.assert_array_equal(node.actor(echo.name).kept, 1)
        assert not np.shares_memory(await echo.ask("live"), node.actor(echo.name).kept)


@pytest.mark.parametrize("where", ["same node", "other node"])
async def test_a_reply_over_the_frame_limit_fails_the_asker_at_once(two_nodes, where):
    left, right = two_nodes
    if where == "same node":
        right.max_frame_bytes = 1 << 20
    echo = await right.spawn(Echo, name="big")
    ref = (right if where == "same node" else left).ref("right", "big")
    with pytest.raises(asyncdb.MessageTooLarge):
        await asyncio.wait_for(ref.ask({"big": 2 << 20}, timeout=None), 20)
    assert await ref.ask("still here") == "still here"  # the actor lives on
    assert echo.name in right.actors()
