"""`asyncdb bench transport`: the shared-memory ring against this machine's floors.

Every figure comes from one run of this command, so ratios compare like with like on a
noisy machine: memcpy and a raw eventfd ping-pong are measured beside the actors.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import textwrap
import time
from typing import Any

import numpy as np

from ..actor import Actor, ActorRef
from ..node import Node
from ..process import LocalNodes

BULK_BYTES = 16 << 20
BULK_RING_BYTES = 64 << 20


def memcpy_gbps(nbytes: int = 64 << 20, repeat: int = 10) -> float:
    """Single-thread copy of a float32 array: the physical floor for moving bytes."""
    src = np.ones(nbytes // 4, np.float32)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - start)
    return nbytes / best / 1e9


_PONG = textwrap.dedent("""
    import os, sys
    ping, pong, n = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    for _ in range(n):
        os.eventfd_read(ping)
        os.eventfd_write(pong, 1)
""")


def eventfd_rtt_us(n: int = 5000, warmup: int = 200) -> float:
    """A raw two-process eventfd ping-pong: the floor for a woken-up round trip."""
    import os

    ping, pong = os.eventfd(0), os.eventfd(0)
    child = subprocess.Popen([sys.executable, "-c", _PONG, str(ping), str(pong),
                              str(n + warmup)], pass_fds=(ping, pong))
    try:
        for _ in range(warmup):
            os.eventfd_write(ping, 1)
            os.eventfd_read(pong)
        start = time.perf_counter()
        for _ in range(n):
            os.eventfd_write(ping, 1)
            os.eventfd_read(pong)
        return (time.perf_counter() - start) / n * 1e6
    finally:
        child.wait()
        os.close(ping)
        os.close(pong)


_HANDOFF = textwrap.dedent("""
    import mmap, os, sys
    import numpy as np
    memfd, n, size = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    full, empty = [int(x) for x in sys.argv[4:6]], [int(x) for x in sys.argv[6:8]]
    mm = mmap.mmap(memfd, 2 * size)
    slots = [np.frombuffer(mm, np.float32, size // 4, i * size) for i in range(2)]
    own = np.empty(size // 4, np.float32)
    for k in range(n):
        os.eventfd_read(full[k % 2])
        np.copyto(own, slots[k % 2])
        os.eventfd_write(empty[k % 2], 1)
""")


def handoff_gbps(nbytes: int = BULK_BYTES, n: int = 48) -> float:
    """A raw two-slot shared-memory handoff between two processes, eventfd-signalled,
    the receiver copying each payload out: what this machine allows without a ring."""
    import mmap
    import os

    memfd = os.memfd_create("asyncdb-bench")
    os.ftruncate(memfd, 2 * nbytes)
    full = [os.eventfd(0), os.eventfd(0)]
    empty = [os.eventfd(1), os.eventfd(1)]
    fds = (memfd, *full, *empty)
    child = subprocess.Popen([sys.executable, "-c", _HANDOFF, str(memfd), str(n + 4),
                              str(nbytes), *map(str, full), *map(str, empty)], pass_fds=fds)
    mm = mmap.mmap(memfd, 2 * nbytes)
    slots = [np.frombuffer(mm, np.float32, nbytes // 4, i * nbytes) for i in range(2)]
    payload = np.ones(nbytes // 4, np.float32)
    try:
        for k in range(n + 4):
            if k == 4:
                start = time.perf_counter()
            os.eventfd_read(empty[k % 2])
            np.copyto(slots[k % 2], payload)
            os.eventfd_write(full[k % 2], 1)
        child.wait()
        return n * nbytes / (time.perf_counter() - start) / 1e9
    finally:
        child.wait()
        del slots
        mm.close()
        for fd in fds:
            os.close(fd)


class Sink(Actor):
    """Receives bulk arrays and copies each into its own buffer; counts small tells."""

    borrow_arrays = True

    def __init__(self, nbytes: int = 0) -> None:
        self.buffer = np.empty(nbytes // 4, np.float32)
        self.received = 0

    async def receive(self, message: Any) -> Any:
        if isinstance(message, np.ndarray):
            np.copyto(self.buffer, message)
            self.received += 1
            return None
        if message == "count":
            return self.received
        self.received += 1
        return message


class Driver(Actor):
    """Runs a timed loop against a Sink on another node; returns seconds taken."""

    async def receive(self, message: dict[str, Any]) -> float:
        target: ActorRef = message["target"]
        n, op = int(message["n"]), message["op"]
        await target.ask("count")
        if op == "bulk":
            payload = np.ones(int(message["nbytes"]) // 4, np.float32)
            start = time.perf_counter()
            for _ in range(n):
                await target.tell(payload)
            await target.ask("count")
        elif op == "tell":
            start = time.perf_counter()
            for i in range(n):
                await target.tell(i)
            await target.ask("count")
        else:
            start = time.perf_counter()
            for _ in range(n):
                await target.ask(0)
        return time.perf_counter() - start


async def _timed(node: Node, nodes: LocalNodes, op: str, n: int, nbytes: int,
                 repeat: int) -> list[float]:
    first, second = nodes.ids
    sink = await node.spawn(Sink, node=second, config={"nbytes": nbytes})
    driver = await node.spawn(Driver, node=first)
    times = []
    for _ in range(repeat):
        times.append(await driver.ask({"op": op, "n": n, "target": sink, "nbytes": nbytes},
                                      timeout=300))
    return times


async def run(repeat: int = 5, bulk_messages: int = 64, asks: int = 3000,
              tells: int = 100_000) -> dict[str, Any]:
    samples: dict[str, list[float]] = {"memcpy_gbps": [], "eventfd_rtt_us": [],
                                       "handoff_gbps": []}
    async with Node("bench") as node, LocalNodes(node, 2, ring_bytes=BULK_RING_BYTES) as nodes:
        bulk = await _timed(node, nodes, "bulk", bulk_messages, BULK_BYTES, repeat)
        rtt = await _timed(node, nodes, "ask", asks, 0, repeat)
        tell = await _timed(node, nodes, "tell", tells, 0, repeat)
    for _ in range(repeat):
        samples["memcpy_gbps"].append(memcpy_gbps())
        samples["eventfd_rtt_us"].append(eventfd_rtt_us())
        samples["handoff_gbps"].append(handoff_gbps())
    samples["shm_bulk_gbps"] = [bulk_messages * BULK_BYTES / t / 1e9 for t in bulk]
    samples["ask_rtt_us"] = [t / asks * 1e6 for t in rtt]
    samples["tell_msgs_per_s"] = [tells / t for t in tell]
    med = {k: statistics.median(v) for k, v in samples.items()}
    return {
        "memcpy_gbps": round(med["memcpy_gbps"], 3),
        "shm_bulk_gbps": round(med["shm_bulk_gbps"], 3),
        "shm_bulk_ratio": round(med["shm_bulk_gbps"] / med["memcpy_gbps"], 3),
        "handoff_gbps": round(med["handoff_gbps"], 3),
        "handoff_ratio": round(med["handoff_gbps"] / med["memcpy_gbps"], 3),
        "eventfd_rtt_us": round(med["eventfd_rtt_us"], 1),
        "ask_rtt_us": round(med["ask_rtt_us"], 1),
        "ask_rtt_ratio": round(med["ask_rtt_us"] / med["eventfd_rtt_us"], 3),
        "tell_msgs_per_s": round(med["tell_msgs_per_s"]),
        "message_bytes": BULK_BYTES,
        "ring_bytes": BULK_RING_BYTES,
        "repeat": repeat,
        "samples": {k: [round(x, 3) for x in v] for k, v in samples.items()},
    }
