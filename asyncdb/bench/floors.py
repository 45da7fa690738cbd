"""What this machine allows without asyncdb: the raw references of `bench transport`.

Each is measured the way the figure it is compared with runs: copies in a process
started like a node process (same environment, C library tuning included), out of memfd
memory as a receiver reads shared arrays; wake-ups through eventfds, blocking and
awaited through the event loop; and a `multiprocessing.Queue` round trip for a peer.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import subprocess
import sys
import textwrap
import time
from typing import Any

import numpy as np

from ..process import node_environment

BULK_BYTES = 16 << 20
SHARED_BUFFERS = 3


def memcpy_gbps(nbytes: int = 64 << 20, repeat: int = 10) -> float:
    """Single-thread copy of a float32 array in this process."""
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


def in_node_environment(function: str) -> float:
    """Run `asyncdb.bench.transport.<function>()` in a process started like a node
    (same environment, C library tuning included); return its figure."""
    code = f"from asyncdb.bench.floors import {function}; print({function}())"
    out = subprocess.run([sys.executable, "-c", code], env=node_environment(None),
                         capture_output=True, text=True, check=True)
    return float(out.stdout.strip())


def memcpy_floor_gbps() -> float:
    """The physical floor for moving bytes: the faster of a copy in this process and
    one in a process started as nodes are (whose large copies may be non-temporal)."""
    return max(memcpy_gbps(), in_node_environment("memcpy_gbps"))


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


def memfd_copy_gbps(nbytes: int = BULK_BYTES, buffers: int = SHARED_BUFFERS,
                    rounds: int = 8) -> float:
    """Copies out of a memfd mapping into one private array, `buffers` sources in turn
    (what the receiver of `shm_bulk` does, minus the ring): GB/s over all but the
    first round. Run it with `in_node_environment`."""
    import mmap

    fd = os.memfd_create("asyncdb-bench", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, buffers * nbytes)
        mm = mmap.mmap(fd, buffers * nbytes)
    finally:
        os.close(fd)
    sources = [np.frombuffer(mm, np.float32, nbytes // 4, i * nbytes) for i in range(buffers)]
    for source in sources:
        source.fill(1.0)
    own = np.empty(nbytes // 4, np.float32)
    for source in sources:  # warm-up round: destination pages faulted in
        np.copyto(own, source)
    start = time.perf_counter()
    for i in range(rounds * buffers):
        np.copyto(own, sources[i % buffers])
    seconds = time.perf_counter() - start  # the mapping goes with the last view
    return rounds * buffers * nbytes / seconds / 1e9


async def eventfd_pingpong(receive_fd: int, send_fd: int, n: int, serve: bool) -> float:
    """`n` eventfd round trips, each side awaiting the other's signal through the event
    loop (a reader callback settles a future the waiting task awaits), as the rings'
    wake-ups are: microseconds per round trip (for the side that starts them)."""
    loop = asyncio.get_running_loop()
    waiter: list[asyncio.Future[None]] = []

    def on_readable() -> None:
        os.eventfd_read(receive_fd)
        if waiter and not waiter[0].done():
            waiter[0].set_result(None)

    async def signalled() -> None:
        waiter[:] = [loop.create_future()]
        await waiter[0]

    loop.add_reader(receive_fd, on_readable)
    try:
        start = time.perf_counter()
        for _ in range(n):
            if serve:
                await signalled()
                os.eventfd_write(send_fd, 1)
            else:
                future = loop.create_future()
                waiter[:] = [future]
                os.eventfd_write(send_fd, 1)
                await future
        return (time.perf_counter() - start) / n * 1e6
    finally:
        loop.remove_reader(receive_fd)


_LOOP_PONG = textwrap.dedent("""
    import sys
    from asyncdb.bench.floors import eventfd_pingpong
    from asyncdb.loop import run
    ping, pong, n = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    run(eventfd_pingpong(ping, pong, n, serve=True))
""")


async def eventfd_loop_rtt_us(n: int = 5000, warmup: int = 500) -> float:
    """An eventfd round trip between two processes, both awaiting through their event
    loops (uvloop where installed, as nodes): the floor for an ask's two wake-ups."""
    flags = os.EFD_NONBLOCK
    ping, pong = os.eventfd(0, flags), os.eventfd(0, flags)
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _LOOP_PONG, str(ping), str(pong), str(n + warmup),
        pass_fds=(ping, pong), env=node_environment(None))
    try:
        await eventfd_pingpong(pong, ping, warmup, serve=False)
        return await eventfd_pingpong(pong, ping, n, serve=False)
    finally:
        await child.wait()
        os.close(ping)
        os.close(pong)


def _echo(inbox: Any, outbox: Any) -> None:
    while (item := inbox.get()) is not None:
        outbox.put(item)


def mp_queue_rtt_us(n: int = 3000, warmup: int = 300) -> float:
    """A `multiprocessing.Queue` round trip to a child that echoes small messages."""
    context = multiprocessing.get_context("spawn")
    there, back = context.Queue(), context.Queue()
    child = context.Process(target=_echo, args=(there, back), daemon=True)
    child.start()
    try:
        for i in range(warmup):
            there.put(i)
            back.get()
        start = time.perf_counter()
        for i in range(n):
            there.put(i)
            back.get()
        return (time.perf_counter() - start) / n * 1e6
    finally:
        there.put(None)
        child.join(30)
        if child.is_alive():
            child.kill()
            child.join()
        there.close()
        back.close()
