"""Downpour SGD: model replicas training asynchronously against the parameter shards.

A replica computes gradients on mini-batches of its own slice of the data. Every
`n_fetch` steps it fetches fresh parameters from all shards at once; every `n_push`
steps it pushes the gradients accumulated since its last push to all shards at once.
Both go out as background tasks while the next mini-batch is computed, and both obey
optional rate limits (operations/s, bytes/s): a fetch that the limit refuses is
skipped (the replica goes on with what it has), a push is deferred (its gradients keep
accumulating). The last push of a run waits for the limit instead.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from asyncdb.models import Model

from .actor import Actor, ActorRef
from .data import inline_spec, open_arrays
from .errors import ConfigError
from .params import ParameterLayout
from .registry import register_actor
from .shard_client import ShardClient
from .system import PeerPolicy

log = logging.getLogger("asyncdb.downpour")


@dataclass(frozen=True)
class Downpour:
    """Downpour SGD settings. Rates are per replica; None means unlimited."""

    n_fetch: int = 1
    n_push: int = 1
    batch_size: int = 32
    fetch_rate: float | None = None
    push_rate: float | None = None
    fetch_bytes_rate: float | None = None
    push_bytes_rate: float | None = None
    warm_start_steps: int = 0
    unit_steps: int = 100

    def __post_init__(self) -> None:
        if self.n_fetch < 1 or self.n_push < 1 or self.batch_size < 1:
            raise ConfigError("n_fetch, n_push and batch_size must be at least 1")
        if self.unit_steps < 1:
            raise ConfigError("unit_steps must be at least 1")
        if self.warm_start_steps < 0:
            raise ConfigError("warm_start_steps cannot be negative")
        for name in ("fetch_rate", "push_rate", "fetch_bytes_rate", "push_bytes_rate"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"{name} must be positive (or None for no limit)")

    def to_config(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Unit:
    """One unit of Downpour work: `steps` mini-batches over rows [start, stop) of the
    slice of replica `home`. `warm` units run before the other replicas join."""

    id: int
    home: int
    start: int
    stop: int
    steps: int
    warm: bool = False


def plan_units(slices: list[list[int]], steps: list[int], unit_steps: int,
               warm_start_steps: int = 0) -> list[Unit]:
    """Cut each replica's share (`steps[i]` mini-batches over `slices[i]`) into units of
    at most `unit_steps`; the first `warm_start_steps` of replica 0's are warm units.
    Units are interleaved across replicas, so the queue hands each its own in turn."""
    chunks: list[list[tuple[int, bool]]] = []
    for i, total in enumerate(steps):
        warm = min(warm_start_steps, total) if i == 0 else 0
        sizes = [(min(unit_steps, warm - k), True) for k in range(0, warm, unit_steps)]
        rest = total - warm
        sizes += [(min(unit_steps, rest - k), False) for k in range(0, rest, unit_steps)]
        chunks.append(sizes)
    units: list[Unit] = []
    warm_units = [(0, n, True) for n, w in chunks[0] if w] if chunks else []
    for _home, n, _w in warm_units:
        units.append(Unit(len(units), 0, slices[0][0], slices[0][1], n, True))
    queues = [[n for n, w in c if not w] for c in chunks]
    for k in range(max((len(q) for q in queues), default=0)):
        for home, queue in enumerate(queues):
            if k < len(queue):
                lo, hi = slices[home]
                units.append(Unit(len(units), home, lo, hi, queue[k]))
    return units


class RateLimit:
    """Token buckets on operations/s and bytes/s, each holding one second's worth."""

    def __init__(self, ops_per_s: float | None, bytes_per_s: float | None) -> None:
        self.ops_per_s = ops_per_s
        self.bytes_per_s = bytes_per_s
        self._ops = 1.0 if ops_per_s is None else min(1.0, ops_per_s)
        self._bytes = 0.0 if bytes_per_s is None else bytes_per_s
        self._last = time.monotonic()

    def _refill(self) -> None:
        now = time.monotonic()
        elapsed, self._last = now - self._last, now
        if self.ops_per_s is not None:
            self._ops = min(max(1.0, self.ops_per_s), self._ops + elapsed * self.ops_per_s)
        if self.bytes_per_s is not None:
            self._bytes = min(self.bytes_per_s, self._bytes + elapsed * self.bytes_per_s)

    def try_take(self, nbytes: int) -> bool:
        """Take one operation of `nbytes` if the limits allow it now."""
        self._refill()
        if self.ops_per_s is not None and self._ops < 1.0:
            return False
        if self.bytes_per_s is not None and self._bytes < min(nbytes, self.bytes_per_s):
            return False
        if self.ops_per_s is not None:
            self._ops -= 1.0
        if self.bytes_per_s is not None:
            self._bytes -= nbytes
        return True

    def delay(self, nbytes: int) -> float:
        """Seconds until an operation of `nbytes` would be allowed."""
        self._refill()
        wait = 0.0
        if self.ops_per_s is not None:
            wait = max(wait, (1.0 - self._ops) / self.ops_per_s)
        if self.bytes_per_s is not None:
            wait = max(wait, (min(nbytes, self.bytes_per_s) - self._bytes) / self.bytes_per_s)
        return wait

    async def take(self, nbytes: int) -> None:
        """Wait until the limits allow one operation of `nbytes`, then take it."""
        while not self.try_take(nbytes):  # noqa: ASYNC110 (waiting on time, not an event)
            await asyncio.sleep(max(self.delay(nbytes), 0.001))


