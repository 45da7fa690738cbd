"""The coordinator: starts a Downpour run, hands each replica its slice of the data,
evaluates the shards' current parameters on test data every few seconds, and ends
the run when every replica has done its steps. A replica that dies is logged and the
run goes on with the others. A run whose loss turns NaN or Inf or grows past
`diverge_factor` times the loss of the initial parameters, or whose pushes a shard
refuses, stops with `TrainingDiverged` carrying the history so far."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from asyncdb.models import Model

from .actor import Actor, ActorRef
from .errors import ActorDead, ChannelClosed, TrainingDiverged, UpdateRejected
from .params import layout_of
from .registry import register_actor
from .shard_client import ShardClient
from .system import actor_alive

log = logging.getLogger("asyncdb.coordinator")

Progress = Callable[[dict[str, Any]], None]


@register_actor("asyncdb.Coordinator")
class Coordinator(Actor):
    """Lives on the driver's node. `on_progress` (a callable, so the coordinator must be
    spawned in the driver's process) receives each history entry as it is made.
    Network peers cannot spawn one."""

    network_spawn = False

    def __init__(self, model: dict[str, Any], shards: list[ActorRef],
                 bounds: list[list[int]], x_test: np.ndarray, y_test: np.ndarray,
                 x_val: np.ndarray | None = None, y_val: np.ndarray | None = None,
                 eval_every: float = 2.0, eval_rows: int = 2000,
                 on_progress: Progress | None = None, partitions: int = 1,
                 diverge_factor: float = 10.0) -> None:
        self.model = Model.from_config(model)
        self.layout = layout_of(self.model, partitions)
        self.shards = ShardClient(shards, bounds)
        self.x_test, self.y_test = x_test, y_test
        # evaluations during training use the validation rows; the test rows only the end
        self.has_val = x_val is not None and y_val is not None and len(x_val) > 0
        self.x_val: np.ndarray = x_val if x_val is not None and self.has_val else x_test
        self.y_val: np.ndarray = y_val if y_val is not None and self.has_val else y_test
        self.eval_every = eval_every
        self.eval_rows = eval_rows
        self.on_progress = on_progress
        self.diverge_factor = diverge_factor
        self._baseline = float("inf")  # the loss of the initial parameters
        self.history: list[dict[str, Any]] = []
        self.lost: list[int] = []
        self._started = 0.0

    async def receive(self, message: dict[str, Any]) -> Any:
        if message.get("op") == "run":
            return await self.run(message["replicas"], message["slices"], message["steps"],
                                  int(message.get("warm_start_steps", 0)))
        if message.get("op") == "params":
            return await self.params()
        raise ValueError(f"coordinator: unknown op {message.get('op')!r}")

    async def params(self) -> np.ndarray:
        return await self.shards.parameters()

    async def evaluate(self, rows: int | None, alive: int) -> dict[str, Any]:
        """A history entry; `rows=None` is the final one, on every test row."""
        flat = await self.params()
        stats = await self.shards.stats()
        views = self.layout.tensors(flat)
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            if rows is None:
                accuracy = {"val_accuracy": (self.model.accuracy(views, self.x_val, self.y_val)
                                             if self.has_val else None),
                            "test_accuracy": self.model.accuracy(views, self.x_test,
                                                                 self.y_test)}
            else:
                n = min(rows, len(self.x_val))
                accuracy = {"val_accuracy": self.model.accuracy(views, self.x_val[:n],
                                                                self.y_val[:n])}
        progress = stats[0]["progress"].values()
        examples = sum(int(p["examples"]) for p in progress)
        elapsed = time.perf_counter() - self._started
        updates = sum(int(s["updates"]) for s in stats)
        entry = {
            "time": round(elapsed, 3),
            "examples": examples,
            "examples_per_s": examples / elapsed if elapsed > 0 else 0.0,
            "loss": float(np.mean([p["loss"] for p in progress])) if progress else None,
            **accuracy,
            "staleness_mean": (sum(s["staleness_mean"] * s["updates"] for s in stats)
                               / updates if updates else 0.0),
            "staleness_max": max(int(s["staleness_max"]) for s in stats),
            "updates": updates,
            "replicas": alive,
            "lost": list(self.lost),
            **_activity(stats, progress),
        }
        self.history.append(entry)
        if self.on_progress is not None:
            self.on_progress(entry)
        return entry

    async def run(self, replicas: list[ActorRef], slices: list[list[int]], steps: list[int],
                  warm_start_steps: int) -> dict[str, Any]:
        """Train: replica 0 alone for the warm start, then every replica at once.
        A replica's end (done, or lost) is handled the moment it comes; evaluations
        tick every `eval_every` seconds throughout, warm start included."""
        self._started = time.perf_counter()
        self.history = []
        self._baseline = await self._initial_loss()
        summaries: dict[int, dict[str, Any]] = {}
        lost: list[int] = []
        self.lost = lost
        tasks: dict[asyncio.Future[Any], int] = {}
        remaining = list(steps)

        def start(index: int, count: int) -> None:
            lo, hi = slices[index]
            ask = replicas[index].ask({"op": "train", "start": lo, "stop": hi,
                                       "steps": count}, timeout=None)
            tasks[asyncio.ensure_future(ask)] = index
            remaining[index] -= count

        warming = bool(warm_start_steps and replicas and steps[0])
        if warming:
            log.info("warm start: replica 0 trains alone for %d steps",
                     min(warm_start_steps, steps[0]))
            start(0, min(warm_start_steps, steps[0]))
        else:
            for index, count in enumerate(steps):
                if count > 0:
                    start(index, count)
        loop = asyncio.get_running_loop()
        next_eval = loop.time() + self.eval_every
        try:
            while tasks or warming:
                if warming and not tasks:  # the warm start is over, however it ended
                    warming = False
                    for index, count in enumerate(remaining):
                        if count > 0 and index not in lost:
                            start(index, count)
                    continue
                done, _ = await asyncio.wait(tasks, timeout=max(0.0, next_eval - loop.time()),
                                             return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    index = tasks.pop(task)
                    result = await self._outcome(task, index, lost)
                    if result is not None:
                        summaries[index] = _merge(summaries.get(index), result)
                if tasks and loop.time() >= next_eval:
                    self._check_loss(await self.evaluate(self.eval_rows,
                                                         len(replicas) - len(lost)))
                    next_eval = loop.time() + self.eval_every
        finally:
            for task in tasks:
                task.cancel()
        return await self._result(summaries, lost, len(replicas) - len(lost))

    async def _result(self, summaries: dict[int, dict[str, Any]], lost: list[int],
                      alive: int) -> dict[str, Any]:
        """The final evaluation on the whole test set, checked, and the run's summary."""
        seconds = time.perf_counter() - self._started  # training only, not the final test
        final = await self.evaluate(None, alive)
        self._check_loss(final)
        for index, summary in summaries.items():
            bad, done_steps = summary.get("bad_batches", 0), summary.get("steps", 0)
            if done_steps and bad * 2 >= done_steps:
                raise self._diverged(f"{bad} of replica {index}'s {done_steps} batches gave "
                                     "a NaN or Inf loss or gradient")
        examples = sum(int(s["examples"]) for s in summaries.values())
        final["examples"] = examples
        final["examples_per_s"] = examples / seconds if seconds > 0 else 0.0
        return {"history": self.history, "lost": lost,
                "replicas": {str(i): summary for i, summary in summaries.items()},
                "seconds": seconds,
                "shards": await self.shards.stats()}

    async def _outcome(self, task: asyncio.Future[Any], index: int,
                       lost: list[int]) -> dict[str, Any] | None:
        """A replica's summary; None if the replica is lost (noted in `lost`). A
        replica that failed because a shard went away is no lost replica: with a shard
        gone the run cannot go on, and fails."""
        try:
            result: dict[str, Any] = task.result()
        except (ChannelClosed, ActorDead) as exc:
            gone = [i for i, ref in enumerate(self.shards.shards)
                    if not await actor_alive(self.node, ref)]
            if gone:
                log.error("replica %d failed and shards %s are unreachable: %s", index,
                          gone, exc)
                raise type(exc)(f"shard {gone[0]} is unreachable, so the run cannot go "
                                f"on (replica {index}: {exc})") from exc
            lost.append(index)
            log.warning("replica %d lost (%s); training goes on without it", index, exc)
            return None
        except UpdateRejected as exc:
            raise self._diverged(f"replica {index}'s push was refused: {exc}") from exc
        log.info("replica %d finished its steps", index)
        return result

    async def _initial_loss(self) -> float:
        views = self.layout.tensors(await self.params())
        grads = {name: np.zeros_like(view) for name, view in views.items()}
        n = min(self.eval_rows, len(self.x_test))
        loss, _ = self.model.loss_and_grad(views, self.x_test[:n], self.y_test[:n], grads)
        return float(loss)

    def _check_loss(self, entry: dict[str, Any]) -> None:
        loss = entry["loss"]
        if loss is None:
            return
        if not np.isfinite(loss):
            raise self._diverged(f"the training loss is {loss}")
        if np.isfinite(self._baseline) and loss > self.diverge_factor * max(self._baseline,
                                                                            1e-3):
            raise self._diverged(f"the training loss grew to {loss:.4g} from "
                                 f"{self._baseline:.4g} at the start")

    def _diverged(self, reason: str) -> TrainingDiverged:
        log.error("training diverged: %s", reason)
        return TrainingDiverged(f"training diverged after {len(self.history)} evaluations: "
                                f"{reason}", self.history)


def _activity(stats: list[dict[str, Any]], progress: Any) -> dict[str, Any]:
    """Cumulative counts for dashboards and metrics: per replica (as its last push
    reported them) and per shard."""
    totals = {key: sum(int(p.get(key, 0)) for p in progress)
              for key in ("fetches", "pushes", "skipped_fetches", "deferred_pushes")}
    return {
        **totals,
        "replica_examples": {str(p["replica"]): int(p["examples"]) for p in progress},
        "shard_updates": [int(s["updates"]) for s in stats],
        "rejected": sum(int(s["rejected"]) for s in stats),
        "update_seconds": sum(float(s["update_seconds"]) for s in stats),
        "update_counts": [sum(c) for c in zip(*(s["update_counts"] for s in stats),
                                              strict=True)],
    }


def _merge(before: dict[str, Any] | None, after: dict[str, Any]) -> dict[str, Any]:
    """A replica's counters are cumulative; its seconds add up across train calls."""
    if before is None:
        return after
    return {**after, "seconds": before["seconds"] + after["seconds"]}
