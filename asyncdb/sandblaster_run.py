"""One Sandblaster run on a cluster: shards, replicas, evaluator and coordinator put in
place, and, where nodes can fail or a checkpoint directory is given, checkpoint
rounds and recovery around them.

A round (taken by the coordinator at an iteration boundary, `lbfgs.py`) holds every
shard's slice and L-BFGS vectors and the coordinator's scalars. Until the first round
the shards' initial values stand in for one. A failed shard is re-created from the
latest round and the run goes back to it; a failed replica is re-created and takes
portions again; `resume` starts the shards from the newest complete round on disk and
the coordinator from its point.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import numpy as np

from asyncdb.models import Model

from .actor import ActorRef
from .checkpoint import CheckpointStore
from .datasets import Dataset
from .downpour import Downpour
from .errors import CheckpointError
from .lbfgs import SandblasterCoordinator
from .modelparallel import spawn_partitioned_replica
from .node import Node
from .optim import SGD
from .params import PartitionedLayout, layout_of, spans_of
from .passes import LOST
from .placement import InProcess, Placement
from .recovery import Checkpointer, Events, Recovery, RestartPolicy, load_shard
from .sandblaster import Evaluator, Sandblaster, SandblasterReplica
from .sandblaster_partition import SandblasterPartition
from .shard import ParameterShard
from .shard_client import ShardCheckpoint, ShardClient, start_shard
from .system import SYSTEM

DEFAULT_CHECKPOINT_EVERY = 10.0


class SandblasterRun:
    """Puts one Sandblaster run in place on `placement`'s nodes and runs it. Every
    replica receives the whole training set once (any portion can go to it). With
    `partitions` > 1 each replica is that many `SandblasterPartition`s, each talking to
    the shards of its own block. `on_shards(client)` gets a client of the shards once
    they are up (re-created shards are swapped into it)."""

    def __init__(self, node: Node, placement: Placement, shards: int, replicas: int,
                 model: Model, data: Dataset, algorithm: Sandblaster, *, seed: int = 0,
                 on_progress: Any = None, on_shards: Any = None, partitions: int = 1,
                 checkpoint_dir: str | Path | None = None,
                 checkpoint_every: float | None = None, max_restarts: int = 10,
                 resume: str | Path | None = None) -> None:
        self.node, self.placement = node, placement
        self.n_shards, self.n_replicas, self.partitions = shards, replicas, partitions
        self.model, self.data, self.algorithm = model, data, algorithm
        self.seed, self.on_progress, self.on_shards = seed, on_progress, on_shards
        self.layout = layout_of(model, partitions)
        self.bounds = [list(b) for b in self.layout.shard_bounds(shards)]
        self.events = Events()
        self.resume = resume
        directory = resume or checkpoint_dir
        self.store = None if directory is None else CheckpointStore(Path(directory))
        self.checkpoint_every = (DEFAULT_CHECKPOINT_EVERY if checkpoint_every is None
                                 else checkpoint_every)
        self.recovery: Recovery | None = None
        if not isinstance(placement, InProcess):
            self.recovery = Recovery(placement, self.events,
                                     RestartPolicy(max_restarts=max_restarts))
        self.spawned: list[ActorRef] = []
        self.clients: list[ShardClient] = []  # every client of the shards: swapped alike
        self.partitions_of: dict[int, list[ActorRef]] = {}

    async def execute(self) -> dict[str, Any]:
        """Run it; what `Run` is built from."""
        data, algorithm = self.data, self.algorithm
        rows = len(data.x_train)
        algorithm.check(self.model, rows, self.n_replicas)
        resumed, start = self._starting_round()
        shard_nodes, slot_nodes = self.placement.place(self.n_shards,
                                                       self.n_replicas * self.partitions)
        parts = self.partitions
        replica_nodes = [slot_nodes[i * parts:(i + 1) * parts] for i in range(self.n_replicas)]
        training = self.placement.training_data(data.x_train, data.y_train,
                                                [[0, rows]] * self.n_replicas)
        try:
            refs = [await self._spawn_shard(i, shard_nodes[i], start[i])
                    for i in range(self.n_shards)]
            coordinator_client, view = ShardClient(refs, self.bounds), ShardClient(refs,
                                                                                  self.bounds)
            self.clients = [coordinator_client, view]
            if self.on_shards is not None:
                self.on_shards(view)
            checkpointer = None
            if self.recovery is not None or self.store is not None:
                checkpointer = Checkpointer(view, self.store, None, self.events)
                checkpointer.latest = dict(enumerate(start))  # until the first round
                checkpointer.round = 0 if resumed is None else int(resumed["round"])
            replicas = [await self._spawn_replica(i, replica_nodes[i], training.specs[i], 0)
                        for i in range(self.n_replicas)]
            self._track(shard_nodes, replica_nodes, replicas, training.specs, checkpointer)
            evaluator = await self._spawn_local(Evaluator, {
                "model": self.model.to_config(), "client": view,
                "x_test": data.x_test, "y_test": data.y_test, "partitions": parts})
            coordinator = await self._spawn_local(SandblasterCoordinator, {
                "client": coordinator_client, "rows": rows,
                "algorithm": algorithm.to_config(), "l2": self.model.l2,
                "on_progress": self.on_progress, "recovery": self.recovery,
                "checkpointer": checkpointer, "checkpoint_every": self.checkpoint_every,
                "events": self.events, "resumed": resumed})
            result: dict[str, Any] = await coordinator.ask(
                {"op": "run", "replicas": replicas, "evaluator": evaluator}, timeout=None)
            result["params"] = await evaluator.ask({"op": "params"})
            result["shards"] = await view.stats()
            result["replicas"] = await _counts(result.pop("live_refs"))
        finally:
            if self.recovery is not None:
                await self.recovery.close()
            for ref in reversed(self.spawned):
                with contextlib.suppress(Exception):  # a node that died took its actors
                    await self.node.ref(ref.node_id, SYSTEM).ask(
                        {"op": "stop", "name": ref.name}, timeout=10)
            training.close()
        result["events"] = self.events.entries
        result["checkpoints"] = None if checkpointer is None else {
            "taken": checkpointer.taken, "seconds": checkpointer.seconds}
        return result

    def _starting_round(self) -> tuple[dict[str, Any] | None, list[ShardCheckpoint]]:
        """The coordinator's state and every shard's start: a resumed run's newest
        complete round, or the initial values."""
        if self.resume is None:
            tensors = self.model.init_params(np.random.default_rng(self.seed))
            flat = self.layout.flatten(tensors, dtype=next(iter(tensors.values())).dtype)
            return None, [ShardCheckpoint(flat[lo:hi], {}, 0) for lo, hi in self.bounds]
        assert self.store is not None
        try:
            _arrays, state = self.store.load("run")
        except CheckpointError as exc:
            raise CheckpointError(f"cannot resume from {self.resume}: {exc}") from exc
        if state.get("algorithm") != "sandblaster" or state.get("shards") != self.n_shards \
                or state.get("rows") != len(self.data.x_train):
            raise CheckpointError(
                f"{self.resume} holds a {state.get('algorithm', 'downpour')} run with "
                f"{state.get('shards')} shards over {state.get('rows')} rows, not this "
                f"Sandblaster run of {self.n_shards} shards over {len(self.data.x_train)}")
        start = [load_shard(self.store, i, state["round"]) for i in range(self.n_shards)]
        for i, (lo, hi) in enumerate(self.bounds):
            if start[i].values.shape != (hi - lo,):
                raise CheckpointError(f"shard {i}'s checkpoint holds {start[i].values.shape} "
                                      f"values, not {hi - lo}: not this model")
        self.events.record("resumed", directory=str(self.resume),
                           iteration=int(state["iteration"]), round=int(state["round"]))
        return state, start

    async def _spawn_local(self, kind: Any, config: dict[str, Any]) -> ActorRef:
        ref = await self.node.spawn(kind, config=config)
        self.spawned.append(ref)
        return ref

    async def _spawn_shard(self, index: int, node: str, start: ShardCheckpoint) -> ActorRef:
        lo, hi = self.bounds[index]
        local = [[max(a, lo) - lo, min(b, hi) - lo]
                 for a, b in spans_of(self.layout, self.model.penalized())
                 if min(b, hi) > max(a, lo)]
        ref = await self.node.spawn(ParameterShard, node=node, config={
            "index": index, "values": start.values, "optimizer": SGD().to_config(),
            "threads": 1, "lbfgs": {"memory": self.algorithm.memory, "penalized": local}})
        self.spawned.append(ref)
        await start_shard(ref, start)
        return ref

    async def _spawn_replica(self, index: int, nodes: list[str], spec: dict[str, Any],
                             generation: int) -> ActorRef:
        algorithm = self.algorithm
        slowdown = algorithm.slowdown[index] if index < len(algorithm.slowdown) else 1.0
        shards = self.clients[0].shards
        if isinstance(self.layout, PartitionedLayout):
            ref, refs = await spawn_partitioned_replica(
                self.node, index, self.model, nodes, shards,
                [(lo, hi) for lo, hi in self.bounds], self.layout.block_bounds,
                {"data": spec, "slowdown": slowdown, "algorithm":
                 Downpour(batch_size=algorithm.portion_size).to_config()},
                SandblasterPartition, generation=generation)
            self.spawned += refs
            self.partitions_of[index] = refs
            return ref
        ref = await self.node.spawn(SandblasterReplica, node=nodes[0], config={
            "index": index, "model": self.model.to_config(), "shards": shards,
            "bounds": self.bounds, "data": spec, "slowdown": slowdown})
        self.spawned.append(ref)
        return ref

    def _track(self, shard_nodes: list[str], replica_nodes: list[list[str]],
               replicas: list[ActorRef], specs: list[dict[str, Any]],
               checkpointer: Checkpointer | None) -> None:
        """Tell recovery how to re-create each shard (from the latest round) and each
        replica (a new incarnation, whole)."""
        recovery = self.recovery
        if recovery is None or checkpointer is None:
            return

        def shard(index: int) -> Any:
            async def respawn(node: str, generation: int) -> ActorRef:
                saved = checkpointer.saved(index)
                ref = await self._spawn_shard(index, node, saved)
                for client in self.clients:
                    client.replace(index, ref)
                self.events.record("restored", role="shard", index=index,
                                   version=saved.version, round=checkpointer.round)
                if self.partitions > 1:  # partitions may have aborted in step
                    await recovery.renew_all("replica", f"shard {index} was re-created")
                return ref
            return respawn

        def replica(index: int) -> Any:
            async def respawn(node: str, generation: int) -> ActorRef:
                nodes = recovery.current("replica", index).nodes  # the failed one replaced
                for ref in self.partitions_of.pop(index, []):  # a partitioned one's others
                    with contextlib.suppress(Exception):
                        await self.node.ref(ref.node_id, SYSTEM).ask(
                            {"op": "stop", "name": ref.name}, timeout=10)
                return await self._spawn_replica(index, nodes, specs[index], generation)
            return respawn

        for i, ref in enumerate(self.clients[0].shards):
            recovery.track("shard", i, shard_nodes[i], ref, shard(i))
        for i, ref in enumerate(replicas):
            recovery.track("replica", i, replica_nodes[i][0], ref, replica(i),
                           replica_nodes[i])


async def _counts(replicas: list[tuple[int, ActorRef]]) -> dict[int, Any]:
    """Each live replica's counters (of its current incarnation); one that failed as
    the run ended is left out."""
    counts = {}
    for i, ref in replicas:
        with contextlib.suppress(*LOST):
            counts[int(i)] = await ref.ask({"op": "counts"})
    return counts
