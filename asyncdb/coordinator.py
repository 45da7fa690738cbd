"""The coordinator: runs a Downpour run as units of work handed to the replicas,
evaluates the shards' current parameters on test data every few seconds, and ends
the run when every unit is done. A unit whose replica (or a shard it needed) failed
goes to another replica; with recovery, failed actors are re-created and go on. A run
whose loss turns NaN or Inf or grows past `diverge_factor` times the loss of the initial
parameters, or whose pushes a shard refuses, stops with `TrainingDiverged` carrying the
history so far."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

import numpy as np

from asyncdb.models import Model

from .actor import Actor, ActorRef
from .data import inline_arrays
from .downpour import Unit
from .errors import (
    ActorDead,
    ChannelClosed,
    ConfigError,
    RunError,
    Timeout,
    TrainingDiverged,
    UpdateRejected,
)
from .params import layout_of
from .recovery import Checkpointer, Events, Recovery
from .registry import register_actor
from .scheduler import UnitScheduler
from .shard_client import ShardClient
from .system import actor_alive
from .workqueue import WorkQueue

log = logging.getLogger("asyncdb.coordinator")

INITIAL_LOSS_ROWS = 512  # rows for the initial loss: its forward pass delays the start

Progress = Callable[[dict[str, Any]], None]


@register_actor("asyncdb.Coordinator")
class Coordinator(Actor):
    """Lives on the driver's node, which holds what it is given beyond plain data:
    `on_progress` receives each history entry as it is made; `client` is the run's
    shard client (re-created shards are swapped into it); `recovery` and
    `checkpointer` make the run survive failed nodes; `rows` and `homes` are the
    training data and each replica's own rows, given when a replica holds only its own
    (remote peers): a unit done by another replica then carries its rows.
    Network peers cannot spawn one."""

    network_spawn = False

    def __init__(self, model: dict[str, Any], client: ShardClient, x_test: np.ndarray,
                 y_test: np.ndarray, x_val: np.ndarray | None = None,
                 y_val: np.ndarray | None = None, eval_every: float = 2.0, eval_rows: int = 2000,
                 on_progress: Progress | None = None, events: Events | None = None,
                 recovery: Recovery | None = None, checkpointer: Checkpointer | None = None,
                 rows: tuple[np.ndarray, np.ndarray] | None = None,
                 homes: list[list[int]] | None = None, done: list[int] | None = None,
                 partitions: int = 1, versions: dict[int, int] | None = None,
                 diverge_factor: float = 10.0) -> None:
        self.model = Model.from_config(model)
        self.layout = layout_of(self.model, partitions)
        self.shards = client
        self.events = events or Events()
        self.recovery = recovery
        self.checkpointer = checkpointer
        self.rows = rows
        self.homes = homes
        self.done_before = list(done or [])  # units a resumed run did before
        self.versions = versions if versions is not None else {}  # shard -> last seen
        self.scheduler: UnitScheduler | None = None
        self.stopping = False
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
            units = [Unit(*u) for u in message["units"]]
            return await self.run(message["replicas"], units)
        if message.get("op") == "params":
            return await self.params()
        raise ValueError(f"coordinator: unknown op {message.get('op')!r}")

    async def params(self) -> np.ndarray:
        return await self.shards.parameters()

    async def evaluate(self, rows: int | None, alive: int) -> dict[str, Any]:
        """A history entry; `rows=None` is the final one, on every test row."""
        flat = await self.params()
        stats = await self.shards.stats()
        for i, shard in enumerate(stats):
            self.versions[i] = max(self.versions.get(i, 0), int(shard["version"]))
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

    def stop(self) -> None:
        """Hand out no more units; the run ends once the ones in flight are done."""
        self.stopping = True
        if self.scheduler is not None:
            self.scheduler.stop()

    def unit_message(self, unit: Unit, replica: int, steps: int | None = None,
                     attempt: int = -1) -> dict[str, Any]:
        """What replica `replica` is asked to do for `unit` (its last `steps` of it)."""
        message = {"op": "train", "start": unit.start, "stop": unit.stop,
                   "steps": unit.steps if steps is None else steps,
                   "unit": unit.id, "attempt": attempt, "shards": list(self.shards.shards)}
        if self.rows is not None and self.homes is not None and unit.home != replica:
            lo, hi = self.homes[unit.home]  # this replica does not hold those rows
            message["rows"] = inline_arrays({"x": self.rows[0][lo:hi],
                                             "y": self.rows[1][lo:hi]})
        return message

    async def run(self, replicas: list[ActorRef], units: list[Unit]) -> dict[str, Any]:
        """Do every unit on the replicas (warm units on one replica first), evaluating
        every `eval_every` seconds and checkpointing the shards as configured."""
        if not units:
            raise ConfigError("a run needs at least one unit of work")
        self.history = []
        self._baseline = await self._initial_loss()
        resumption = Resumption(self.shards, units)
        scheduler = UnitScheduler(replicas, self.events, recovery=self.recovery,
                                  shard_nodes=self._shard_nodes,
                                  shards_gone=self._shards_gone, redo=resumption.failed)
        self.scheduler = scheduler
        if self.stopping:
            scheduler.stop()
        self.lost = scheduler.lost
        summaries: dict[int, dict[str, Any]] = {}
        done: set[int] = set(self.done_before)
        planned = len(done) + len(units)

        def accept(unit: int, replica: int, result: dict[str, Any]) -> None:
            summaries[replica] = _merge(summaries.get(replica), result,
                                        resumption.offsets.get(unit, 0))
            done.add(units[unit].id)

        def send(unit: int, replica: int) -> dict[str, Any]:
            steps, attempt = resumption.attempt(unit)
            return self.unit_message(units[unit], replica, steps, attempt)

        async def work() -> None:
            warm = [i for i, u in enumerate(units) if u.warm]
            if warm:
                log.info("warm start: one replica trains alone for %d units", len(warm))
                await scheduler.drain_in_turn(WorkQueue(warm), send, accept)
            rest = [i for i, u in enumerate(units) if not u.warm]
            if rest:
                await scheduler.drain(WorkQueue(rest), scheduler.alive(), send, accept)
            if self.recovery is not None:
                await self.recovery.settled()

        if self.checkpointer is not None:
            shards = len(self.shards)
            self.checkpointer.state = lambda: {"done": sorted(done), "planned": planned,
                                               "shards": shards}
            await self.checkpointer.take()  # what a shard lost before the first period needs
        self._started = time.perf_counter()  # training from here: the set-up above is not
        await self._supervise(work(), scheduler)
        seconds = time.perf_counter() - self._started  # training only, not the final test
        final = await self.evaluate(None, len(scheduler.alive()))
        self._check_loss(final)
        self._check_batches(summaries)
        examples = sum(int(s["examples_done"]) for s in summaries.values())
        final["examples"] = examples
        final["examples_per_s"] = examples / seconds if seconds > 0 else 0.0
        return {"history": self.history, "lost": scheduler.lost,
                "replicas": {str(i): summary for i, summary in summaries.items()},
                "seconds": seconds, "shards": await self.shards.stats(),
                "units": {"planned": planned, "done": len(done),
                          "reassigned": scheduler.reassigned,
                          "steps_lost": resumption.lost, "steps_kept": resumption.kept}}

    async def _supervise(self, work: Coroutine[Any, Any, None],
                         scheduler: UnitScheduler) -> None:
        """Run `work` with the evaluations and checkpoints beside it; whichever fails
        first (a diverged loss, a refused push, a recovery that failed) ends the run."""
        main = asyncio.ensure_future(work)
        tasks = [main, asyncio.ensure_future(self._evaluate_every(scheduler))]
        if self.checkpointer is not None:
            tasks.append(asyncio.ensure_future(self.checkpointer.run()))
        try:
            waiting = set(tasks)
            failed = None
            while not main.done() and failed is None:
                done, waiting = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                failed = next((t for t in done if t.exception() is not None), None)
            if failed is not None:
                scheduler.stop()
                error = failed.exception()
                assert error is not None
                if isinstance(error, UpdateRejected):
                    raise self._diverged(f"a push was refused: {error}") from error
                if isinstance(error, RunError) and not error.history:
                    raise type(error)(str(error), self.history) from error
                raise error
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _evaluate_every(self, scheduler: UnitScheduler) -> None:
        while True:
            await asyncio.sleep(self.eval_every)
            try:
                entry = await self.evaluate(self.eval_rows, len(scheduler.alive()))
            except (ChannelClosed, ActorDead, Timeout) as exc:  # a shard is being restored
                log.info("evaluation skipped: %s", exc)
                continue
            self._check_loss(entry)

    async def _shards_gone(self) -> list[int]:
        """The shards that no longer answer."""
        return [i for i, ref in enumerate(self.shards.shards)
                if not await actor_alive(self.node, ref)]

    def _shard_nodes(self) -> list[str]:
        return [ref.node_id for ref in self.shards.shards]

    def _check_batches(self, summaries: dict[int, dict[str, Any]]) -> None:
        for index, summary in summaries.items():
            bad, done_steps = summary.get("bad_batches", 0), summary.get("steps", 0)
            if done_steps and bad * 2 >= done_steps:
                raise self._diverged(f"{bad} of replica {index}'s {done_steps} batches gave "
                                     "a NaN or Inf loss or gradient")

    async def _initial_loss(self) -> float:
        """The loss of the initial parameters, the reference for divergence: a forward
        pass over a few test rows (a loss to within a few percent is all it needs)."""
        views = self.layout.tensors(await self.params())
        n = min(self.eval_rows, INITIAL_LOSS_ROWS, len(self.x_test))
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            loss = self.model.data_loss(views, self.x_test[:n], self.y_test[:n])
            return float(loss + self.model.penalty(views))

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


class Resumption:
    """Where a unit that failed is taken up again: after the last push of its failed
    attempt that every shard applied (each push carries a mark, [unit, attempt, steps
    of the attempt], that the shards keep per replica). Steps past that point which
    reached some shards but not all are `lost` (their push is redone, at-least-once);
    the steps before it are `kept` and not done again."""

    MARK_TIMEOUT = 2.0  # a shard that does not answer counts as having no mark

    def __init__(self, client: ShardClient, units: list[Unit]) -> None:
        self.client = client
        self.units = units
        self.offsets: dict[int, int] = {}  # unit -> steps applied by every shard
        self.current: dict[int, int] = {}  # unit -> its attempt in flight
        self._serial = itertools.count()
        self.lost = 0
        self.kept = 0

    def attempt(self, unit: int) -> tuple[int, int]:
        """A new attempt at `unit`: the steps it still needs and the attempt's id."""
        self.current[unit] = attempt = next(self._serial)
        return self.units[unit].steps - self.offsets.get(unit, 0), attempt

    async def failed(self, unit: int, replica: int) -> None:
        """`replica`'s attempt at `unit` failed: from how far the unit goes on."""
        marks = await self.client.marks(replica, self.MARK_TIMEOUT)
        key = [self.units[unit].id, self.current.get(unit, -2)]
        steps = [m[2] if m is not None and m[:2] == key else 0 for m in marks]
        acked, seen = min(steps, default=0), max(steps, default=0)
        self.offsets[unit] = self.offsets.get(unit, 0) + acked
        self.kept += acked
        self.lost += seen - acked


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


def _merge(before: dict[str, Any] | None, after: dict[str, Any],
           kept: int = 0) -> dict[str, Any]:
    """A replica's counters are cumulative (per incarnation); its seconds and the
    examples of the units it finished add up across units (with the `kept` steps of
    the unit's failed attempts, whose pushes every shard applied)."""
    examples = (after["steps_done"] + kept) * after["batch_size"]
    if before is None:
        return {**after, "examples_done": examples}
    return {**after, "seconds": before["seconds"] + after["seconds"],
            "examples_done": before["examples_done"] + examples}
