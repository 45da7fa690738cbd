"""Fault tolerance of a training run: shard checkpoints taken from the driver, failed
nodes replaced, their actors re-created there, every step recorded as an event.

The driver asks the shards for their state every `every` seconds (`Checkpointer`), so
the checkpoints live where the driver is, whatever the placement: under
`Cluster.connect` a shard's state streams to the driver and a shard re-created on
another peer never needs a dead host's disk. `Recovery` hears of failed nodes from the
placement (a dead or frozen process, a lost peer), replaces each node (a restarted
process, another peer) and re-creates its actors there: a shard from its latest
checkpoint, never from its initial values, and a replica as a new incarnation with a
higher generation, so anything the old one still sends is refused. The algorithm
waits for `settled()` before handing out more work, and asks `current()` for an
actor's newest ref.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from .actor import ActorRef
from .checkpoint import CheckpointStore
from .errors import AsyncDBError, CheckpointError, RecoveryFailed
from .placement import Placement
from .shard_client import ShardCheckpoint, ShardClient

log = logging.getLogger("asyncdb.recovery")

Respawn = Callable[[str, int], Awaitable[ActorRef]]  # (node, generation) -> new ref


@dataclass(frozen=True)
class RestartPolicy:
    """How often a failed node is replaced: at most `max_restarts` times per run, the
    n-th time after `backoff * 2**(n-1)` seconds (capped at `max_backoff`)."""

    max_restarts: int = 10
    backoff: float = 0.0
    max_backoff: float = 5.0

    def delay(self, attempt: int) -> float:
        return 0.0 if attempt <= 1 else min(self.max_backoff, self.backoff * 2 ** (attempt - 2))


class Events:
    """What happened to a run, with times in seconds since it started."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.entries: list[dict[str, Any]] = []
        self._recorded = asyncio.Event()

    def record(self, kind: str, **fields: Any) -> dict[str, Any]:
        entry = {"time": round(time.perf_counter() - self.started, 4), "event": kind, **fields}
        self.entries.append(entry)
        self._recorded.set()
        return entry

    async def wait(self, kind: str, **fields: Any) -> dict[str, Any]:
        """The first entry of `kind` with these fields, once it is recorded."""
        while True:
            for entry in self.entries:
                if entry["event"] == kind and all(entry.get(k) == v for k, v in fields.items()):
                    return entry
            self._recorded.clear()
            await self._recorded.wait()


@dataclass
class Site:
    """One actor of the run, where it runs now, and how to create it again."""

    role: str
    index: int
    node: str
    ref: ActorRef
    respawn: Respawn
    generation: int = 0
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    # every node it occupies (a partitioned replica's partitions), `node` first
    nodes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.nodes = self.nodes or [self.node]


