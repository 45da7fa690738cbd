"""Where a cluster's actors run: one `Placement` per cluster.

A placement starts the nodes a cluster needs and stops them, says on which node each
shard and replica goes, and how training data reaches a replica there. `InProcess` keeps
every actor in the driver's event loop; `LocalProcesses` starts node processes on this
host linked by shared-memory rings; `RemotePeers` uses `asyncdb serve` nodes reached over
websockets. `Cluster` holds one and never asks which kind it is.
"""

from __future__ import annotations

import itertools
import os
import socket
import ssl
from collections.abc import Sequence
from typing import Any

import numpy as np

from asyncdb.transport import ws
from asyncdb.transport.shm import DEFAULT_RING_BYTES

from .data import SharedArrays, inline_arrays
from .engine import default_threads
from .errors import ConfigError
from .node import Node
from .process import DEFAULT_FROZEN_AFTER, LocalNodes, NodeFailure, process_state
from .system import SYSTEM


class TrainingData:
    """The training rows as each replica receives them; `close` frees what was shared."""

    def __init__(self, specs: list[dict[str, Any]], slices: list[list[int]],
                 shared: SharedArrays | None = None, everywhere: bool = True) -> None:
        self.specs = specs
        self.slices = slices  # rows [lo, hi) of each replica's spec that are its own
        self.everywhere = everywhere  # every replica holds every row
        self._shared = shared

    def close(self) -> None:
        if self._shared is not None:
            self._shared.close()
            self._shared = None


class Placement:
    """Base class: nodes for shards and replicas, started and stopped together."""

    name = "placement"

    def __init__(self) -> None:
        self.node: Node | None = None

    def driver_name(self) -> str:
        return "driver"

    async def start(self, node: Node, shards: int, replicas: int) -> None:
        """Start whatever nodes `shards` shards and `replicas` replicas need."""
        self.node = node

    async def close(self) -> None:
        """Stop the nodes `start` made (the driver's own node is the cluster's)."""

    def place(self, shards: int, replicas: int) -> tuple[list[str], list[str]]:
        """The node of each shard and of each replica."""
        raise NotImplementedError

    def shard_threads(self, shards: int, replicas: int) -> int | None:
        """Threads a shard's update engine may use (None: the node decides)."""
        return None

    def training_data(self, x: np.ndarray, y: np.ndarray,
                      slices: list[list[int]]) -> TrainingData:
        """How each replica receives rows `slices[i]` of (x, y)."""
        return TrainingData([inline_arrays({"x": x, "y": y})] * len(slices), slices)

    def pid(self, node_id: str) -> int | None:
        return os.getpid() if self.node is not None and node_id == self.node.id else None

    def host(self, node_id: str) -> str:
        return socket.gethostname()

    def on_failure(self, callback: NodeFailure) -> None:
        """Call `callback(node_id, reason)` when a node the placement started dies or
        stops answering (never for an in-process placement: nothing there can die)."""

    async def replace(self, node_id: str) -> str:
        """A node to re-create the actors of failed node `node_id` on: a restarted
        process, or another live peer. `ConfigError` when there is none."""
        raise ConfigError(f"{self.name} placement cannot replace node {node_id}")

    def alive(self, node_id: str) -> bool:
        """Whether node `node_id` is still there, as far as can be told at once."""
        return self.node is not None and node_id == self.node.id

    async def add_node(self) -> str:
        """A node for one more replica during a run (`Cluster.add_replicas`)."""
        raise ConfigError(f"{self.name} placement cannot add replicas during a run")


class InProcess(Placement):
    """Every actor in the caller's event loop (embedding, tests)."""

    name = "inproc"

    def place(self, shards: int, replicas: int) -> tuple[list[str], list[str]]:
        assert self.node is not None
        return [self.node.id] * shards, [self.node.id] * replicas

    def shard_threads(self, shards: int, replicas: int) -> int | None:
        return default_threads()

    async def add_node(self) -> str:
        assert self.node is not None
        return self.node.id


