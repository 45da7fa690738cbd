"""Node processes on this host, linked to the driver and to each other by shm rings.

The driver makes every link (a memfd, two eventfds and a socketpair), hands each child
its own descriptors with `pass_fds` and its config on stdin, and waits for each child's
hello. Children die with the driver (PR_SET_PDEATHSIG), ignore Ctrl-C (the driver
shuts them down in order), and leave nothing in /dev/shm whatever happens.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Any

from asyncdb.transport.shm import DEFAULT_RING_BYTES, ShmChannel, ShmEndpoint, create_link

from .errors import AsyncDBError, ChannelClosed
from .node import Node
from .system import SYSTEM

log = logging.getLogger("asyncdb.process")

THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
               "NUMEXPR_NUM_THREADS", "NUMEXPR_MAX_THREADS", "VECLIB_MAXIMUM_THREADS")
# Copies of 4 MiB and more (frames into and out of the rings) use non-temporal stores:
# they skip the read-for-ownership of cache lines the other process reads next. glibc
# on x86 otherwise starts only near the size of the last-level cache. Kept if the user
# set GLIBC_TUNABLES; ignored by other C libraries.
NODE_TUNABLES = "glibc.cpu.x86_non_temporal_threshold=0x400000"


def node_environment(threads: int | None) -> dict[str, str]:
    """The environment node processes start with."""
    env = dict(os.environ)
    env.setdefault("GLIBC_TUNABLES", NODE_TUNABLES)
    if threads is not None:
        for var in THREAD_VARS:
            env[var] = str(threads)
    return env


@dataclass
class NodeProcess:
    id: str
    popen: subprocess.Popen[bytes]
    pidfd: int = -1
    exited: asyncio.Future[int | None] = field(default_factory=lambda: asyncio.get_running_loop()
                                             .create_future())
    expected: bool = False

    @property
    def pid(self) -> int:
        return self.popen.pid


class LocalNodes:
    """`n` node processes on this host, linked by shared-memory rings.

    Use as `async with LocalNodes(node, 2) as nodes:`; `nodes.ids` names them. Every
    process is shut down on exit, on error and on cancellation (Ctrl-C).
    """

    _serial = itertools.count(1)

    def __init__(self, node: Node, n: int, *, ring_bytes: int = DEFAULT_RING_BYTES,
                 threads_per_node: int | None = 1, startup_timeout: float = 60.0,
                 prefix: str | None = None, imports: tuple[str, ...] = ()) -> None:
        if n < 1:
            raise ValueError("LocalNodes needs at least one node process")
        self.node = node
        self.ring_bytes = ring_bytes
        self.threads_per_node = threads_per_node
        self.startup_timeout = startup_timeout
        self.imports = imports
        prefix = prefix or f"node{next(self._serial)}"
        self.ids = [f"{prefix}.{i}" for i in range(n)]
        self.processes: dict[str, NodeProcess] = {}

    async def __aenter__(self) -> LocalNodes:
        try:
            await self.start()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> list[str]:
        everyone = [self.node.id, *self.ids]
        links: dict[str, list[tuple[str, ShmEndpoint]]] = {i: [] for i in everyone}
        for a, b in itertools.combinations(everyone, 2):
            end_a, end_b = create_link(self.ring_bytes)
            links[a].append((b, end_a))
            links[b].append((a, end_b))
        try:
            for child in self.ids:
                self._spawn(child, links[child])
        finally:
            for child in self.ids:
                for _peer, end in links[child]:
                    end.close_fds()  # the child has its own copies now
        for peer, end in links[self.node.id]:
            self.node.connect(peer, ShmChannel(end), trusted=True)  # our own children
        await asyncio.wait_for(self._await_hellos(), self.startup_timeout)
        return self.ids

    def _spawn(self, child: str, links: list[tuple[str, ShmEndpoint]]) -> None:
        main = getattr(sys.modules.get("__main__"), "__file__", None)
        config = {
            "node_id": child, "parent": self.node.id, "parent_pid": os.getpid(),
            "links": [{"peer": peer, **end.to_config()} for peer, end in links],
            "sys_path": sys.path, "main": main, "imports": list(self.imports),
            "log_level": logging.getLogger("asyncdb").getEffectiveLevel(),
        }
        env = node_environment(self.threads_per_node)
        fds = [fd for _peer, end in links for fd in end.fds()]
        # -P: the working directory does not go first on sys.path, so a source folder
        # named asyncdb there cannot shadow the installed package.
        popen = subprocess.Popen(
            [sys.executable, "-P", "-m", "asyncdb.nodeproc"], stdin=subprocess.PIPE,
            pass_fds=fds, env=env)
        assert popen.stdin is not None
        popen.stdin.write(json.dumps(config).encode())
        popen.stdin.close()
        proc = NodeProcess(child, popen)
        self.processes[child] = proc
        try:
            proc.pidfd = os.pidfd_open(popen.pid)
            self.node.loop.add_reader(proc.pidfd, self._on_exit, proc)
        except OSError:  # kernels before 5.3: fall back to polling
            self.node.background(self._poll_exit(proc))

    def _on_exit(self, proc: NodeProcess) -> None:
        self.node.loop.remove_reader(proc.pidfd)
        self._reap(proc)

    async def _poll_exit(self, proc: NodeProcess) -> None:
        while proc.popen.poll() is None:  # noqa: ASYNC110 (no pidfd: nothing to wait on)
            await asyncio.sleep(0.2)
        self._reap(proc)

    def _reap(self, proc: NodeProcess) -> None:
        code = proc.popen.wait()
        if not proc.exited.done():
            proc.exited.set_result(code)
        self.node.supervisor.on_node_exit(proc.id, code, proc.expected)

    async def _await_hellos(self) -> None:
        for child in self.ids:
            hello = asyncio.ensure_future(self.node.wait_peer(child))
            exited = self.processes[child].exited
            await asyncio.wait([hello, exited], return_when=asyncio.FIRST_COMPLETED)
            if not hello.done():
                hello.cancel()
                raise AsyncDBError(f"node process {child} exited with code "
                                   f"{exited.result()} before it was ready")
            hello.result()

    def alive(self) -> list[str]:
        return [i for i, p in self.processes.items() if not p.exited.done()]

    def kill(self, node_id: str, sig: int = signal.SIGKILL) -> None:
        """Send `sig` to one node process (fault-injection and tests)."""
        os.kill(self.processes[node_id].pid, sig)

    async def close(self, timeout: float = 5.0) -> None:
        """Ask every node to shut down, then terminate, then kill what is left."""
        procs = [p for p in self.processes.values() if not p.exited.done()]
        for proc in procs:
            proc.expected = True
            with contextlib.suppress(AsyncDBError):
                await self.node.ref(proc.id, SYSTEM).tell({"op": "shutdown"})
        for sig in (None, signal.SIGTERM, signal.SIGKILL):
            waiting = [p.exited for p in procs if not p.exited.done()]
            if not waiting:
                break
            if sig is not None:
                for proc in procs:
                    if not proc.exited.done():
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(proc.pid, sig)
            await asyncio.wait(waiting, timeout=timeout)
        for proc in self.processes.values():
            if proc.pidfd >= 0:
                with contextlib.suppress(OSError, ValueError, RuntimeError):
                    self.node.loop.remove_reader(proc.pidfd)
                os.close(proc.pidfd)
                proc.pidfd = -1
            if proc.popen.poll() is None:
                proc.popen.kill()
                proc.popen.wait()
        for child in self.ids:
            with contextlib.suppress(ChannelClosed):
                await self.node.disconnect(child)


def child_config_links(config: dict[str, Any]) -> list[tuple[str, ShmEndpoint]]:
    return [(link["peer"], ShmEndpoint.from_config(link)) for link in config["links"]]