class Checkpointer:
    """Takes every shard's state from the driver, every `every` seconds, into memory
    and (with a store) to disk."""

    def __init__(self, client: ShardClient, store: CheckpointStore | None,
                 every: float | None, events: Events) -> None:
        if every is not None and every <= 0:
            raise AsyncDBError("checkpoint_every must be positive (or None: never)")
        self.client = client
        self.store = store
        self.every = every
        self.events = events
        self.latest: dict[int, ShardCheckpoint] = {}
        self.seconds = 0.0
        self.taken = 0
        self.round = 0  # rounds taken, numbered on from a resumed run's
        # The run's own state (plain data), read before the shards are: what it says
        # is done is in every shard checkpoint of the same round. Saved only when
        # every shard was checkpointed.
        self.state: Callable[[], dict[str, Any]] | None = None

    async def take(self, whole: bool = False) -> None:
        """Checkpoint every shard that answers; a shard that does not keeps its last.
        With `whole`, a round is all or nothing: if one shard fails, its error is
        raised and every shard keeps its last checkpoint (they stay one round)."""
        began = time.perf_counter()
        state = None if self.state is None else self.state()
        results = await asyncio.gather(
            *(self.client.checkpoint_shard(i) for i in range(len(self.client))),
            return_exceptions=True)
        copied = time.perf_counter()
        failed = [r for r in results if isinstance(r, BaseException)]
        if whole and failed:
            raise failed[0]
        taken: dict[int, ShardCheckpoint] = {}
        for i, result in enumerate(results):
            if isinstance(result, BaseException):
                log.info("shard %d not checkpointed this time: %r", i, result)
                continue
            self.latest[i] = taken[i] = result
        self.round += 1
        if self.store is not None:  # encoding, checksum and fsync in a thread
            await asyncio.to_thread(self._write, taken,
                                    state if len(taken) == len(results) else None)
        ended = time.perf_counter()
        self.taken += 1
        self.seconds += ended - began
        self.events.record("checkpoint", shards=sorted(taken), round=self.round,
                           copy_seconds=round(copied - began, 4),
                           write_seconds=round(ended - copied, 4))

    def _write(self, taken: dict[int, ShardCheckpoint], state: dict[str, Any] | None) -> None:
        """Shards first, then the run's state: a state on disk finds its round's shards."""
        assert self.store is not None
        for i, saved in taken.items():
            arrays = {"values": saved.values,
                      **{f"state.{k}": v for k, v in saved.state.items()}}
            self.store.save(f"shard-{i}", arrays, {"version": saved.version,
                                                   "round": self.round})
        if state is not None:
            self.store.save("run", {}, {**state, "round": self.round})

    async def restore(self) -> None:
        """Put every shard back to its latest checkpoint (one round, after `take`
        with `whole`)."""
        await self.client.restore([self.latest[i] for i in range(len(self.client))])

    def saved(self, index: int) -> ShardCheckpoint:
        """Shard `index`'s latest checkpoint, from memory or from the store."""
        if index in self.latest:
            return self.latest[index]
        if self.store is None:
            raise CheckpointError(f"shard {index} has no checkpoint yet")
        return load_shard(self.store, index)

    async def run(self) -> None:
        """Checkpoint every `every` seconds until cancelled."""
        if self.every is None or math.isinf(self.every):
            return
        while True:
            await asyncio.sleep(self.every)
            await self.take()


def load_shard(store: CheckpointStore, index: int, round_: int | None = None
               ) -> ShardCheckpoint:
    """Shard `index`'s newest usable checkpoint in `store` (of round `round_`, if given)."""
    arrays, meta = store.load(f"shard-{index}", None if round_ is None
                              else lambda meta: meta.get("round") == round_)
    if "values" not in arrays or not isinstance(meta.get("version"), int):
        raise CheckpointError(f"shard {index}'s checkpoint in {store.directory} is malformed")
    state = {k.removeprefix("state."): v for k, v in arrays.items() if k.startswith("state.")}
    return ShardCheckpoint(arrays["values"], state, int(meta["version"]))


