from __future__ import annotations

import asyncio
import logging

import numpy as np
import pytest

import asyncdb
from asyncdb.transport import open_pair, transport_schemes


class Counter(asyncdb.Actor):
    def __init__(self, start: int = 0) -> None:
        self.value = start
        self.events: list[str] = []

    async def on_start(self) -> None:
        self.events.append("start")

    async def on_stop(self) -> None:
        self.events.append("stop")

    async def receive(self, message):
        match message:
            case {"op": "add", "n": n}:
                self.value += n
                return self.value
            case "get":
                return self.value
            case "boom":
                raise ValueError("boom")
            case "reject":
                raise asyncdb.UpdateRejected("bad gradient")
            case {"op": "sleep", "s": s}:
                await asyncio.sleep(s)
                return "slept"
            case {"op": "sum", "x": x}:
                return float(np.asarray(x).sum())
        raise KeyError(message)


@pytest.fixture
async def node():
    async with asyncdb.Node("here", ask_timeout=5) as node:
        yield node


async def test_tell_then_ask_handles_one_message_at_a_time(node):
    ref = await node.spawn(Counter, config={"start": 10})
    for _ in range(100):
        await ref.tell({"op": "add", "n": 1})
    assert await ref.ask("get") == 110
    assert node.actor(ref.name).events == ["start"]


async def test_handler_error_reaches_asker_typed_and_chained(node):
    ref = await node.spawn(Counter)
    with pytest.raises(asyncdb.ActorError) as info:
        await ref.ask("boom")
    assert info.value.remote_type == "ValueError"
    assert isinstance(info.value.__cause__, ValueError)
    with pytest.raises(asyncdb.UpdateRejected):
        await ref.ask("reject")
    assert await ref.ask({"op": "add", "n": 2}) == 2  # resumed, state kept


async def test_timeout_is_typed_and_a_timeout_error(node):
    ref = await node.spawn(Counter)
    with pytest.raises(asyncdb.Timeout) as info:
        await ref.ask({"op": "sleep", "s": 1}, timeout=0.05)
    assert isinstance(info.value, TimeoutError)


async def test_unknown_and_stopped_actors_are_dead(node):
    with pytest.raises(asyncdb.ActorDead):
        await node.ref("here", "nobody").ask("get")
    ref = await node.spawn(Counter)
    slow = asyncio.create_task(ref.ask({"op": "sleep", "s": 0.1}))
    queued = asyncio.create_task(ref.ask("get"))
    await asyncio.sleep(0.01)
    await node.stop_actor(ref.name)
    assert await slow == "slept"  # the current message finishes
    with pytest.raises(asyncdb.ActorDead):
        await queued
    with pytest.raises(asyncdb.ActorDead):
        await ref.tell("get")


async def test_restart_policy_rebuilds_state_and_logs(node, caplog):
    ref = await node.spawn(Counter, config={"start": 5}, policy="restart")
    await ref.ask({"op": "add", "n": 1})
    with caplog.at_level(logging.WARNING, "asyncdb.supervisor"), \
            pytest.raises(asyncdb.ActorError):
        await ref.ask("boom")
    assert "policy: restart" in caplog.text
    assert await ref.ask("get") == 5


async def test_restart_limit_turns_into_stop(caplog):
    supervisor = asyncdb.Supervisor(policy=asyncdb.Policy.RESTART, max_restarts=2)
    async with asyncdb.Node("n", supervisor=supervisor) as node:
        ref = await node.spawn(Counter)
        for _ in range(3):
            with pytest.raises(asyncdb.ActorError):
                await ref.ask("boom")
        await asyncio.sleep(0.01)
        with pytest.raises(asyncdb.ActorDead):
            await ref.ask("get")
    assert "stopping it" in caplog.text


async def test_stop_policy_fails_queued_asks(node):
    ref = await node.spawn(Counter, policy="stop")
    first = asyncio.create_task(ref.ask("boom"))
    queued = asyncio.create_task(ref.ask("get"))
    with pytest.raises(asyncdb.ActorError):
        await first
    with pytest.raises(asyncdb.ActorDead):
        await queued
    assert ref.name not in node.actors()


async def test_escalate_closes_the_node():
    node = asyncdb.Node("fragile")
    ref = await node.spawn(Counter, policy="escalate")
    with pytest.raises(asyncdb.ActorError):
        await ref.ask("boom")
    await asyncio.wait_for(node.wait_closed(), 5)
    assert isinstance(node.failure, ValueError)


async def test_spawn_errors_surface():
    class BadStart(asyncdb.Actor):
        async def on_start(self):
            raise RuntimeError("no")

    async with asyncdb.Node("n") as node:
        with pytest.raises(RuntimeError):
            await node.spawn(BadStart)
        with pytest.raises(asyncdb.ConfigError):
            await node.spawn("no.such:Type")
        await node.spawn(Counter, name="c")
        with pytest.raises(asyncdb.ConfigError):
            await node.spawn(Counter, name="c")


@pytest.fixture(params=transport_schemes())
async def two_nodes(request):
    left, right = asyncdb.Node("left", ask_timeout=10), asyncdb.Node("right", ask_timeout=10)
    a, b = await open_pair(request.param)
    left.connect("right", a, trusted=True)  # both in this process: test types import
    right.connect("left", b, trusted=True)
    yield left, right
    await left.close()
    await right.close()


async def test_refs_are_location_transparent(two_nodes):
    left, right = two_nodes
    remote = await left.spawn(Counter, node="right", name="counter")
    assert remote == right.ref("right", "counter")
    for _ in range(50):
        await remote.tell({"op": "add", "n": 2})
    assert await remote.ask("get") == 100
    x = np.arange(100_000, dtype=np.float64)
    assert await remote.ask({"op": "sum", "x": x}) == x.sum()
    with pytest.raises(asyncdb.ActorError) as info:
        await remote.ask("boom")
    assert info.value.remote_type == "ValueError"
    assert isinstance(info.value.__cause__, asyncdb.RemoteTraceback)
    with pytest.raises(asyncdb.UpdateRejected):
        await remote.ask("reject")
    with pytest.raises(asyncdb.ActorDead):
        await left.ref("right", "ghost").ask("get")


async def test_refs_travel_inside_messages(two_nodes):
    left, right = two_nodes

    class Forwarder(asyncdb.Actor):
        async def receive(self, message):
            return await message["to"].ask(message["what"])

    here = await left.spawn(Counter, name="local", config={"start": 7})
    there = await right.spawn(Forwarder)
    assert await left.ref("right", there.name).ask({"to": here, "what": "get"}) == 7


async def test_lost_channel_fails_pending_asks(two_nodes):
    left, right = two_nodes
    remote = await left.spawn(Counter, node="right")
    pending = asyncio.create_task(remote.ask({"op": "sleep", "s": 5}))
    await asyncio.sleep(0.05)
    await right.disconnect("left")  # the link goes away mid-ask
    with pytest.raises(asyncdb.ChannelClosed):
        await asyncio.wait_for(pending, 5)
    with pytest.raises(asyncdb.ChannelClosed):
        await remote.ask("get")


async def test_unencodable_reply_becomes_an_error(two_nodes):
    left, right = two_nodes

    class Leaky(asyncdb.Actor):
        async def receive(self, message):
            return object()

    ref = await right.spawn(Leaky)
    with pytest.raises(asyncdb.EncodeError):
        await left.ref("right", ref.name).ask("x")
