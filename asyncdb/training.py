"""One Downpour run on a cluster: shards, replicas and the coordinator put in place,
and, where nodes can fail, shard checkpoints and recovery around them.

The run's work is a list of units (`downpour.plan_units`). With a checkpoint
directory, each round of checkpoints also saves which units were done before it began
(their pushes are in every shard's checkpoint), so `resume` starts the shards from
their checkpoints and does only the units that were not.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from asyncdb.models import Model

from .actor import ActorRef
from .checkpoint import CheckpointStore
from .coordinator import Coordinator, Progress
from .data import inline_arrays
from .datasets import Dataset
from .downpour import Downpour, Replica, Unit, plan_units
from .errors import CheckpointError, ConfigError
from .modelparallel import spawn_partitioned_replica
from .node import Node
from .optim import UpdateRule
from .params import PartitionedLayout, layout_of
from .placement import InProcess, Placement, TrainingData, split_rows
from .recovery import Checkpointer, Events, Recovery, RestartPolicy, load_shard
from .scheduler import UnitScheduler
from .shard import ParameterShard
from .shard_client import ShardCheckpoint, ShardClient, start_shard

DEFAULT_CHECKPOINT_EVERY = 10.0


@dataclass(frozen=True)
class Options:
    """How one run goes, beyond the model, the data and the algorithm."""

    epochs: float = 1.0
    steps: int | None = None
    seed: int = 0
    eval_every: float = 2.0
    eval_rows: int = 2000
    engine: str = "blocked"
    shard_threads: int | None = None
    on_progress: Progress | None = None
    checkpoint_dir: str | Path | None = None
    checkpoint_every: float | None = None
    max_restarts: int = 10
    resume: str | Path | None = None


class DownpourRun:
    """Puts one Downpour run in place on `placement`'s nodes and runs it."""

    def __init__(self, node: Node, placement: Placement, shards: int, replicas: int,
                 model: Model, data: Dataset, algorithm: Downpour, optimizer: UpdateRule,
                 options: Options, partitions: int = 1) -> None:
        self.node = node
        self.placement = placement
        self.n_shards = shards
        self.n_replicas = replicas
        self.model = model
        self.data = data
        self.algorithm = algorithm
        self.optimizer = optimizer
        self.options = options
        self.partitions = partitions
        self.layout = layout_of(model, partitions)
        self.bounds = self.layout.shard_bounds(shards)
        self.events = Events()
        directory = options.resume or options.checkpoint_dir
        self.store = None if directory is None else CheckpointStore(Path(directory))
        self.client: ShardClient | None = None
        self.recovery: Recovery | None = None
        self.checkpointer: Checkpointer | None = None
        self.spawned: list[ActorRef] = []
        self.coordinator: Coordinator | None = None
        self.stopping = False
        self.versions: dict[int, int] = {}  # shard -> highest version an evaluation saw
        self.partitions_of: dict[int, list[ActorRef]] = {}  # replica -> its actors now
        self.rows: TrainingData | None = None
        self.added: dict[int, list[str]] = {}  # replicas added during the run -> nodes
        self.removed: list[int] = []
        self.finished = False  # the run's work is over: nobody may join it any more
        self.joining = asyncio.Lock()  # held while a replica joins, so rows stay open

    def stop(self) -> None:
        """End the run early once it starts (see `Cluster.stop_training`)."""
        self.stopping = True

    async def stop_now(self) -> None:
        """End the run early: no more units, and the replicas leave the ones they are
        doing at their next exchange with a shard."""
        self.stopping = True
        if self.coordinator is not None:
            self.coordinator.stop()
        if self.client is not None:
            await self.client.stop()

    def plan(self) -> tuple[list[list[int]], list[int]]:
        """Each replica's rows and its number of mini-batches."""
        n, batch = len(self.data.x_train), self.algorithm.batch_size
        slices = split_rows(n, self.n_replicas)
        if any(hi - lo < batch for lo, hi in slices):
            raise ConfigError(f"{n} training rows cannot give each of {self.n_replicas} "
                              f"replicas a batch of {batch}")
        if self.options.steps is None:
            steps = [max(1, math.ceil(self.options.epochs * (hi - lo) / batch))
                     for lo, hi in slices]
        else:
            steps = [math.ceil(self.options.steps / self.n_replicas)] * self.n_replicas
        return slices, steps

    def units(self, slices: list[list[int]], steps: list[int]) -> list[Unit]:
        """The run's units over each replica's rows as it holds them (those a resumed
        run still owes)."""
        units = plan_units(slices, steps, self.algorithm.unit_steps,
                           self.algorithm.warm_start_steps)
        if self.options.resume is not None:
            done = set(self._resumed_state()["done"])
            units = [u for u in units if u.id not in done]
            self.events.record("resumed", directory=str(self.options.resume),
                               units_done=len(done), units_left=len(units))
        return units

    def _resumed_state(self) -> dict[str, Any]:
        assert self.store is not None
        try:
            _arrays, meta = self.store.load("run")
        except CheckpointError as exc:
            raise CheckpointError(f"cannot resume from {self.options.resume}: {exc}") from exc
        if meta.get("planned") is None or meta.get("shards") != self.n_shards:
            raise CheckpointError(f"{self.options.resume} holds a run with "
                                  f"{meta.get('shards')} shards, not {self.n_shards}")
        return meta

    async def execute(self) -> dict[str, Any]:
        """Run every unit; the coordinator's summary, with the final parameters."""
        slices, steps = self.plan()
        options = self.options
        parts = self.partitions
        shard_nodes, slot_nodes = self.placement.place(self.n_shards, self.n_replicas * parts)
        replica_nodes = [slot_nodes[i * parts:(i + 1) * parts] for i in range(self.n_replicas)]
        rows = self.placement.training_data(self.data.x_train, self.data.y_train, slices)
        self.rows = rows
        units = self.units(rows.slices, steps)
        try:
            shards = [await self._spawn_shard(i, shard_nodes[i], self._initial(i))
                      for i in range(self.n_shards)]
            self.client = ShardClient(shards, self.bounds)
            if not isinstance(self.placement, InProcess):
                self.recovery = Recovery(self.placement, self.events,
                                         RestartPolicy(max_restarts=options.max_restarts))
            if self.recovery is not None or self.store is not None:
                every = options.checkpoint_every
                self.checkpointer = Checkpointer(
                    self.client, self.store, every if every is not None
                    else DEFAULT_CHECKPOINT_EVERY, self.events)
            replicas = [await self._spawn_replica(i, replica_nodes[i], rows.specs[i], 0)
                        for i in range(self.n_replicas)]
            self._track(shard_nodes, replica_nodes, replicas, rows.specs)
            remote = not rows.everywhere
            coordinator = await self.node.spawn(Coordinator, config={
                "model": self.model.to_config(), "client": self.client,
                "x_test": self.data.x_test, "y_test": self.data.y_test,
                "x_val": self.data.x_val, "y_val": self.data.y_val,
                "eval_every": options.eval_every, "eval_rows": options.eval_rows,
                "on_progress": options.on_progress, "events": self.events,
                "recovery": self.recovery, "checkpointer": self.checkpointer,
                "rows": (self.data.x_train, self.data.y_train) if remote else None,
                "homes": slices,
                "done": self._done_before(), "partitions": parts,
                "versions": self.versions})
            self.spawned.append(coordinator)
            actor = self.node.actor(coordinator.name)
            assert isinstance(actor, Coordinator)
            self.coordinator = actor
            if self.stopping:
                await self.stop_now()
            result: dict[str, Any] = await coordinator.ask(
                {"op": "run", "replicas": replicas,
                 "units": [[u.id, u.home, u.start, u.stop, u.steps, u.warm] for u in units]},
                timeout=None)
            result["params"] = await self.client.parameters()
        except BaseException:
            if self.coordinator is not None:  # cancelled, or failed: no more units
                self.coordinator.stop()
            raise
        finally:
            async with self.joining:  # a replica joining now finishes first
                self.finished = True
            if self.recovery is not None:
                await self.recovery.close()
            await self._stop_all()
            rows.close()
        units_ = result["units"]
        batch = self.algorithm.batch_size
        units_["examples_lost"] = units_.pop("steps_lost", 0) * batch
        units_["examples_kept"] = units_.pop("steps_kept", 0) * batch
        result["events"] = self.events.entries
        result["checkpoints"] = (None if self.checkpointer is None else
                                 {"taken": self.checkpointer.taken,
                                  "seconds": self.checkpointer.seconds})
        return result

    def _initial(self, index: int) -> ShardCheckpoint:
        lo, hi = self.bounds[index]
        if self.options.resume is not None:
            assert self.store is not None
            saved = load_shard(self.store, index)
            if saved.values.shape != (hi - lo,):
                raise CheckpointError(f"shard {index}'s checkpoint holds {saved.values.shape} "
                                      f"values, not {hi - lo}: not this model")
            return saved
        flat = self.layout.flatten(self.model.init_params(
            np.random.default_rng(self.options.seed)))
        return ShardCheckpoint(flat[lo:hi], {}, 0)

    async def _spawn_shard(self, index: int, node: str, start: ShardCheckpoint) -> ActorRef:
        ref = await self.node.spawn(ParameterShard, node=node, config={
            "index": index, "values": start.values, "optimizer": self.optimizer.to_config(),
            "engine": self.options.engine, "threads": self.options.shard_threads})
        self.spawned.append(ref)
        await start_shard(ref, start)
        return ref

    async def _spawn_replica(self, index: int, nodes: list[str], spec: dict[str, Any],
                             generation: int) -> ActorRef:
        assert self.client is not None
        if isinstance(self.layout, PartitionedLayout):  # one actor per partition
            ref, refs = await spawn_partitioned_replica(
                self.node, index, self.model, nodes, self.client.shards, self.bounds,
                self.layout.block_bounds, {"data": spec, "seed": self.options.seed,
                                           "algorithm": self.algorithm.to_config()},
                generation=generation)
            self.spawned += refs
            self.partitions_of[index] = refs
            return ref
        ref = await self.node.spawn(Replica, node=nodes[0], config={
            "index": index, "model": self.model.to_config(), "shards": self.client.shards,
            "bounds": [list(b) for b in self.bounds], "data": spec,
            "algorithm": self.algorithm.to_config(), "seed": self.options.seed,
            "generation": generation})
        self.spawned.append(ref)
        return ref

    def _done_before(self) -> list[int]:
        return [] if self.options.resume is None else list(self._resumed_state()["done"])

    def _track(self, shard_nodes: list[str], replica_nodes: list[list[str]],
               replicas: list[ActorRef], specs: list[dict[str, Any]]) -> None:
        """Tell recovery how to re-create each shard and replica."""
        recovery, client = self.recovery, self.client
        if recovery is None or client is None:
            return

        def shard(index: int) -> Any:
            async def respawn(node: str, generation: int) -> ActorRef:
                assert self.checkpointer is not None and recovery is not None
                saved = self.checkpointer.saved(index)
                ref = await self._spawn_shard(index, node, saved)
                client.replace(index, ref)
                fences = {s.index: s.generation for s in recovery.sites.values()
                          if s.role == "replica" and s.generation}
                if fences:
                    await client.fence(fences, index)
                seen = self.versions.get(index, 0)
                self.events.record("restored", role="shard", index=index,
                                   version=saved.version,
                                   updates_lost=max(0, seen - saved.version))
                if self.partitions > 1:  # their partitions aborted in step: start afresh
                    await recovery.renew_all("replica", f"shard {index} was re-created")
                return ref
            return respawn

        for i, ref in enumerate(client.shards):
            recovery.track("shard", i, shard_nodes[i], ref, shard(i))
        for i, ref in enumerate(replicas):  # a partitioned one is re-created whole
            recovery.track("replica", i, replica_nodes[i][0], ref, self._respawn(i, specs[i]),
                           replica_nodes[i])

    def _respawn(self, index: int, spec: dict[str, Any]) -> Any:
        """How recovery re-creates replica `index`: fenced first, then spawned anew."""
        async def respawn(node: str, generation: int) -> ActorRef:
            assert self.client is not None and self.recovery is not None
            await self.client.fence({index: generation})  # the old incarnation is refused
            nodes = self.recovery.current("replica", index).nodes  # the failed one replaced
            for ref in self.partitions_of.pop(index, []):  # a partitioned one's survivors
                await self._stop_actor(ref)
            return await self._spawn_replica(index, nodes, spec, generation)
        return respawn

    # -- elastic replicas --------------------------------------------------------

    def check_elastic(self, peer: bool = False) -> None:
        """`ConfigError` unless replicas can join this run now (from a new peer)."""
        self._scheduler()
        if peer and self.partitions > 1:  # a unit's inline rows reach one partition only
            raise ConfigError("a peer added during a run takes whole replicas; with "
                              "partitions, add replicas on the peers already connected")

    def _scheduler(self) -> UnitScheduler:
        coordinator = self.coordinator
        if coordinator is None or coordinator.scheduler is None or self.rows is None \
                or self.stopping or self.finished:
            raise ConfigError("replicas can be added or removed only while a run is "
                              "under way (call it while cluster.train runs)")
        return coordinator.scheduler

    async def add_replicas(self, n: int, node: str | None = None) -> list[int]:
        """`n` more replicas, on `node` or each on a node of its own where the
        placement makes nodes (with partitions, a node per partition); they take units
        from the run's queue at once. Their indices."""
        if n < 1:
            raise ConfigError(f"add_replicas needs n >= 1, got {n}")
        scheduler = self._scheduler()
        assert self.rows is not None
        if self.rows.everywhere:
            spec = self.rows.specs[0]  # every replica's spec holds every row
        elif node is None:
            raise ConfigError(f"on a {self.placement.name} placement, add peers with "
                              "cluster.add_peer(url)")
        else:  # no rows of its own: each unit it does carries its rows
            rows = slice(0, self.algorithm.batch_size)
            spec = inline_arrays({"x": self.data.x_train[rows], "y": self.data.y_train[rows]})
        added = []
        for _ in range(n):
            async with self.joining:
                self._scheduler()  # the run may have ended meanwhile
                # a node per partition (all on `node`, a peer, when given)
                nodes = [node or await self.placement.add_node()
                         for _ in range(self.partitions)]
                index = len(scheduler.refs)
                ref = await self._spawn_replica(index, nodes, spec, 0)
                if self.recovery is not None:
                    self.recovery.track("replica", index, nodes[0], ref,
                                        self._respawn(index, spec), nodes)
                assert scheduler.add(ref) == index
                self.added[index] = nodes
                self.events.record("joined", role="replica", index=index, node=nodes[0],
                                   nodes=nodes)
                added.append(index)
        return added

    async def remove_replicas(self, n: int) -> list[int]:
        """Take the `n` newest live replicas out of the run: each finishes the unit it
        is doing (nothing is lost or counted twice), then stops. Their indices."""
        scheduler = self._scheduler()
        alive = scheduler.alive()
        if not 1 <= n < len(alive):
            raise ConfigError(f"cannot remove {n} of the {len(alive)} live replicas: "
                              "at least one must stay")
        leaving = alive[-n:]
        for index in leaving:
            ref = scheduler.ref(index)
            if self.recovery is not None:
                self.recovery.forget("replica", index)
            await scheduler.retire(index)
            await self._stop_actor(ref)
            self.removed.append(index)
            self.events.record("left", role="replica", index=index, node=ref.node_id,
                               units_left=scheduler.units_left())
        return leaving

    async def _stop_all(self) -> None:
        for ref in reversed(self.spawned):
            await self._stop_actor(ref)

    async def _stop_actor(self, ref: ActorRef) -> None:
        try:
            await self.node.ref(ref.node_id, "_system").ask(
                {"op": "stop", "name": ref.name}, timeout=10)
        except Exception:  # a node that died with its actors has nothing to stop
            return
