"""Placement and the training entry point.

`Cluster.inproc` puts every actor in the caller's event loop; `Cluster.local` starts
one node process per shard and per replica on this host, linked by shared-memory rings;
`Cluster.connect` uses nodes on other hosts (`asyncdb serve`) over websockets. The same
`await cluster.train(...)` runs on all three.
"""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits

from asyncdb.models import Model
from asyncdb.transport import ws

from .coordinator import Progress
from .datasets import Dataset
from .downpour import Downpour
from .errors import ConfigError
from .node import Node
from .optim import Adagrad, UpdateRule
from .params import Layout, layout_of, tensors_of
from .placement import InProcess, LocalProcesses, Placement, RemotePeers
from .process import LocalNodes
from .recovery import Recovery
from .runs import Run
from .sandblaster import Sandblaster
from .sandblaster_run import SandblasterRun
from .shard_client import ShardClient
from .training import DownpourRun, Options


class Cluster:
    """Where shards and replicas run. Use `async with Cluster.local(...) as cluster:`."""

    def __init__(self, placement: Placement, shards: int, replicas: int, *,
                 partitions: int = 1, ask_timeout: float | None = 120.0) -> None:
        if shards < 1 or replicas < 1 or partitions < 1:
            raise ConfigError("a cluster needs at least one shard, one replica and one "
                              "partition per replica")
        if shards < partitions:
            raise ConfigError(f"{shards} shards for {partitions} partitions: each partition "
                              "needs shards of its own (at least one shard per partition)")
        self.placement = placement
        self.shards = shards
        self.replicas = replicas
        self.partitions = partitions
        self.ask_timeout = ask_timeout
        self.node: Node | None = None
        self._stop_requested = False
        self._started = False
        self._live: tuple[Layout, ShardClient] | None = None  # for parameters()
        self._run: DownpourRun | None = None  # a Downpour run in progress
        self._sandblaster: SandblasterRun | None = None  # a Sandblaster run in progress

    @classmethod
    def inproc(cls, shards: int = 1, replicas: int = 1, *, partitions: int = 1,
               ask_timeout: float | None = 120.0) -> Cluster:
        """Every actor in the caller's event loop (embedding, tests)."""
        return cls(InProcess(), shards, replicas, partitions=partitions,
                   ask_timeout=ask_timeout)

    @classmethod
    def local(cls, shards: int = 2, replicas: int = 2, *, partitions: int = 1,
              colocate: bool = False, ring_bytes: int | None = None,
              ask_timeout: float | None = 120.0, liveness: float | None = 10.0) -> Cluster:
        """One node process per shard and per replica on this host, shm rings between
        (with `partitions`, one process per partition of each replica); with
        `colocate=True`, no shard processes: shard i lives in the i-th replica (or
        partition) process, round robin (fewer processes than cores to share). A node
        process that dies is noticed at once; one stopped (SIGSTOP) for `liveness`
        seconds is taken as frozen and killed; either way it is restarted and its
        actors re-created (see `train`)."""
        return cls(LocalProcesses(colocate, ring_bytes, liveness), shards, replicas,
                   partitions=partitions, ask_timeout=ask_timeout)

    @classmethod
    def connect(cls, peers: Sequence[str], secret: bytes | str, *, shards: int | None = None,
                replicas: int | None = None, partitions: int = 1,
                ssl_context: ssl.SSLContext | None = None,
                heartbeat: float = ws.DEFAULT_HEARTBEAT,
                ask_timeout: float | None = 120.0) -> Cluster:
        """Nodes on other hosts, started with `asyncdb serve`, reached over websockets
        (ws:// or wss://). Shards and replicas are spread over the peers in turn; each
        replica's slice of the training data is streamed to it from the driver. A
        replica's partitions go to consecutive peers in turn, like replicas. A peer
        silent for `heartbeat` seconds (its pulse thread answers even while its event
        loop is busy) is lost, and its actors re-created on the others."""
        key = secret.encode() if isinstance(secret, str) else secret
        placement = RemotePeers(peers, key, ssl_context=ssl_context, heartbeat=heartbeat)
        return cls(placement, shards or max(len(peers), partitions),
                   replicas or len(peers), partitions=partitions, ask_timeout=ask_timeout)

    @property
    def peer_ids(self) -> list[str]:
        """The names of the connected `asyncdb serve` nodes (empty on this host)."""
        placement = self.placement
        return list(placement.peer_ids) if isinstance(placement, RemotePeers) else []

    @property
    def nodes(self) -> LocalNodes | None:
        """The node processes on this host, if the placement started any."""
        placement = self.placement
        return placement.nodes if isinstance(placement, LocalProcesses) else None

    @property
    def slots(self) -> int:
        """Replica processes (or peers' turns): one per partition of each replica."""
        return self.replicas * self.partitions

    def describe(self) -> list[dict[str, Any]]:
        """Where every actor runs: one {role, index, node, pid, host, alive} per
        coordinator, shard and replica (with partitions, per replica partition: role
        "partition", index "R.P"), empty before the cluster has started."""
        node = self.node
        if node is None or node.closed or not self._started:
            return []
        shard_nodes, slot_nodes = self.placement.place(self.shards, self.slots)
        recovery = self.recovery
        if recovery is not None:  # where failed actors were re-created
            shard_nodes = [recovery.current("shard", i).node if recovery.tracks("shard", i)
                           else n for i, n in enumerate(shard_nodes)]
            parts = self.partitions
            slot_nodes = [recovery.current("replica", i // parts).nodes[i % parts]
                          if recovery.tracks("replica", i // parts) else n
                          for i, n in enumerate(slot_nodes)]
        live = {node.id, *node.peers()}
        places: list[tuple[str, int | str, str]] = [("coordinator", 0, node.id)]
        places += [("shard", i, n) for i, n in enumerate(shard_nodes)]
        parts = self.partitions
        removed = [] if self._run is None else self._run.removed
        nodes = {i: slot_nodes[i * parts:(i + 1) * parts] for i in range(self.replicas)}
        if self._run is not None:  # added during the run
            nodes.update({i: recovery.current("replica", i).nodes
                          if recovery is not None and recovery.tracks("replica", i) else n
                          for i, n in self._run.added.items()})
        for i, where in nodes.items():
            if i in removed:
                continue
            if parts == 1:
                places.append(("replica", i, where[0]))
            else:
                places += [("partition", f"{i}.{p}", n) for p, n in enumerate(where)]
        return [{"role": role, "index": i, "node": n, "pid": self.placement.pid(n),
                 "host": self.placement.host(n), "alive": n in live}
                for role, i, n in places]

    async def __aenter__(self) -> Cluster:
        self.node = Node(self.placement.driver_name(), ask_timeout=self.ask_timeout)
        try:
            await self.placement.start(self.node, self.shards, self.slots)
        except BaseException:
            await self.close()
            raise
        self._started = True
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self.placement.close()
        if self.node is not None:
            await self.node.close()

    async def train(self, model: Model, data: Dataset, *,
                    algorithm: Downpour | Sandblaster | None = None,
                    optimizer: UpdateRule | None = None,
                    epochs: float | None = 1.0, steps: int | None = None, seed: int = 0,
                    eval_every: float = 2.0, eval_rows: int = 2000,
                    engine: str = "blocked", shard_threads: int | None = None,
                    on_progress: Progress | None = None,
                    checkpoint_dir: str | Path | None = None,
                    checkpoint_every: float | None = None, max_restarts: int = 10,
                    resume: str | Path | None = None) -> Run:
        """Train `model` on `data` with Downpour SGD; return the run's history.

        `epochs`: passes over the training data, all replicas together (fractions
        allowed); `steps`: total mini-batches across replicas, instead of epochs.
        Where nodes can fail (`local`, `connect`), the shards are checkpointed every
        `checkpoint_every` seconds (default 10), to `checkpoint_dir` if given, and a
        failed node is replaced up to `max_restarts` times; `resume` continues the run
        whose checkpoints are in that directory (same model, data and settings).
        """
        node = self.node
        if node is None:
            raise ConfigError("use the cluster inside `async with`")
        if isinstance(algorithm, Sandblaster):
            return await self._train_sandblaster(
                model, data, algorithm, epochs, steps, optimizer, seed, on_progress,
                {"checkpoint_dir": checkpoint_dir, "checkpoint_every": checkpoint_every,
                 "max_restarts": max_restarts, "resume": resume})
        epochs = 1.0 if epochs is None else epochs
        algorithm = algorithm or Downpour()
        optimizer = optimizer or Adagrad()
        check_fit(model, data)
        placement = self.placement
        if shard_threads is None:
            shard_threads = placement.shard_threads(self.shards, self.slots)
        options = Options(epochs=epochs, steps=steps, seed=seed, eval_every=eval_every,
                          eval_rows=eval_rows, engine=engine, shard_threads=shard_threads,
                          on_progress=on_progress, checkpoint_dir=checkpoint_dir,
                          checkpoint_every=checkpoint_every, max_restarts=max_restarts,
                          resume=resume)
        run = DownpourRun(node, placement, self.shards, self.replicas, model, data,
                          algorithm, optimizer, options, partitions=self.partitions)
        if self._stop_requested:
            run.stop()
        self._run = run
        # in-process replicas compute in this process: one BLAS thread, as in node
        # processes, and only while the run lasts (the limit acts on the whole process)
        blas = (threadpool_limits(1) if isinstance(placement, InProcess)
                else contextlib.nullcontext())
        try:
            with blas:
                result = await run.execute()
        finally:
            self._run = None
        stopped, self._stop_requested = self._stop_requested, False
        layout = run.layout
        return Run(
            history=result["history"], params=dict(layout.tensors(result["params"])),
            replicas={int(k): v for k, v in result["replicas"].items()},
            shards=result["shards"], lost=result["lost"], seconds=result["seconds"],
            events=result["events"], units=result["units"],
            checkpoints=result.get("checkpoints"),
            config={"mode": placement.name, "shards": self.shards, "replicas": self.replicas,
                    "partitions": self.partitions,
                    "model": model.to_config(), "algorithm": algorithm.to_config(),
                    "optimizer": optimizer.to_config(), "epochs": epochs, "steps": steps,
                    "seed": seed, "eval_every": eval_every, "eval_rows": eval_rows,
                    "engine": engine, "shard_threads": shard_threads, "data": data.name,
                    "features": data.n_features, "classes": data.n_classes,
                    "rows": {"train": len(data.x_train), "validation": len(data.x_val),
                             "test": len(data.x_test)},
                    "checkpoint_dir": None if checkpoint_dir is None else str(checkpoint_dir),
                    "checkpoint_every": checkpoint_every, "max_restarts": max_restarts,
                    "resume": None if resume is None else str(resume)},
            preprocessing=data.preprocessing, stopped=stopped)

    async def stop_training(self) -> None:
        """Ask the run in progress to end early: no more units are handed out, replicas
        leave the units they are doing at their next exchange with a shard (within
        milliseconds unless rate limits hold them back), the final evaluation is made as
        usual, and `train` returns a `Run` with `stopped` set. A run that has not
        started yet stops as soon as it starts."""
        self._stop_requested = True
        if self._run is not None:
            await self._run.stop_now()
        elif self._live is not None:
            await self._live[1].stop()

    async def _train_sandblaster(self, model: Model, data: Dataset, algorithm: Sandblaster,
                                 epochs: float | None, steps: int | None,
                                 optimizer: UpdateRule | None, seed: int,
                                 on_progress: Progress | None,
                                 faults: dict[str, Any]) -> Run:
        """Sandblaster L-BFGS: counts iterations (`algorithm.iterations`), not epochs.
        `faults`: checkpoint_dir, checkpoint_every, max_restarts, resume (as `train`;
        checkpoint rounds are taken at iteration boundaries)."""
        if epochs is not None or steps is not None or optimizer is not None:
            raise ConfigError("Sandblaster counts iterations, not epochs or steps, and has "
                              "no update rule: pass epochs=None and no steps or optimizer")
        assert self.node is not None
        layout = layout_of(model, self.partitions)

        def live(client: ShardClient) -> None:
            self._live = (layout, client)

        run = SandblasterRun(self.node, self.placement, self.shards, self.replicas, model,
                             data, algorithm, seed=seed, on_progress=on_progress,
                             on_shards=live, partitions=self.partitions, **faults)
        self._sandblaster = run
        try:
            result = await run.execute()
        finally:
            self._live = None
            self._sandblaster = None
        return Run(
            history=result["history"], params=tensors_of(layout, np.array(result["params"])),
            replicas={int(k): v for k, v in result["replicas"].items()},
            shards=result["shards"], lost=result["lost"], seconds=result["seconds"],
            events=result["events"], checkpoints=result["checkpoints"],
            config={"mode": self.placement.name, "shards": self.shards,
                    "replicas": self.replicas, "partitions": self.partitions,
                    "model": model.to_config(),
                    "algorithm": {"name": "sandblaster", **algorithm.to_config()},
                    "seed": seed, "data": data.name, "features": data.n_features,
                    "classes": data.n_classes,
                    **{k: str(v) if isinstance(v, Path) else v for k, v in faults.items()}},
            preprocessing=data.preprocessing)

    async def add_replicas(self, n: int = 1) -> list[int]:
        """Add `n` replicas to the Downpour run in progress (call it while `train`
        runs, from another task): each gets a node process of its own under
        `Cluster.local` (one per partition with `partitions`; the driver's node
        in-process) and takes units from the run's queue at once. Returns their
        indices; `run.events` records them as "joined". `ConfigError` without a run in
        progress, or on `Cluster.connect` (use `add_peer`)."""
        if self._run is None:
            raise ConfigError("add_replicas needs a Downpour run in progress")
        return await self._run.add_replicas(n)

    async def add_peer(self, url: str, replicas: int = 1) -> list[int]:
        """Under `Cluster.connect`, during a Downpour run: connect the `asyncdb serve`
        peer at `url` (same secret), link it to every live peer and start `replicas`
        replicas there, which take units from the run's queue at once (each unit they
        do carries its rows). Returns their indices. Not for partitioned runs."""
        placement = self.placement
        if not isinstance(placement, RemotePeers):
            raise ConfigError("add_peer is for Cluster.connect; use add_replicas here")
        if self._run is None:
            raise ConfigError("add_peer needs a Downpour run in progress")
        run = self._run
        run.check_elastic(peer=True)
        peer = await placement.add_peer(url)
        return await run.add_replicas(replicas, node=peer)

    async def remove_replicas(self, n: int = 1) -> list[int]:
        """Take the `n` newest live replicas out of the run in progress: each finishes
        the unit it is doing, then stops, so nothing is lost or counted twice; at least
        one replica stays. Returns their indices ("left" in `run.events`)."""
        if self._run is None:
            raise ConfigError("remove_replicas needs a Downpour run in progress")
        return await self._run.remove_replicas(n)

    @property
    def recovery(self) -> Recovery | None:
        """The recovery of the run in progress (its events, its sites), if any."""
        if self._sandblaster is not None:
            return self._sandblaster.recovery
        return None if self._run is None else self._run.recovery

    async def parameters(self) -> dict[str, np.ndarray]:
        """The current parameters of the run in progress, fetched from its shards."""
        run = self._run
        if run is not None and run.client is not None:
            return run.layout.tensors(await run.client.parameters())
        if self._live is None:
            raise ConfigError("no training run is in progress")
        layout, client = self._live
        return layout.tensors(await client.parameters())


def check_fit(model: Model, data: Dataset) -> None:
    """Refuse, before anything is spawned, a model that does not take the data's rows
    or cannot output every class."""
    sizes = getattr(model, "sizes", None)
    if isinstance(sizes, list | tuple) and sizes:
        if int(sizes[0]) != data.n_features:
            raise ConfigError(f"{model} takes {sizes[0]} features, but {data.name} has "
                              f"{data.n_features}")
        if int(sizes[-1]) < data.n_classes:
            raise ConfigError(f"{model} has {sizes[-1]} outputs, but {data.name} has "
                              f"{data.n_classes} classes")
    params = model.init_params(np.random.default_rng(0))
    rows = min(2, len(data.x_train))
    labels = np.full(rows, data.n_classes - 1, np.int64)
    try:
        model.loss_and_grad(params, data.x_train[:rows], labels)
    except (ValueError, IndexError) as exc:
        raise ConfigError(f"{model} does not fit {data}: {exc}") from exc