class Recovery:
    """Replaces failed nodes and re-creates their actors; see the module docstring."""

    def __init__(self, placement: Placement, events: Events,
                 policy: RestartPolicy | None = None) -> None:
        self.placement = placement
        self.events = events
        self.policy = policy or RestartPolicy()
        self.sites: dict[tuple[str, int], Site] = {}
        self.restarts = 0
        self.failure: RecoveryFailed | None = None
        self.recovery_seconds: list[float] = []
        self.abandoned: set[tuple[str, int]] = set()  # replicas given up: the run goes on
        self._failed: dict[str, float] = {}  # node -> when its failure was reported
        self._busy: set[asyncio.Task[None]] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self.closed = False  # the run is over: failures are not its business any more
        placement.on_failure(self.failed)

    def track(self, role: str, index: int, node: str, ref: ActorRef, respawn: Respawn,
              nodes: list[str] | None = None) -> None:
        """Re-create actor (role, index) with `respawn` when `node` (or any of `nodes`,
        for an actor spread over several, recreated whole) fails."""
        self.sites[(role, index)] = Site(role, index, node, ref, respawn, nodes=nodes or [])

    def forget(self, role: str, index: int) -> None:
        """Re-create that actor no more (it leaves the run)."""
        self.sites.pop((role, index), None)

    def tracks(self, role: str, index: int) -> bool:
        """Whether recovery re-creates that actor when it fails."""
        return (role, index) in self.sites and (role, index) not in self.abandoned

    def current(self, role: str, index: int) -> Site:
        return self.sites[(role, index)]

    def failed(self, node: str, reason: str) -> None:
        """A node failed (from the placement, or found by `suspect`): replace it."""
        if node in self._failed or self.failure is not None or self.closed:
            return
        victims = [s for s in self.sites.values() if node in s.nodes]
        if not victims:
            return
        self._failed[node] = time.perf_counter()
        names = ", ".join(f"{s.role} {s.index}" for s in victims)
        log.error("node %s %s; it held %s", node, reason, names)
        self.events.record("failure", node=node, reason=reason,
                           actors=[[s.role, s.index] for s in victims])
        self._idle.clear()
        task = asyncio.get_running_loop().create_task(self._recover(node, victims))
        self._busy.add(task)
        task.add_done_callback(self._done)

    def suspect(self, nodes: list[str]) -> None:
        """An ask to one of `nodes` failed: report those that are no longer alive."""
        for node in nodes:
            if node not in self._failed and not self.placement.alive(node):
                self.failed(node, "died (found gone after a failed unit)")

    async def settled(self) -> None:
        """Wait until no recovery is in progress; `RecoveryFailed` if one failed."""
        await self._idle.wait()
        if self.failure is not None:
            raise self.failure

    def _done(self, task: asyncio.Task[None]) -> None:
        self._busy.discard(task)
        if not task.cancelled() and task.exception() is not None and self.failure is None:
            self.failure = RecoveryFailed(str(task.exception()))
        if not self._busy:
            self._idle.set()

    async def _recover(self, node: str, victims: list[Site]) -> None:
        detected = self._failed[node]
        self.restarts += 1
        if self.restarts > self.policy.max_restarts:
            reason = f"{self.policy.max_restarts} restarts in this run were used up"
            if all(site.role == "replica" for site in victims):  # the others go on
                for site in victims:
                    self.abandoned.add((site.role, site.index))
                    self.events.record("abandoned", role=site.role, index=site.index,
                                       reason=reason)
                log.error("node %s is not replaced (%s); its replicas are lost", node, reason)
                return
            raise RecoveryFailed(f"node {node} failed and {reason}; a shard cannot be lost")
        await asyncio.sleep(self.policy.delay(self.restarts))
        try:
            fresh = await self.placement.replace(node)
        except AsyncDBError as exc:
            raise RecoveryFailed(f"cannot replace node {node}: {exc}") from exc
        self.events.record("restart", node=node, replacement=fresh)
        for site in sorted(victims, key=lambda s: s.role != "shard"):  # shards first
            site.generation += 1
            site.nodes = [fresh if n == node else n for n in site.nodes]
            site.node = site.nodes[0]
            try:
                site.ref = await site.respawn(fresh, site.generation)
            except (AsyncDBError, OSError) as exc:
                raise RecoveryFailed(f"cannot re-create {site.role} {site.index} on "
                                     f"{fresh}: {exc}") from exc
            site.changed.set()
            site.changed = asyncio.Event()
            self.events.record("recovered", role=site.role, index=site.index, node=fresh,
                               generation=site.generation)
        seconds = time.perf_counter() - detected
        self.recovery_seconds.append(seconds)
        self.events.record("serving", node=fresh, replaced=node, seconds=round(seconds, 4))
        log.warning("node %s replaced by %s in %.2f s; %s", node, fresh, seconds,
                    ", ".join(f"{s.role} {s.index}" for s in victims))

    async def renew(self, role: str, index: int, reason: str) -> None:
        """Re-create actor (role, index) where it is, as a new incarnation: its node is
        fine, but what it holds can no longer be trusted (`reason`)."""
        site = self.sites[(role, index)]
        site.generation += 1
        try:
            site.ref = await site.respawn(site.node, site.generation)
        except (AsyncDBError, OSError) as exc:
            raise RecoveryFailed(f"cannot re-create {role} {index}: {exc}") from exc
        site.changed.set()
        site.changed = asyncio.Event()
        self.events.record("recovered", role=role, index=index, node=site.node,
                           generation=site.generation, reason=reason)

    async def renew_all(self, role: str, reason: str) -> None:
        """`renew` every actor of `role` still tracked."""
        for site in list(self.sites.values()):
            if site.role == role and self.tracks(role, site.index):
                await self.renew(role, site.index, reason)

    async def close(self) -> None:
        self.closed = True
        for task in list(self._busy):
            task.cancel()
        await asyncio.gather(*self._busy, return_exceptions=True)