@register_actor("asyncdb.Replica")
class Replica(Actor):
    """One model replica. Each `train` message is one unit of work (steps over a range
    of rows) and is answered with a summary; progress rides on its pushes (examples
    done, recent loss). `generation` counts the incarnations of replica `index`: shards
    refuse pushes from one that was replaced."""

    def __init__(self, index: int, model: dict[str, Any], shards: list[ActorRef],
                 bounds: list[list[int]], data: dict[str, Any], algorithm: dict[str, Any],
                 seed: int = 0, generation: int = 0) -> None:
        self.index = index
        self.generation = generation
        self.model = Model.from_config(model)
        self.layout = self._parameter_layout()
        self.client = ShardClient(shards, bounds)
        self.algorithm = Downpour(**algorithm)
        self.arrays = open_arrays(data)
        self.rng = np.random.default_rng([seed, index, generation])
        size = self.layout.size
        self.params = np.zeros(size, np.float32)
        self.grad = np.zeros(size, np.float32)
        self.accum = [np.zeros(size, np.float32), np.zeros(size, np.float32)]
        self.param_views = self.layout.views(self.params)
        self.grad_views = self.layout.views(self.grad)
        self.versions = [0] * len(shards)
        self.fetch_limit = RateLimit(self.algorithm.fetch_rate, self.algorithm.fetch_bytes_rate)
        self.push_limit = RateLimit(self.algorithm.push_rate, self.algorithm.push_bytes_rate)
        self.counts = {"steps": 0, "examples": 0, "fetches": 0, "pushes": 0,
                       "skipped_fetches": 0, "deferred_pushes": 0, "bad_batches": 0}
        self._fetching: asyncio.Task[None] | None = None
        self._pushing: asyncio.Task[None] | None = None
        self._stale = True  # no parameters fetched yet
        self._pending_steps = 0
        self._unit = [-1, -1]  # the unit and attempt being done: pushes carry how far
        self._unit_steps = 0
        self._loss_sum = 0.0
        self._loss_steps = 0

    @classmethod
    def admit(cls, config: dict[str, Any], policy: PeerPolicy) -> None:
        """A network peer's replica: a model within the parameter limit, its data
        inline (never a path here), buffers within the data limit."""
        try:
            model = Model.from_config(config["model"])
            batch = int(Downpour(**config["algorithm"]).batch_size)
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"bad replica config: {exc}") from exc
        params = model.num_params()
        if params > policy.max_params:
            raise ConfigError(f"a replica of {model} has {params} parameters, over this "
                              f"node's limit of {policy.max_params}")
        data = inline_spec(config.get("data"))
        rows = min((len(a) for a in (data.get("arrays") or {}).values()
                    if isinstance(a, np.ndarray) and a.ndim), default=0)
        units = sum(int(s) for s in getattr(model, "sizes", ()))
        activations = 3 * 4 * min(batch, rows) * units
        if activations > policy.max_data_bytes:
            raise ConfigError(f"batches of {batch} rows through {model} need about "
                              f"{activations} bytes, over this node's limit of "
                              f"{policy.max_data_bytes}")

    async def receive(self, message: dict[str, Any]) -> Any:
        if message.get("op") == "train":
            shards = message.get("shards")
            if shards is not None:
                self._adopt(shards)
            rows = message.get("rows")
            self._unit = [int(message.get("unit", -1)), int(message.get("attempt", -1))]
            self._unit_steps = 0
            try:
                return await self.train(int(message["start"]), int(message["stop"]),
                                        int(message["steps"]),
                                        None if rows is None else open_arrays(rows))
            except BaseException:
                await self._abandon()
                raise
        if message.get("op") == "counts":
            return dict(self.counts)
        raise ConfigError(f"replica: unknown op {message.get('op')!r}")

    async def train(self, start: int, stop: int, steps: int,
                    unit_rows: dict[str, np.ndarray] | None = None) -> dict[str, Any]:
        """Run `steps` mini-batches over rows [start, stop) of the training data (or of
        `unit_rows`, data that came with the unit because this replica does not hold it)."""
        arrays = self.arrays if unit_rows is None else unit_rows
        x, y = arrays["x"], arrays["y"]
        if not 0 <= start < stop <= len(x) or steps < 0:
            raise ConfigError(f"replica {self.index}: rows [{start}, {stop}) and {steps} steps "
                              f"do not fit its {len(x)} rows of data")
        batch = self.algorithm.batch_size
        n_fetch, n_push = self.algorithm.n_fetch, self.algorithm.n_push
        began = time.perf_counter()
        if self._stale:  # the first unit, or shards re-created: parameters must come first
            await self._fetch()
            self._stale = False
        order = np.arange(start, stop)
        position = len(order)
        done = 0
        for _ in range(steps):
            if self.client.stopping:  # a shard said the run is ending early
                break
            done += 1
            if position + batch > len(order):
                self.rng.shuffle(order)
                position = 0
            rows = np.sort(order[position:position + batch])
            position += batch
            loss = await self._compute(x[rows], y[rows])
            self.counts["steps"] += 1
            self._unit_steps += 1
            # a bad row (NaN in the data) spoils one batch, not the run: its loss shows it;
            # the rarer finite loss with a non-finite gradient is caught before the push
            if math.isfinite(loss):
                np.add(self.accum[0], self.grad, out=self.accum[0])
                self._pending_steps += 1
                self._loss_sum += loss
                self._loss_steps += 1
                self.counts["examples"] += batch
            else:
                self._bad_batches(1)
            if self.counts["steps"] % n_push == 0:
                await self._maybe_push()
            if self.counts["steps"] % n_fetch == 0:
                self._maybe_fetch()
            await asyncio.sleep(0)  # let fetches and pushes move between steps
        await self._flush()
        seconds = time.perf_counter() - began
        return {**self.counts, "seconds": seconds, "replica": self.index,
                "generation": self.generation, "steps_done": done, "batch_size": batch}

    def _adopt(self, shards: list[ActorRef]) -> None:
        """The run's shards as they are now (the unit names them): a re-created one is
        fetched from before the next step."""
        if shards != self.client.shards:
            self.client = ShardClient(shards, self.client.bounds)
            self._stale = True

    def _bad_batches(self, count: int) -> None:
        if not self.counts["bad_batches"]:
            log.warning("replica %d: a batch gave a NaN or Inf loss or gradient; "
                        "skipping such batches", self.index)
        self.counts["bad_batches"] += count

    async def _abandon(self) -> None:
        """A unit failed (a shard went away): it will be done again, so drop what it
        left in flight and unpushed, and fetch afresh before the next one."""
        for task in (self._fetching, self._pushing):
            if task is not None and not task.done():
                task.cancel()
        await asyncio.gather(*(t for t in (self._fetching, self._pushing) if t is not None),
                             return_exceptions=True)
        self._fetching = self._pushing = None
        for buffer in self.accum:
            buffer[...] = 0.0
        self.counts["abandoned_steps"] = (self.counts.get("abandoned_steps", 0)
                                          + self._pending_steps)
        self._pending_steps, self._loss_sum, self._loss_steps = 0, 0.0, 0
        self._stale = True

    def _parameter_layout(self) -> ParameterLayout:
        """The parameters this replica fetches, trains and pushes (all of them)."""
        return ParameterLayout(self.model.param_shapes())

    async def _compute(self, x: np.ndarray, y: np.ndarray) -> float:
        """One mini-batch: the loss, and the gradient written into `self.grad`."""
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            loss, _ = self.model.loss_and_grad(self.param_views, x, y, self.grad_views)
        return loss  # NaN or Inf ones are caught and skipped by the caller

    # -- fetching ---------------------------------------------------------------

    def _maybe_fetch(self) -> None:
        if self._fetching is not None and not self._fetching.done():
            self.counts["skipped_fetches"] += 1  # one in flight at a time: this one is skipped
            return
        if not self.fetch_limit.try_take(self.params.nbytes):
            self.counts["skipped_fetches"] += 1
            return
        self._fetching = asyncio.get_running_loop().create_task(self._fetch())

    async def _fetch(self) -> None:
        self.versions = await self.client.fetch(self.params)
        self.counts["fetches"] += 1

    # -- pushing ----------------------------------------------------------------

    async def _maybe_push(self) -> None:
        if self._pushing is not None:
            if not self._pushing.done():
                await self._pushing  # at most one push in flight: its buffer is busy
            self._pushing.result()
        if not self._pending_steps:
            return  # every batch since the last push was spoiled: nothing to send
        if not self.push_limit.try_take(self.params.nbytes):
            self.counts["deferred_pushes"] += 1
            return
        self._start_push()

    def _start_push(self) -> None:
        if not np.isfinite(self.accum[0]).all():  # one check per push, not per batch
            self._drop_pending()
            return
        self.accum.reverse()  # accumulate into the other buffer while this one flies
        buffer = self.accum[1]
        progress = {**self.counts, "replica": self.index,
                    "loss": self._loss_sum / max(1, self._loss_steps)}
        self._loss_sum, self._loss_steps, self._pending_steps = 0.0, 0, 0
        mark = [*self._unit, self._unit_steps]
        self._pushing = asyncio.get_running_loop().create_task(
            self._push(buffer, progress, mark))

    def _drop_pending(self) -> None:
        """The batches accumulated since the last push gave a non-finite gradient
        between them: drop them all, as bad batches."""
        self.accum[0][...] = 0.0
        self.counts["examples"] -= self._pending_steps * self.algorithm.batch_size
        self._bad_batches(self._pending_steps)
        self._loss_sum, self._loss_steps, self._pending_steps = 0.0, 0, 0

    async def _push(self, buffer: np.ndarray, progress: dict[str, Any],
                    mark: list[int]) -> None:
        try:
            await self.client.push(buffer, self.versions, progress,
                                   (self.index, self.generation), mark)
        finally:
            buffer[...] = 0.0
        self.counts["pushes"] += 1

    async def _flush(self) -> None:
        if self._pushing is not None:
            await self._pushing
        if self._pending_steps and not self.client.stopping:
            await self.push_limit.take(self.params.nbytes)
            self._start_push()
            if self._pushing is not None:
                await self._pushing
        if self._fetching is not None:
            await self._fetching
