from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import asyncdb


class Echo(asyncdb.Actor):
    async def receive(self, message):
        if isinstance(message, str) and message == "crash":
            raise ZeroDivisionError("divided")
        if isinstance(message, str) and message == "pid":
            return os.getpid()
        if isinstance(message, dict) and "relay" in message:
            return await message["relay"].ask(message["what"])
        return message


class Keeper(asyncdb.Actor):
    """Keeps every array it gets: must not stall the link it came from."""

    def __init__(self) -> None:
        self.kept: list[np.ndarray] = []

    async def receive(self, message):
        if isinstance(message, np.ndarray):
            self.kept.append(message)
            return len(self.kept)
        return float(sum(a.sum() for a in self.kept))


class Borrower(asyncdb.Actor):
    borrow_arrays = True

    async def receive(self, message):
        if isinstance(message, np.ndarray):
            return bool(message.base is not None and not message.flags.owndata)
        return {peer: dict(ch.stats) for peer, ch in self.node._channels.items()}


async def test_ask_tell_and_routing_between_processes(cluster):
    node, nodes = cluster
    first, second = nodes.ids
    a = await node.spawn(Echo, node=first, name="echo")
    b = await node.spawn(Echo, node=second, name="echo")
    assert await a.ask("pid") != os.getpid()
    assert await a.ask("pid") != await b.ask("pid")
    arr = np.random.default_rng(0).standard_normal((512, 300))  # larger than the ring
    np.testing.assert_array_equal(await a.ask(arr), arr)
    assert await a.ask({"relay": b, "what": "hello"}) == "hello"  # node to node


async def test_crash_in_another_process_is_typed(cluster):
    node, nodes = cluster
    a = await node.spawn(Echo, node=nodes.ids[0])
    with pytest.raises(asyncdb.ActorError) as info:
        await a.ask("crash")
    assert info.value.remote_type == "ZeroDivisionError"
    assert "divided" in str(info.value.__cause__)
    assert await a.ask("still here") == "still here"


async def test_kill_9_surfaces_as_channel_closed_promptly(cluster, caplog):
    node, nodes = cluster
    first, second = nodes.ids
    doomed = await node.spawn(Echo, node=first)
    survivor = await node.spawn(Echo, node=second)
    pending = asyncio.create_task(doomed.ask({"relay": survivor, "what": "x"}, timeout=None))
    await asyncio.sleep(0.05)
    with caplog.at_level(logging.ERROR, "asyncdb.supervisor"):
        nodes.kill(first)
        start = time.monotonic()
        with pytest.raises(asyncdb.ChannelClosed):
            await doomed.ask("x", timeout=None)
        assert time.monotonic() - start < 2.0
        await asyncio.wait_for(nodes.processes[first].exited, 5)
    if not pending.done():
        with pytest.raises(asyncdb.ChannelClosed):
            await pending
    assert "died unexpectedly" in caplog.text
    assert nodes.alive() == [second]
    assert await survivor.ask("ok") == "ok"


async def test_a_receiver_keeping_arrays_does_not_stall_the_link(cluster):
    node, nodes = cluster
    keeper = await node.spawn(Keeper, node=nodes.ids[0])
    block = np.ones(100_000)  # 800 KB in a 1 MiB ring: in place unless copied
    for i in range(20):
        assert await asyncio.wait_for(keeper.ask(block * i), 10) == i + 1
    assert await keeper.ask("sum") == sum(range(20)) * 100_000


async def test_borrowing_actor_reads_large_arrays_in_place(cluster):
    node, nodes = cluster
    borrower = await node.spawn(Borrower, node=nodes.ids[0])
    assert await borrower.ask(np.ones(50_000)) is True
    stats = await borrower.ask("stats")
    assert stats["driver"]["in_place"] >= 1


async def test_clean_shutdown_exits_zero():
    async with asyncdb.Node("driver") as node:
        nodes = asyncdb.LocalNodes(node, 2)
        async with nodes:
            pass
    assert [p.popen.returncode for p in nodes.processes.values()] == [0, 0]


def _wait_gone(pids: list[int], timeout: float = 10.0) -> list[int]:
    deadline = time.monotonic() + timeout
    alive = pids
    while alive and time.monotonic() < deadline:
        alive = [p for p in alive if Path(f"/proc/{p}").exists()
                 and "Z" not in Path(f"/proc/{p}/stat").read_text().rpartition(")")[2][:3]]
        time.sleep(0.05)
    return alive


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_driver_interrupted_or_killed_takes_its_nodes_along(sig):
    script = Path(__file__).with_name("nodes_driver.py")
    driver = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        assert driver.stdout is not None
        pids = [int(p) for p in driver.stdout.readline().split()]
        assert len(pids) == 2
        driver.send_signal(sig)
        driver.wait(timeout=60)  # a bound: SIGINT shuts the nodes down in order
        assert _wait_gone(pids) == []
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
        if driver.stdout is not None:
            driver.stdout.close()


async def test_restart_replaces_a_dead_node_and_relinks_every_live_one(cluster):
    node, nodes = cluster
    first, second = nodes.ids
    failures: list[tuple[str, str]] = []
    reported = asyncio.Event()

    def on_failure(node_id: str, reason: str) -> None:
        failures.append((node_id, reason))
        reported.set()

    nodes.on_failure(on_failure)
    survivor = await node.spawn(Echo, node=second)
    nodes.kill(first)
    await asyncio.wait_for(reported.wait(), 10)
    assert failures[0][0] == first and "died" in failures[0][1]
    fresh = await nodes.restart(first)
    assert fresh == f"{first}~1" and nodes.ids == [fresh, second]
    assert sorted(nodes.alive()) == sorted([fresh, second])
    reborn = await node.spawn(Echo, node=fresh)
    assert await reborn.ask("pid") == nodes.processes[fresh].pid
    # the surviving child reaches the new process over its new link, and back
    assert await survivor.ask({"relay": reborn, "what": "across"}) == "across"
    assert await reborn.ask({"relay": survivor, "what": "back"}) == "back"
    assert failures == [(first, failures[0][1])]  # the restart itself is no failure


async def test_a_stopped_node_is_found_frozen_and_killed():
    failures: list[tuple[str, str]] = []
    reported = asyncio.Event()

    def on_failure(node_id: str, reason: str) -> None:
        failures.append((node_id, reason))
        reported.set()

    async with asyncdb.Node("driver", ask_timeout=20) as node, \
            asyncdb.LocalNodes(node, 2, ring_bytes=1 << 20, frozen_after=0.5) as nodes:
        nodes.on_failure(on_failure)
        busy = await node.spawn(Echo, node=nodes.ids[1])
        nodes.kill(nodes.ids[0], signal.SIGSTOP)
        await asyncio.wait_for(reported.wait(), 30)
        assert failures[0][0] == nodes.ids[0] and "frozen" in failures[0][1]
        await asyncio.wait_for(nodes.processes[nodes.ids[0]].exited, 10)
        assert nodes.alive() == [nodes.ids[1]]
        assert await busy.ask("still") == "still"
        assert len(failures) == 1
