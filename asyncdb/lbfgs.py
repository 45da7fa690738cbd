"""The Sandblaster coordinator: L-BFGS driven from scalars.

It holds no parameter-sized vector. Every vector (x, g, the direction d, the trial
point xt and its gradient gt, the history pairs s_k, y_k) lives on the shards, sliced;
the coordinator sends programs of vector operations through `ShardClient.vectors` and
keeps only scalars: the loss, rho_k = 1 / (s_k . y_k), the two-loop's alpha_i, the
step length. Gradient and loss evaluations are passes of portions over the replicas
(`sandblaster.Passes`); the line search (`linesearch.StrongWolfe`) asks for loss-only
passes at trial points and a gradient pass only where sufficient decrease holds.

At each iteration boundary (after `accept`) the shards hold x, g and the history ring
of the same iteration, and their version is the iteration number, so a checkpoint
taken there is consistent.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from typing import Any

import numpy as np

from asyncdb.models import Model

from .actor import Actor, ActorRef
from .datasets import Dataset
from .downpour import Downpour
from .errors import ConfigError
from .linesearch import Step, StrongWolfe
from .modelparallel import spawn_partitioned_replica
from .node import Node
from .optim import SGD
from .params import PartitionedLayout, layout_of, spans_of
from .placement import Placement
from .registry import register_actor
from .sandblaster import Evaluator, Passes, Sandblaster, SandblasterReplica, wire_bytes
from .sandblaster_partition import SandblasterPartition
from .shard import ParameterShard
from .shard_client import ShardClient
from .system import SYSTEM

log = logging.getLogger("asyncdb.lbfgs")


@register_actor("asyncdb.SandblasterCoordinator")
class SandblasterCoordinator(Actor):
    """Runs one Sandblaster run: `run` replicas, evaluator -> history and counters.
    `on_progress` (a callable: spawn it in the driver's process) sees each entry."""

    network_spawn = False  # lives on the driver's node

    def __init__(self, shards: list[ActorRef], bounds: list[list[int]], rows: int,
                 algorithm: dict[str, Any], l2: float = 0.0,
                 on_progress: Any = None) -> None:
        self.settings = Sandblaster.from_config(algorithm)
        self.shards = ShardClient(shards, bounds, meter=self._count)
        self.rows = rows
        self.l2 = float(l2)
        self.on_progress = on_progress
        self.received = 0  # bytes of every reply this coordinator got during the run
        self.ring: list[tuple[int, float]] = []  # (slot, rho), oldest first
        self.gamma = 1.0
        self.pairs = 0

    def _count(self, reply: Any) -> None:
        self.received += wire_bytes(reply)

    async def receive(self, message: dict[str, Any]) -> Any:
        if message.get("op") == "run":
            return await self.run(message["replicas"], message["evaluator"])
        raise ConfigError(f"Sandblaster coordinator: unknown op {message.get('op')!r}")

    # -- objective -------------------------------------------------------------------

    async def _finish_gradient(self, point: str, grad: str) -> float:
        """Turn the accumulated sum at `grad` into the objective's gradient at `point`
        (mean, plus the L2 term, once per pass); answers 0.5 l2 |point|^2."""
        [square] = await self.shards.vectors(
            ["scale", 1.0 / self.rows, grad], ["paxpy", self.l2, point, grad],
            ["pdot", point, point])
        return 0.5 * self.l2 * square

    async def _objective(self, passes: Passes) -> tuple[float, float]:
        """Loss and gradient norm at x; the gradient is left in g."""
        loss = await passes.run("grad", "x", "g") / self.rows
        loss += await self._finish_gradient("x", "g")
        [gg] = await self.shards.vectors(["dot", "g", "g"])
        return loss, math.sqrt(gg)

    # -- the two-loop recursion -------------------------------------------------------

    async def _direction(self) -> float:
        """d = -H g from the history ring (Nocedal & Wright, algorithm 7.4); answers
        the slope g . d. Each round trip runs the last axpy and the next dot."""
        ops: list[list[Any]] = [["copy", "d", "g"]]
        alphas: dict[int, float] = {}
        for slot, rho in reversed(self.ring):
            [v] = await self.shards.vectors(*ops, ["dot", f"s{slot}", "d"])
            alphas[slot] = rho * v
            ops = [["axpy", -alphas[slot], f"y{slot}", "d"]]
        ops.append(["scale", self.gamma, "d"])
        for slot, rho in self.ring:
            [v] = await self.shards.vectors(*ops, ["dot", f"y{slot}", "d"])
            ops = [["axpy", alphas[slot] - rho * v, f"s{slot}", "d"]]
        [slope] = await self.shards.vectors(*ops, ["scale", -1.0, "d"], ["dot", "g", "d"])
        return slope

    async def _accept(self, iteration: int) -> float:
        """Move to the trial point: push the pair (xt - x, gt - g) into the ring, then
        x = xt, g = gt. Answers |g|^2 at the new point."""
        slot = self.pairs % self.settings.memory
        self.ring = [(s, rho) for s, rho in self.ring if s != slot]
        sy, yy = await self.shards.vectors(["history", slot, "xt", "x", "gt", "g"])
        [gg] = await self.shards.vectors(["copy", "x", "xt"], ["copy", "g", "gt"],
                                         ["dot", "g", "g"], ["version", iteration])
        if sy > 1e-10 * yy and yy > 0:  # curvature condition: keep the pair
            self.ring.append((slot, 1.0 / sy))
            self.gamma = sy / yy
            self.pairs += 1
        else:
            log.warning("iteration %d: pair skipped (s.y = %.3g)", iteration, sy)
        return gg

    async def _line_search(self, passes: Passes, loss: float, slope: float,
                           alpha: float) -> Step:
        async def phi(a: float) -> float:
            [square] = await self.shards.vectors(["copy", "xt", "x"], ["axpy", a, "d", "xt"],
                                                 ["pdot", "xt", "xt"])
            return await passes.run("loss", "xt") / self.rows + 0.5 * self.l2 * square

        async def dphi(a: float) -> float:
            await passes.run("grad", "xt", "gt")
            await self._finish_gradient("xt", "gt")
            [s] = await self.shards.vectors(["dot", "gt", "d"])
            return s

        search = StrongWolfe(phi, dphi, max_evaluations=self.settings.max_line_search)
        return await search.search(loss, slope, alpha)

    # -- the run -------------------------------------------------------------------

    async def run(self, replicas: list[ActorRef], evaluator: ActorRef) -> dict[str, Any]:
        settings = self.settings
        started = time.perf_counter()
        passes = Passes(self.shards, replicas, self.rows, settings, self._count)
        loss, gnorm = await self._objective(passes)
        history = [await self._entry(0, started, loss, gnorm, None, passes, evaluator)]
        stop = "iterations"
        iteration = 0
        while iteration < settings.iterations:
            if gnorm <= settings.gtol:
                stop = "gtol"
                break
            if settings.max_seconds is not None \
                    and time.perf_counter() - started >= settings.max_seconds:
                stop = "max_seconds"
                break
            iteration += 1
            slope = await self._direction()
            first = 1.0 if self.ring else min(1.0, 1.0 / max(gnorm, 1e-300))
            step = await self._line_search(passes, loss, slope, first)
            if not step.ok:
                history.append(await self._entry(iteration, started, loss, gnorm, step,
                                                 passes, evaluator))
                if not self.ring:
                    stop = f"line search failed: {step.reason}"
                    break
                log.warning("iteration %d: line search failed (%s); history dropped, "
                            "trying steepest descent", iteration, step.reason)
                self.ring = []
                continue
            previous = loss
            gnorm = math.sqrt(await self._accept(iteration))
            loss = step.f
            last = iteration == settings.iterations or gnorm <= settings.gtol
            history.append(await self._entry(iteration, started, loss, gnorm, step, passes,
                                             evaluator if last or iteration
                                             % settings.eval_every == 0 else None))
            if (previous - loss) <= settings.ftol * max(abs(previous), abs(loss), 1.0):
                stop = "ftol"
                break
        if history[-1].get("test_accuracy") is None:
            history[-1]["test_accuracy"] = await evaluator.ask({"op": "evaluate"})
        seconds = time.perf_counter() - started
        return self._summary(history, passes, seconds, stop, iteration)

    async def _entry(self, iteration: int, started: float, loss: float, gnorm: float,
                     step: Step | None, passes: Passes,
                     evaluator: ActorRef | None) -> dict[str, Any]:
        elapsed = time.perf_counter() - started  # before the evaluation, which is not ours
        accuracy = None if evaluator is None else await evaluator.ask({"op": "evaluate"})
        entry = {
            "iteration": iteration, "time": round(elapsed, 4),
            "loss": loss, "grad_norm": gnorm,
            "step": None if step is None else step.alpha,
            "line_search_losses": 0 if step is None else step.losses,
            "line_search_gradients": 0 if step is None else step.gradients,
            "line_search": "ok" if step is None or step.ok else f"failed: {step.reason}",
            "test_accuracy": accuracy, "replicas": len(passes.live),
            "coordinator_bytes": self.received,
        }
        if self.on_progress is not None:
            self.on_progress(entry)
        return entry

    def _summary(self, history: list[dict[str, Any]], passes: Passes, seconds: float,
                 stop: str, iterations: int) -> dict[str, Any]:
        final = history[-1]
        final["stop"] = stop
        final["coordinator_bytes_per_iteration"] = self.received / max(1, iterations)
        final["portions_per_replica"] = {str(k): v for k, v in
                                         passes.portions_per_replica.items()}
        final.update(passes.totals)
        return {"history": history, "seconds": seconds, "lost": passes.lost,
                "live": sorted(passes.live)}


async def train_sandblaster(node: Node, placement: Placement, shards: int, replicas: int,
                            model: Model, data: Dataset, algorithm: Sandblaster, *,
                            seed: int = 0, on_progress: Any = None,
                            on_shards: Any = None, partitions: int = 1) -> dict[str, Any]:
    """Spawn a Sandblaster run's shards, replicas, evaluator and coordinator where
    `placement` says, run it, stop them all; answers what `Run` is built from.
    Every replica receives the whole training set once (any portion can go to it).
    `on_shards(refs, bounds)` hears of the shards once they are up. With `partitions`
    > 1 each replica is that many `SandblasterPartition`s, each talking to the shards
    of its own block."""
    rows = len(data.x_train)
    algorithm.check(model, rows, replicas)
    layout = layout_of(model, partitions)
    bounds = layout.shard_bounds(shards)
    tensors = model.init_params(np.random.default_rng(seed))
    initial = layout.flatten(tensors, dtype=next(iter(tensors.values())).dtype)
    penalized = spans_of(layout, model.penalized())
    shard_nodes, slot_nodes = placement.place(shards, replicas * partitions)
    replica_nodes = [slot_nodes[i * partitions:(i + 1) * partitions] for i in range(replicas)]
    training = placement.training_data(data.x_train, data.y_train, [[0, rows]] * replicas)
    plain_bounds = [list(b) for b in bounds]
    spawned: list[ActorRef] = []
    try:
        shard_refs = []
        for i, (lo, hi) in enumerate(bounds):
            local = [[max(a, lo) - lo, min(b, hi) - lo] for a, b in penalized
                     if min(b, hi) > max(a, lo)]
            shard_refs.append(await node.spawn(ParameterShard, node=shard_nodes[i], config={
                "index": i, "values": initial[lo:hi], "optimizer": SGD().to_config(),
                "threads": 1, "lbfgs": {"memory": algorithm.memory, "penalized": local}}))
        spawned += shard_refs
        if on_shards is not None:
            on_shards(shard_refs, bounds)
        replica_refs = []
        for i in range(replicas):
            slowdown = algorithm.slowdown[i] if i < len(algorithm.slowdown) else 1.0
            if isinstance(layout, PartitionedLayout):
                ref, refs = await spawn_partitioned_replica(
                    node, i, model, replica_nodes[i], shard_refs, bounds, layout.block_bounds,
                    {"data": training.specs[i], "slowdown": slowdown, "algorithm":
                     Downpour(batch_size=algorithm.portion_size).to_config()},
                    SandblasterPartition)
                replica_refs.append(ref)
                spawned += refs
                continue
            replica_refs.append(await node.spawn(SandblasterReplica, node=replica_nodes[i][0],
                                                 config={
                "index": i, "model": model.to_config(), "shards": shard_refs,
                "bounds": plain_bounds, "data": training.specs[i], "slowdown": slowdown}))
            spawned.append(replica_refs[-1])
        evaluator = await node.spawn(Evaluator, config={
            "model": model.to_config(), "shards": shard_refs, "bounds": plain_bounds,
            "x_test": data.x_test, "y_test": data.y_test, "partitions": partitions})
        spawned.append(evaluator)
        coordinator = await node.spawn(SandblasterCoordinator, config={
            "shards": shard_refs, "bounds": plain_bounds, "rows": rows,
            "algorithm": algorithm.to_config(), "l2": model.l2, "on_progress": on_progress})
        spawned.append(coordinator)
        result: dict[str, Any] = await coordinator.ask(
            {"op": "run", "replicas": replica_refs, "evaluator": evaluator}, timeout=None)
        result["params"] = await evaluator.ask({"op": "params"})
        result["shards"] = await ShardClient(shard_refs, bounds).stats()
        result["replicas"] = {i: await replica_refs[i].ask({"op": "counts"})
                              for i in result["live"]}
        return result
    finally:
        for ref in reversed(spawned):
            with contextlib.suppress(Exception):  # a node that died took its actors along
                await node.ref(ref.node_id, SYSTEM).ask({"op": "stop", "name": ref.name},
                                                        timeout=10)
        training.close()
