"""The coordinator: starts a Downpour run, hands each replica its slice of the data,
evaluates the shards' current parameters on test data every few seconds, and ends
the run when every replica has done its steps. A replica that dies is logged and the
run goes on with the others."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from asyncdb.models import Model

from .actor import Actor, ActorRef
from .errors import ActorDead, ChannelClosed
from .params import layout_of
from .registry import register_actor
from .shard_client import ShardClient

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
                 on_progress: Progress | None = None, partitions: int = 1) -> None:
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
        if rows is None:
            accuracy = {"val_accuracy": (self.model.accuracy(views, self.x_val, self.y_val)
                                         if self.has_val else None),
                        "test_accuracy": self.model.accuracy(views, self.x_test, self.y_test)}
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
        self._started = time.perf_counter()
        self.history = []
        summaries: dict[int, dict[str, Any]] = {}
        lost: list[int] = []
        self.lost = lost
        if warm_start_steps and replicas:
            warm = min(warm_start_steps, steps[0])
            log.info("warm start: replica 0 trains alone for %d steps", warm)
            summaries[0] = await replicas[0].ask(
                {"op": "train", "start": slices[0][0], "stop": slices[0][1], "steps": warm},
                timeout=None)
            steps = [steps[0] - warm, *steps[1:]]
        tasks = {
            asyncio.ensure_future(ref.ask({"op": "train", "start": lo, "stop": hi,
                                           "steps": n}, timeout=None)): i
            for i, (ref, (lo, hi), n) in enumerate(zip(replicas, slices, steps, strict=True))
            if n > 0
        }
        pending = set(tasks)
        while pending:
            done, pending = await asyncio.wait(pending, timeout=self.eval_every)
            for task in done:
                index = tasks[task]
                try:
                    result = task.result()
                except (ChannelClosed, ActorDead) as exc:
                    lost.append(index)
                    log.warning("replica %d lost (%s); training goes on with %d replicas",
                                index, exc, len(replicas) - len(lost))
                    continue
                summaries[index] = _merge(summaries.get(index), result)
            if pending:
                await self.evaluate(self.eval_rows, len(replicas) - len(lost))
        seconds = time.perf_counter() - self._started  # training only, not the final test
        final = await self.evaluate(None, len(replicas) - len(lost))
        examples = sum(int(s["examples"]) for s in summaries.values())
        final["examples"] = examples
        final["examples_per_s"] = examples / seconds if seconds > 0 else 0.0
        return {"history": self.history, "lost": lost,
                "replicas": {str(i): summary for i, summary in summaries.items()},
                "seconds": seconds,
                "shards": await self.shards.stats()}


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
