"""Node processes on this host, linked to the driver and to each other by shm rings.

The driver makes every link (a memfd, two eventfds and a socketpair), hands each child
its own descriptors with `pass_fds` and its config on stdin, and waits for each child's
hello. Children die with the driver (PR_SET_PDEATHSIG), ignore Ctrl-C (the driver
shuts them down in order), and leave nothing in /dev/shm whatever happens.

Liveness comes from the kernel: a pidfd says at once that a child died, and the
child's state in /proc says it is stopped (SIGSTOP, a debugger); a child stopped for
longer than `frozen_after` seconds is killed. A busy child (a long BLAS call, a large
fsync) is running, never stopped, so it is never taken for a frozen one. A dead child
can be replaced with `restart`: the new process gets a new id (`node.2~1`) and fresh
links to the driver and to every live child, which receive their ends as descriptors
over a control socket (SCM_RIGHTS).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from asyncdb.transport.shm import DEFAULT_RING_BYTES, ShmChannel, ShmEndpoint, create_link

from .errors import AsyncDBError, ChannelClosed
from .node import Node
from .system import SYSTEM
from .tunables import node_tunables

log = logging.getLogger("asyncdb.process")

THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
               "NUMEXPR_NUM_THREADS", "NUMEXPR_MAX_THREADS", "VECLIB_MAXIMUM_THREADS")
DEFAULT_FROZEN_AFTER = 10.0
# Called with (node id, reason) when a child dies unexpectedly or is found frozen.
NodeFailure = Callable[[str, str], None]


def node_environment(threads: int | None) -> dict[str, str]:
    """The environment node processes start with: the C library tuning measured for
    this machine (`asyncdb.tunables`), one BLAS thread each unless told otherwise."""
    env = dict(os.environ)
    tuning = node_tunables()
    if tuning is not None:
        env["GLIBC_TUNABLES"] = tuning
    if threads is not None:
        for var in THREAD_VARS:
            env[var] = str(threads)
    return env


@dataclass
class NodeProcess:
    id: str
    popen: subprocess.Popen[bytes]
    control: socket.socket
    pidfd: int = -1
    exited: asyncio.Future[int | None] = field(default_factory=lambda: asyncio.get_running_loop()
                                             .create_future())
    expected: bool = False
    stopped_since: float | None = None

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
                 prefix: str | None = None, imports: tuple[str, ...] = (),
                 frozen_after: float | None = DEFAULT_FROZEN_AFTER) -> None:
        if n < 1:
            raise ValueError("LocalNodes needs at least one node process")
        if frozen_after is not None and frozen_after <= 0:
            raise ValueError("frozen_after must be positive (or None: never)")
        self.node = node
        self.frozen_after = frozen_after
        self._on_failure: list[NodeFailure] = []
        self._monitor: asyncio.Task[None] | None = None
        self._closing = False
        self.ring_bytes = ring_bytes
        self.threads_per_node = threads_per_node
        self.startup_timeout = startup_timeout
        self.imports = imports
        self.prefix = prefix or f"node{next(self._serial)}"
        self.ids = [f"{self.prefix}.{i}" for i in range(n)]
        self._added = n
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
        # Measured once per driver process, off the event loop (a few small processes).
        await self.node.loop.run_in_executor(None, node_tunables)
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
        await asyncio.wait_for(self._await_hellos(self.ids), self.startup_timeout)
        if self.frozen_after is not None:
            self._monitor = self.node.background(self._watch_stopped(self.frozen_after))
        return self.ids

    def on_failure(self, callback: NodeFailure) -> None:
        """Call `callback(node_id, reason)` when a child dies unexpectedly or is found
        frozen (and killed)."""
        self._on_failure.append(callback)

    async def restart(self, node_id: str) -> str:
        """Replace child `node_id` (killed first if it still runs) by a fresh process
        linked to the driver and to every live child; return the new child's id, which
        takes the old one's place in `ids`. Its actors are not re-created here."""
        old = self.processes[node_id]
        old.expected = True
        if not old.exited.done():
            with contextlib.suppress(ProcessLookupError):
                os.kill(old.pid, signal.SIGKILL)
            await old.exited
        await self.node.disconnect(node_id)
        base, _, generation = node_id.partition("~")
        new_id = f"{base}~{int(generation or 0) + 1}"
        others = [i for i in self.alive() if i != node_id]
        self.ids[self.ids.index(node_id)] = new_id
        await self._launch(new_id, others)
        log.info("node %s restarted as %s (pid %d)", node_id, new_id,
                 self.processes[new_id].pid)
        return new_id

    async def add(self) -> str:
        """Start one more child, linked to the driver and to every live child; return
        its id (added to `ids`)."""
        new_id = f"{self.prefix}.{self._added}"
        self._added += 1
        others = self.alive()
        self.ids.append(new_id)
        await self._launch(new_id, others)
        log.info("node %s added (pid %d)", new_id, self.processes[new_id].pid)
        return new_id

    async def _launch(self, new_id: str, others: list[str]) -> None:
        """Spawn child `new_id` with fresh links to the driver and to `others` (handed
        to them over their control sockets) and wait for its hello."""
        links: list[tuple[str, ShmEndpoint]] = []
        driver_end = None
        try:
            for other in [self.node.id, *others]:
                mine, theirs = create_link(self.ring_bytes)
                links.append((other, mine))
                if other == self.node.id:
                    driver_end = theirs
                else:
                    self._send_link(other, new_id, theirs)
            self._spawn(new_id, links)
        finally:
            for _peer, end in links:
                end.close_fds()
        assert driver_end is not None
        self.node.connect(new_id, ShmChannel(driver_end), trusted=True)
        await asyncio.wait_for(self._await_hellos([new_id]), self.startup_timeout)

    def _send_link(self, child: str, peer: str, end: ShmEndpoint) -> None:
        """Hand `child` its end of a new link to `peer`; the child has its own copies
        of the descriptors once this returns."""
        header = json.dumps({"peer": peer, "side": end.side, "ring_bytes": end.ring_bytes})
        try:
            socket.send_fds(self.processes[child].control, [header.encode()], end.fds())
        except OSError as exc:  # the child died meanwhile: it needs no link
            log.info("node %s: no new link to %s (%s)", child, peer, exc)
        finally:
            end.close_fds()

    async def _watch_stopped(self, frozen_after: float) -> None:
        """Kill children that stay stopped (SIGSTOP) for `frozen_after` seconds."""
        period = min(0.25, frozen_after / 4)
        while not self._closing:
            await asyncio.sleep(period)
            now = time.monotonic()
            for proc in list(self.processes.values()):
                if proc.exited.done() or proc.expected:
                    continue
                if process_state(proc.pid) not in ("T", "t"):
                    proc.stopped_since = None
                elif proc.stopped_since is None:
                    proc.stopped_since = now
                elif now - proc.stopped_since >= frozen_after:
                    self._frozen(proc, now - proc.stopped_since)

    def _frozen(self, proc: NodeProcess, seconds: float) -> None:
        log.error("node %s (pid %d) has been stopped for %.1f s: taken as frozen, killed",
                  proc.id, proc.pid, seconds)
        proc.expected = True  # reported here, not again when it is reaped
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        self._report(proc.id, f"frozen (stopped for {seconds:.1f} s), killed")

    def _report(self, node_id: str, reason: str) -> None:
        for callback in self._on_failure:
            try:
                callback(node_id, reason)
            except Exception:
                log.exception("node-failure callback failed for %s", node_id)

    def _spawn(self, child: str, links: list[tuple[str, ShmEndpoint]]) -> None:
        main = getattr(sys.modules.get("__main__"), "__file__", None)
        config = {
            "node_id": child, "parent": self.node.id, "parent_pid": os.getpid(),
            "links": [{"peer": peer, **end.to_config()} for peer, end in links],
            "sys_path": sys.path, "main": main, "imports": list(self.imports),
            "log_level": logging.getLogger("asyncdb").getEffectiveLevel(),
        }
        control, child_control = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        config["control_fd"] = child_control.fileno()
        env = node_environment(self.threads_per_node)
        fds = [fd for _peer, end in links for fd in end.fds()] + [child_control.fileno()]
        # -P: the working directory does not go first on sys.path, so a source folder
        # named asyncdb there cannot shadow the installed package.
        try:
            popen = subprocess.Popen(
                [sys.executable, "-P", "-m", "asyncdb.nodeproc"], stdin=subprocess.PIPE,
                pass_fds=fds, env=env)
        except BaseException:
            control.close()
            raise
        finally:
            child_control.close()
        assert popen.stdin is not None
        popen.stdin.write(json.dumps(config).encode())
        popen.stdin.close()
        proc = NodeProcess(child, popen, control)
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
        proc.control.close()
        if not proc.exited.done():
            proc.exited.set_result(code)
        self.node.supervisor.on_node_exit(proc.id, code, proc.expected)
        if not proc.expected:
            self._report(proc.id, f"died (exit code {code})")

    async def _await_hellos(self, children: list[str]) -> None:
        for child in children:
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
        self._closing = True
        if self._monitor is not None:
            self._monitor.cancel()
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
            proc.control.close()
        for child in self.processes:
            with contextlib.suppress(ChannelClosed):
                await self.node.disconnect(child)


def child_config_links(config: dict[str, Any]) -> list[tuple[str, ShmEndpoint]]:
    return [(link["peer"], ShmEndpoint.from_config(link)) for link in config["links"]]


def receive_link(control: socket.socket) -> tuple[str, ShmEndpoint] | None:
    """In a child: the next link the driver hands over on `control` (None when the
    driver closed it)."""
    message, fds, _flags, _address = socket.recv_fds(control, 4096, 4)
    if not message:
        return None
    header = json.loads(message)
    if len(fds) != 4:
        for fd in fds:
            os.close(fd)
        raise AsyncDBError(f"link to {header.get('peer')!r} arrived with {len(fds)} fds")
    memfd, wake_fd, peer_wake_fd, sock_fd = fds
    return str(header["peer"]), ShmEndpoint(memfd, wake_fd, peer_wake_fd, sock_fd,
                                            int(header["side"]), int(header["ring_bytes"]))


def process_state(pid: int) -> str:
    """The one-letter state of process `pid` in /proc (R, S, D, T, Z, ...), or "" if
    it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return ""
    return stat.rpartition(b")")[2].split()[0].decode()
