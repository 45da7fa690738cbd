"""`asyncdb bench transport`: the shared-memory ring against this machine's floors.

Every figure comes from one run of this command, so ratios compare like with like on a
noisy machine: the raw references (`bench.floors`: memcpy, a copy out of memfd memory
in a node-like process, eventfd round trips blocking and through the event loop, a
`multiprocessing.Queue` round trip) are measured beside the actors, in the same
rounds: each ratio is the median of the ratios within a round.

Bulk transfer is measured two ways. `shm_bulk`: the sender's 16 MiB arrays live in
shared memory (`asyncdb.shared`, three buffers in turn, each reused once the receiver
has let go of it), so the receiver's copy into its own array is the only one.
`shm_bulk_copied`: plain numpy arrays, copied into the ring by the sender and out of it
by the receiver. On a machine where one copy saturates memory bandwidth, the second
figure cannot pass about half of memcpy; the first can reach memcpy.
"""

from __future__ import annotations

import asyncio
import statistics
import subprocess
import sys
import textwrap
import time
from typing import Any

import numpy as np

from ..actor import Actor, ActorRef
from ..errors import ConfigError
from ..node import Node
from ..process import LocalNodes
from ..registry import register_actor
from ..system import PeerPolicy
from ..transport import shared
from ..tunables import node_tunables, probe_figures
from .floors import (
    BULK_BYTES,
    SHARED_BUFFERS,
    eventfd_loop_rtt_us,
    eventfd_rtt_us,
    in_node_environment,
    memcpy_floor_gbps,
)

BULK_RING_BYTES = 64 << 20
NN_ACTORS = 4  # actors on each side of the n:n figure


