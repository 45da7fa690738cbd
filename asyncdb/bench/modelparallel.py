"""`asyncdb bench modelparallel`: one replica in 1 and in 2 partitions.

For each width H of a 784-H-H-10 MLP (batch 256): the time of a step (forward,
backward and the exchanges between partitions, no fetch or push) of one replica as one
partition in one node process with one BLAS thread, as two partitions in two node
processes with one BLAS thread each, and as one partition in one process with two BLAS
threads (the reference: what the same two cores give a single process). `speedup` is
the one-partition time over the two-partition time; `wait_share` the share of the
two-partition step its partitions spent waiting for each other. `train_speedup` is the
same ratio for Downpour steps that also fetch and push every step (shards in the
driver's process). Then the same for a locally connected model, whose partitions
exchange only the activations at their boundary. The three are up at once and
measured in rotating turns (medians of `repeat` rounds), so noise hits each alike.
"""

from __future__ import annotations

import contextlib
import itertools
import statistics
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from asyncdb.models import MLP, LocallyConnected1D, Model

from ..data import SharedArrays
from ..downpour import Downpour
from ..modelparallel import ReplicaClient, spawn_partitioned_replica
from ..node import Node
from ..optim import SGD
from ..params import PartitionedLayout
from ..process import LocalNodes
from ..system import SYSTEM


@dataclass(frozen=True)
class Settings:
    hidden: tuple[int, ...] = (256, 1024, 4096, 8192)
    batch_size: int = 256
    rows: int = 4096
    features: int = 784
    classes: int = 10
    local_width: int = 1024
    local_channels: tuple[int, ...] = (1, 32, 32)
    local_window: int = 9


def steps_for(warm_up_step: float, seconds: float = 1.5) -> int:
    """Enough steps for about `seconds` of work, at least 3 and at most 50."""
    return max(3, min(50, int(seconds / max(warm_up_step, 1e-6))))


class Setup:
    """One replica of `model` in `parts` partitions, each in its own node process with
    `threads` BLAS threads, and its shards (in the driver's process)."""

    def __init__(self, node: Node, model: Model, parts: int, threads: int,
                 data: SharedArrays, settings: Settings) -> None:
        self.node, self.model, self.parts, self.threads = node, model, parts, threads
        self.data, self.settings = data, settings
        self.runs: list[dict[str, Any]] = []
        self.spawned: list[Any] = []

    async def start(self, stack: contextlib.AsyncExitStack) -> ReplicaClient:
        layout = PartitionedLayout(self.model, self.parts)
        flat = layout.flatten(self.model.init_params(np.random.default_rng(0)))
        bounds = layout.shard_bounds(self.parts)
        nodes = await stack.enter_async_context(
            LocalNodes(self.node, self.parts, threads_per_node=self.threads))
        stack.push_async_callback(self.stop)
        self.spawned = [await self.node.spawn("asyncdb.ParameterShard", config={
            "index": i, "values": flat[lo:hi], "optimizer": SGD(1e-4).to_config()})
            for i, (lo, hi) in enumerate(bounds)]
        algorithm = Downpour(batch_size=self.settings.batch_size)
        replica, refs = await spawn_partitioned_replica(
            self.node, 0, self.model, nodes.ids, self.spawned, bounds, layout.block_bounds,
            {"data": self.data.spec, "algorithm": algorithm.to_config()})
        self.spawned += refs
        self.client = ReplicaClient(replica)
        await self.client.compute(0, self.settings.rows, 2)  # buffers, page faults
        return self.client

    async def stop(self) -> None:
        for ref in reversed(self.spawned):
            await self.node.ref(ref.node_id, SYSTEM).ask({"op": "stop", "name": ref.name})

    def summary(self, steps: int, trained: dict[str, Any]) -> dict[str, Any]:
        best = min(self.runs, key=lambda r: r["seconds"])
        waits = [p["exchange_wait_s"] for p in best["partitions"]]
        return {"step_s": statistics.median(r["seconds"] for r in self.runs) / steps,
                "exchange_bytes_per_step": best["exchange_bytes"] // steps,
                "wait_share": statistics.mean(waits) / best["seconds"],
                "train_step_s": trained["seconds"] / trained["steps"]}


async def compare(node: Node, model: Model, data: SharedArrays, settings: Settings,
                  repeat: int) -> dict[str, Any]:
    """One partition, two, and the two-thread reference, all up at once and measured
    in turns (the order rotating each round), so the machine's noise and its memory
    state hit each alike; medians of `repeat` rounds."""
    setups = [Setup(node, model, parts, threads, data, settings)
              for parts, threads in ((1, 1), (2, 1), (1, 2))]
    async with contextlib.AsyncExitStack() as stack:
        for setup in setups:
            await setup.start(stack)
        began = time.perf_counter()
        await setups[0].client.compute(0, settings.rows, 1)
        steps = steps_for(time.perf_counter() - began)
        for round_ in range(repeat):
            for k in range(len(setups)):
                setup = setups[(round_ + k) % len(setups)]
                setup.runs.append(await setup.client.compute(0, settings.rows, steps))
        trained = [await s.client.train(0, settings.rows, max(2, steps // 2)) for s in setups]
    one, two, reference = (s.summary(steps, t) for s, t in zip(setups, trained, strict=True))
    return {
        "params": model.num_params(),
        "speedup": one["step_s"] / two["step_s"],
        "exchange_bytes_per_step": two["exchange_bytes_per_step"],
        "wait_share": two["wait_share"],
        "step_ms_1": one["step_s"] * 1e3,
        "step_ms_2": two["step_s"] * 1e3,
        "reference_2_threads_speedup": one["step_s"] / reference["step_s"],
        "train_speedup": one["train_step_s"] / two["train_step_s"],
        "steps": steps,
        "repeat": repeat,
    }


async def run(settings: Settings | None = None, repeat: int = 3) -> dict[str, Any]:
    settings = settings or Settings()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((settings.rows, settings.features)).astype(np.float32)
    y = rng.integers(0, settings.classes, settings.rows)
    data = SharedArrays({"x": x, "y": y})
    sizes = []
    try:
        async with Node("bench", ask_timeout=600) as node:
            for hidden in settings.hidden:
                model = MLP([settings.features, hidden, hidden, settings.classes])
                sizes.append({"hidden": hidden,
                              **await compare(node, model, data, settings, repeat)})
            local = LocallyConnected1D(settings.local_width, settings.local_channels,
                                       settings.local_window, settings.classes)
            lx = rng.standard_normal((settings.rows, settings.local_width)).astype(np.float32)
            local_data = SharedArrays({"x": lx, "y": y})
            try:
                local_result = await compare(node, local, local_data, settings, repeat)
            finally:
                local_data.close()
    finally:
        data.close()
    return {
        "batch_size": settings.batch_size,
        "sizes": sizes,
        "reference_2_threads": [{"hidden": s["hidden"],
                                 "speedup": s["reference_2_threads_speedup"]} for s in sizes],
        "locally_connected": {"model": repr(local), **local_result},
        "speedup_grows": all(a["speedup"] < b["speedup"] for a, b in itertools.pairwise(sizes)),
    }