class LocalProcesses(Placement):
    """One node process per shard and per replica on this host, shm rings between; with
    `colocate`, one process per replica, shard i living in replica i % replicas's."""

    name = "local"

    def __init__(self, colocate: bool = False, ring_bytes: int | None = None,
                 liveness: float | None = DEFAULT_FROZEN_AFTER) -> None:
        super().__init__()
        self.colocate = colocate
        self.ring_bytes = ring_bytes or DEFAULT_RING_BYTES
        self.liveness = liveness
        self.nodes: LocalNodes | None = None

    def processes(self, shards: int, replicas: int) -> int:
        return replicas if self.colocate else shards + replicas

    async def start(self, node: Node, shards: int, replicas: int) -> None:
        await super().start(node, shards, replicas)
        self.nodes = LocalNodes(node, self.processes(shards, replicas), prefix="node",
                                ring_bytes=self.ring_bytes, frozen_after=self.liveness)
        await self.nodes.start()

    async def close(self) -> None:
        if self.nodes is not None:
            await self.nodes.close()

    def place(self, shards: int, replicas: int) -> tuple[list[str], list[str]]:
        assert self.nodes is not None
        ids = self.nodes.ids
        if self.colocate:
            return [ids[i % replicas] for i in range(shards)], ids[:replicas]
        return ids[:shards], ids[shards:shards + replicas]

    def shard_threads(self, shards: int, replicas: int) -> int | None:
        return default_threads(self.processes(shards, replicas))

    def training_data(self, x: np.ndarray, y: np.ndarray,
                      slices: list[list[int]]) -> TrainingData:
        shared = SharedArrays({"x": x, "y": y})  # one copy in memory for every replica
        return TrainingData([shared.spec] * len(slices), slices, shared)

    def pid(self, node_id: str) -> int | None:
        if self.nodes is not None and node_id in self.nodes.processes:
            return self.nodes.processes[node_id].pid
        return super().pid(node_id)

    def on_failure(self, callback: NodeFailure) -> None:
        assert self.nodes is not None
        self.nodes.on_failure(callback)

    async def replace(self, node_id: str) -> str:
        assert self.nodes is not None
        return await self.nodes.restart(node_id)

    async def add_node(self) -> str:
        """A new node process, linked to every live one."""
        assert self.nodes is not None
        return await self.nodes.add()

    def alive(self, node_id: str) -> bool:
        if self.nodes is None or node_id not in self.nodes.processes:
            return super().alive(node_id)
        proc = self.nodes.processes[node_id]
        return not proc.exited.done() and process_state(proc.pid) not in ("", "Z", "X")


class RemotePeers(Placement):
    """Nodes on other hosts (`asyncdb serve`) over websockets; shards and replicas are
    spread over the peers in turn, and each replica's rows are streamed to it."""

    name = "remote"

    def __init__(self, urls: Sequence[str], secret: bytes, *,
                 ssl_context: ssl.SSLContext | None = None,
                 heartbeat: float = ws.DEFAULT_HEARTBEAT) -> None:
        super().__init__()
        if not urls:
            raise ConfigError("Cluster.connect needs at least one peer URL")
        self.urls = list(urls)
        self.secret = secret
        self.ssl_context = ssl_context
        self.heartbeat = heartbeat
        self.peer_ids: list[str] = []
        self._replacements = 0

    def driver_name(self) -> str:
        return f"driver-{socket.gethostname()}-{os.getpid()}"

    async def start(self, node: Node, shards: int, replicas: int) -> None:
        await super().start(node, shards, replicas)
        for url in self.urls:
            channel = await ws.connect(url, self.secret, node.id,
                                       ssl_context=self.ssl_context, heartbeat=self.heartbeat)
            if channel.peer in self.peer_ids:
                await channel.close()
                raise ConfigError(f"two peer URLs reach the same node {channel.peer!r}")
            node.connect(channel.peer, channel)
            self.peer_ids.append(channel.peer)
        for i, peer in enumerate(self.peer_ids):  # replicas talk to shards directly
            for url in self.urls[i + 1:]:
                await node.ref(peer, SYSTEM).ask({"op": "dial", "url": url})

    def place(self, shards: int, replicas: int) -> tuple[list[str], list[str]]:
        ids = self.peer_ids
        return ([ids[i % len(ids)] for i in range(shards)],
                [ids[(shards + i) % len(ids)] for i in range(replicas)])

    def training_data(self, x: np.ndarray, y: np.ndarray,
                      slices: list[list[int]]) -> TrainingData:
        specs = [inline_arrays({"x": x[lo:hi], "y": y[lo:hi]}) for lo, hi in slices]
        return TrainingData(specs, [[0, hi - lo] for lo, hi in slices], everywhere=False)

    def pid(self, node_id: str) -> int | None:
        assert self.node is not None
        info = self.node.peer_info.get(node_id)
        pid = info.get("pid") if isinstance(info, dict) else None
        return pid if isinstance(pid, int) else super().pid(node_id)

    def host(self, node_id: str) -> str:
        assert self.node is not None
        info = self.node.peer_info.get(node_id)
        host = info.get("host") if isinstance(info, dict) else None
        return host if isinstance(host, str) else node_id

    def on_failure(self, callback: NodeFailure) -> None:
        assert self.node is not None
        peers = self.peer_ids

        def lost(peer: str, error: BaseException) -> None:
            if peer in peers:
                callback(peer, f"lost ({error})")

        self.node.on_peer_lost(lost)

    async def replace(self, node_id: str) -> str:
        """Another live peer (a host that went away is not restarted from here)."""
        assert self.node is not None
        live = [p for p in self.peer_ids if p != node_id and p in self.node.peers()]
        if not live:
            raise ConfigError(f"peer {node_id} is lost and no other peer is left")
        self._replacements += 1
        return live[self._replacements % len(live)]

    def alive(self, node_id: str) -> bool:
        assert self.node is not None
        return node_id in self.node.peers() or super().alive(node_id)


def split_rows(n: int, parts: int) -> list[list[int]]:
    """`parts` contiguous row ranges covering [0, n) as evenly as possible."""
    edges = [n * i // parts for i in range(parts + 1)]
    return [[lo, hi] for lo, hi in itertools.pairwise(edges)]