@register_actor("asyncdb.bench.Sink")
class Sink(Actor):
    """Receives bulk arrays (copying each into its own buffer when `copy`); counts
    small tells."""

    borrow_arrays = True

    @classmethod
    def admit(cls, config: dict[str, Any], policy: PeerPolicy) -> None:
        if int(config.get("nbytes", 0)) > policy.max_data_bytes:
            raise ConfigError("sink buffer over this node's data limit")

    def __init__(self, nbytes: int = 0, copy: bool = True) -> None:
        self.buffer = np.empty(nbytes // 4, np.float32)
        self.copy = copy
        self.received = 0

    async def receive(self, message: Any) -> Any:
        if isinstance(message, np.ndarray):
            if self.copy:
                np.copyto(self.buffer, message)
            self.received += 1
            return None
        if message == "count":
            return self.received
        self.received += 1
        return message


class Driver(Actor):
    """Runs a timed loop against a Sink on another node; returns seconds taken."""

    def __init__(self) -> None:
        self._shared: dict[tuple[int, int], list[np.ndarray]] = {}

    def shared_buffers(self, nbytes: int, count: int) -> list[np.ndarray]:
        """`count` shared arrays of `nbytes`, made once and reused, as an application
        would (mapping fresh memory costs a page fault per page on both sides)."""
        key = (nbytes, count)
        if key not in self._shared:
            self._shared[key] = [shared.copy(np.ones(nbytes // 4, np.float32))
                                 for _ in range(count)]
        return self._shared[key]

    async def receive(self, message: dict[str, Any]) -> float | list[float]:
        target: ActorRef = message["target"]
        n, op = int(message["n"]), message["op"]
        await target.ask("count")
        if op == "bulk":
            payload = np.ones(int(message["nbytes"]) // 4, np.float32)
            start = time.perf_counter()
            for _ in range(n):
                await target.tell(payload)
            await target.ask("count")
        elif op == "bulk_shared":
            buffers = self.shared_buffers(int(message["nbytes"]),
                                          int(message.get("buffers", SHARED_BUFFERS)))
            count = len(buffers)
            start = time.perf_counter()
            for i in range(n):
                buffer = buffers[i % count]
                await shared.released(buffer)  # the receiver is done with it: reuse
                await target.tell(buffer)
            await target.ask("count")
            for buffer in buffers:
                await shared.released(buffer)
        elif op == "tell":
            start = time.perf_counter()
            for i in range(n):
                await target.tell(i)
            await target.ask("count")
        elif op == "ask_all":  # one ask to every target at once, n times: (start, end)
            targets: list[ActorRef] = message["targets"]
            start = time.perf_counter()
            for _ in range(n):
                await asyncio.gather(*(t.ask(0) for t in targets))
            return [start, time.perf_counter()]
        else:
            start = time.perf_counter()
            for _ in range(n):
                await target.ask(0)
        return time.perf_counter() - start


class Timed:
    """A Sink on one node and a Driver on another, spawned once; each `round()` is one
    timed loop (the first call also warms up: fresh ring pages, caches)."""

    def __init__(self, node: Node, first: str, second: str, op: str, n: int, nbytes: int,
                 copy: bool = True) -> None:
        self.node, self.first, self.second = node, first, second
        self.request = {"op": op, "n": n, "nbytes": nbytes}
        self.copy = copy
        self.refs: list[ActorRef] = []

    async def __aenter__(self) -> Timed:
        sink = await self.node.spawn(Sink, node=self.second,
                                     config={"nbytes": self.request["nbytes"],
                                             "copy": self.copy})
        self.refs = [await self.node.spawn(Driver, node=self.first), sink]
        await self.round()
        return self

    async def __aexit__(self, *exc: object) -> None:
        for ref in self.refs:
            await self.node.ref(ref.node_id, "_system").ask({"op": "stop", "name": ref.name})

    async def round(self) -> float:
        driver, sink = self.refs
        seconds: float = await driver.ask({**self.request, "target": sink}, timeout=300)
        return seconds


async def _timed(node: Node, first: str, second: str, op: str, n: int, nbytes: int,
                 repeat: int, copy: bool = True) -> list[float]:
    async with Timed(node, first, second, op, n, nbytes, copy) as timed:
        return [await timed.round() for _ in range(repeat)]


async def _n_to_n(node: Node, first: str, second: str, n: int, repeat: int) -> list[float]:
    """NN_ACTORS drivers on one node each asking all NN_ACTORS sinks on the other at
    once, `n` times: asks per second over the span from the first start to the last end
    (perf_counter is the system's monotonic clock, the same in every process)."""
    sinks = [await node.spawn(Sink, node=second) for _ in range(NN_ACTORS)]
    drivers = [await node.spawn(Driver, node=first) for _ in range(NN_ACTORS)]
    rates = []
    for _ in range(repeat + 1):
        spans = await asyncio.gather(*(d.ask({"op": "ask_all", "n": n, "target": sinks[0],
                                               "targets": sinks}, timeout=300)
                                       for d in drivers))
        seconds = max(end for _s, end in spans) - min(start for start, _e in spans)
        rates.append(n * NN_ACTORS * NN_ACTORS / seconds)
    for ref in (*drivers, *sinks):
        await node.ref(ref.node_id, "_system").ask({"op": "stop", "name": ref.name})
    return rates[1:]


async def run(repeat: int = 9, bulk_messages: int = 64, asks: int = 3000,
              tells: int = 100_000, ws_messages: int = 64) -> dict[str, Any]:
    """Each of `repeat` rounds measures every shared-memory figure and its floors one
    after the other, so that a figure and its reference see the machine alike (its
    memory bandwidth, on a shared virtual machine, drifts within minutes)."""
    samples: dict[str, list[float]] = {name: [] for name in (
        "memcpy_gbps", "memfd_copy_gbps", "eventfd_rtt_us", "eventfd_loop_rtt_us",
        "mp_queue_rtt_us", "handoff_gbps", "shm_bulk_gbps", "shm_bulk_copied_gbps",
        "ask_rtt_us", "tell_msgs_per_s")}
    bulk_bytes = bulk_messages * BULK_BYTES
    async with Node("bench") as node, LocalNodes(node, 2, ring_bytes=BULK_RING_BYTES) as nodes:
        first, second = nodes.ids
        async with Timed(node, first, second, "bulk_shared", bulk_messages,
                         BULK_BYTES) as bulk, \
                Timed(node, first, second, "bulk", bulk_messages, BULK_BYTES) as copied, \
                Timed(node, first, second, "ask", asks, 0) as rtt, \
                Timed(node, first, second, "tell", tells, 0) as tell:
            for _ in range(repeat):
                samples["shm_bulk_gbps"].append(bulk_bytes / await bulk.round() / 1e9)
                samples["memfd_copy_gbps"].append(in_node_environment("memfd_copy_gbps"))
                samples["memcpy_gbps"].append(memcpy_floor_gbps())
                samples["shm_bulk_copied_gbps"].append(
                    bulk_bytes / await copied.round() / 1e9)
                samples["handoff_gbps"].append(in_node_environment("handoff_gbps"))
                samples["ask_rtt_us"].append(await rtt.round() / asks * 1e6)
                samples["eventfd_rtt_us"].append(eventfd_rtt_us())
                samples["eventfd_loop_rtt_us"].append(await eventfd_loop_rtt_us())
                # in a process of its own, whose exit takes multiprocessing's
                # resource tracker along
                samples["mp_queue_rtt_us"].append(in_node_environment("mp_queue_rtt_us"))
                samples["tell_msgs_per_s"].append(tells / await tell.round())
        samples["ask_n_to_n_per_s"] = await _n_to_n(node, first, second, asks // NN_ACTORS,
                                                    repeat)
    ws_figures = await websocket_figures(repeat, ws_messages, asks)
    samples.update(ws_figures.pop("samples"))
    return _figures(samples, repeat, ws_figures)


def _figures(samples: dict[str, list[float]], repeat: int,
             ws_figures: dict[str, Any]) -> dict[str, Any]:
    med = {k: statistics.median(v) for k, v in samples.items()}

    def ratio(a: str, b: str) -> float:
        """The median of the ratios within each round (figures measured side by side)."""
        return round(statistics.median(x / y for x, y in zip(samples[a], samples[b],
                                                             strict=True)), 3)

    return {
        "memcpy_gbps": round(med["memcpy_gbps"], 3),
        "memfd_copy_gbps": round(med["memfd_copy_gbps"], 3),
        "shm_bulk_gbps": round(med["shm_bulk_gbps"], 3),
        "shm_bulk_ratio": ratio("shm_bulk_gbps", "memcpy_gbps"),
        "shm_bulk_memfd_ratio": ratio("shm_bulk_gbps", "memfd_copy_gbps"),
        "shm_bulk_copied_gbps": round(med["shm_bulk_copied_gbps"], 3),
        "shm_bulk_copied_ratio": ratio("shm_bulk_copied_gbps", "memcpy_gbps"),
        "handoff_gbps": round(med["handoff_gbps"], 3),
        "handoff_ratio": ratio("handoff_gbps", "memcpy_gbps"),
        "eventfd_rtt_us": round(med["eventfd_rtt_us"], 1),
        "eventfd_loop_rtt_us": round(med["eventfd_loop_rtt_us"], 1),
        "mp_queue_rtt_us": round(med["mp_queue_rtt_us"], 1),
        "ask_rtt_us": round(med["ask_rtt_us"], 1),
        "ask_rtt_ratio": ratio("ask_rtt_us", "eventfd_rtt_us"),
        "ask_rtt_loop_ratio": ratio("ask_rtt_us", "eventfd_loop_rtt_us"),
        "ask_rtt_mp_queue_ratio": ratio("ask_rtt_us", "mp_queue_rtt_us"),
        "tell_msgs_per_s": round(med["tell_msgs_per_s"]),
        "ask_n_to_n_per_s": round(med["ask_n_to_n_per_s"]),
        "n_to_n_actors": NN_ACTORS,
        **ws_figures,
        "node_tunables": node_tunables(),
        "tunables_probe_gbps": {k: round(v, 3) for k, v in probe_figures.items()},
        "message_bytes": BULK_BYTES,
        "ring_bytes": BULK_RING_BYTES,
        "repeat": repeat,
        "samples": {k: [round(x, 3) for x in v] for k, v in samples.items()},
    }


WS_BYTES = 4 << 20

_BARE_SERVER = textwrap.dedent("""
    import sys
    from aiohttp import web, WSMsgType

    async def handler(request):
        ws = web.WebSocketResponse(max_msg_size=8 << 20, compress=False)
        await ws.prepare(request)
        count = 0
        async for message in ws:
            if message.type == WSMsgType.BINARY:
                count += 1
            elif message.type == WSMsgType.TEXT:
                await ws.send_str(str(count))
        return ws

    async def main():
        app = web.Application()
        app.router.add_get("/", handler)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        print(site._server.sockets[0].getsockname()[1], flush=True)
        await asyncio.Event().wait()

    import asyncio
    from asyncdb.loop import run
    run(main())  # the same event loop as asyncdb's own nodes, for a like-for-like figure
""")


async def _bare_aiohttp(n: int, repeat: int) -> list[float]:
    """A bare aiohttp client sending `n` binary messages to a bare aiohttp server in
    another process, acknowledged at the end: seconds per round."""
    import aiohttp

    server = await asyncio.create_subprocess_exec(sys.executable, "-c", _BARE_SERVER,
                                                  stdout=subprocess.PIPE)
    try:
        assert server.stdout is not None
        port = int(await server.stdout.readline())
        payload = np.ones(WS_BYTES // 4, np.float32).tobytes()
        times = []
        async with aiohttp.ClientSession() as session, session.ws_connect(
                f"http://127.0.0.1:{port}/", max_msg_size=8 << 20, compress=0) as ws:
            for _ in range(repeat + 1):
                start = time.perf_counter()
                for _ in range(n):
                    await ws.send_bytes(payload)
                await ws.send_str("count")
                await ws.receive()
                times.append(time.perf_counter() - start)
        return times[1:]
    finally:
        server.terminate()
        await server.wait()


def mac_gbps(nbytes: int = WS_BYTES, n: int = 16) -> tuple[float, float]:
    """Tagging and checking `nbytes` websocket messages (HMAC-SHA256 and the copy that
    appends the tag), in this process: (seal GB/s, open GB/s), best of `n`."""
    from asyncdb.transport.wsauth import Opener, Sealer

    payload = np.ones(nbytes // 4, np.float32).data.cast("B")
    sealer, opener = Sealer(b"k" * 32), Opener(b"k" * 32)
    seal = check = float("inf")
    for _ in range(n):
        start = time.perf_counter()
        message = sealer.seal(payload)
        seal = min(seal, time.perf_counter() - start)
        start = time.perf_counter()
        opener.open(message)
        check = min(check, time.perf_counter() - start)
    return nbytes / seal / 1e9, nbytes / check / 1e9


async def websocket_figures(repeat: int, n: int, asks: int) -> dict[str, Any]:
    """Actors in this process and in an `asyncdb serve` process, over a websocket on
    loopback, against bare aiohttp moving the same messages in the same direction."""
    import os
    import secrets
    import tempfile

    from asyncdb.transport import ws

    secret = secrets.token_hex(32).encode()
    with tempfile.NamedTemporaryFile("wb", delete=False) as f:
        f.write(secret)
    server = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "asyncdb", "serve", "--listen", "127.0.0.1:0", "--secret-file",
        f.name, "--name", "bench-peer", "--import", "asyncdb.bench.transport",
        stdout=subprocess.PIPE)
    try:
        assert server.stdout is not None
        url = (await server.stdout.readline()).decode().split()[-1]
        os.unlink(f.name)
        async with Node("bench-driver") as node:
            channel = await ws.connect(url, secret, node.id)
            node.connect(channel.peer, channel)
            ours = await _timed(node, node.id, channel.peer, "bulk", n, WS_BYTES, repeat,
                                copy=False)
            rtt = await _timed(node, node.id, channel.peer, "ask", asks, 0, repeat)
        bare = await _bare_aiohttp(n, repeat)
    finally:
        server.terminate()
        await server.wait()
    ws_gbps = [n * WS_BYTES / t / 1e9 for t in ours]
    bare_gbps = [n * WS_BYTES / t / 1e9 for t in bare]
    ws_med, bare_med = statistics.median(ws_gbps), statistics.median(bare_gbps)
    rtt_us = [t / asks * 1e6 for t in rtt]
    macs = [mac_gbps() for _ in range(repeat)]
    seal = statistics.median(m[0] for m in macs)
    check = statistics.median(m[1] for m in macs)
    return {
        "ws_bulk_gbps": round(ws_med, 3),
        "aiohttp_bulk_gbps": round(bare_med, 3),
        "ws_bulk_ratio": round(ws_med / bare_med, 3),
        "ws_rtt_us": round(statistics.median(rtt_us), 1),
        "ws_mac_seal_gbps": round(seal, 3),
        "ws_mac_open_gbps": round(check, 3),
        # The sender's time per byte spent tagging: bulk GB/s over seal GB/s.
        "ws_mac_share": round(ws_med / seal, 3),
        "ws_message_bytes": WS_BYTES,
        "samples": {"ws_bulk_gbps": ws_gbps, "aiohttp_bulk_gbps": bare_gbps,
                    "ws_rtt_us": rtt_us, "ws_mac_seal_gbps": [m[0] for m in macs]},
    }
