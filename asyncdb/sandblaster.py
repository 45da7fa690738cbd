"""Sandblaster L-BFGS (Dean et al. 2012, section 4.2): batch L-BFGS whose coordinator
never holds the parameters.

The parameter shards keep, for their slice, the parameters, the gradient being
accumulated, the search direction and the L-BFGS history (`shard_vectors.py`); the
coordinator (`lbfgs.py`) runs the two-loop recursion with small vector commands and
adds up the scalars the shards answer. Each gradient or loss evaluation over the batch
is a *pass* cut into portions much smaller than 1/replicas of it, handed out through
the work queue (`workqueue.py`): a free replica asks for the next portion, fast ones
do more, and near the end idle replicas get backup copies of outstanding portions;
the first result counts. Replicas fetch the point once per pass, compute each
portion's gradient sum, and push accumulated sums every few portions with the pass
and portion ids, so a shard counts every portion exactly once.

This module holds the settings, the replica and the evaluator; `passes.py` the pass
scheduler, `lbfgs.py` the coordinator and `sandblaster_run.py` a run's set-up and
recovery.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from asyncdb.models import Model

from . import codec
from .actor import Actor, ActorRef
from .data import inline_spec, open_arrays
from .errors import ConfigError
from .params import ParameterLayout, layout_of, tensors_of
from .registry import register_actor
from .shard_client import ShardClient
from .system import PeerPolicy

log = logging.getLogger("asyncdb.sandblaster")


@dataclass(frozen=True)
class Sandblaster:
    """Sandblaster L-BFGS settings.

    memory: L-BFGS history pairs; portion_size: rows per portion; iterations, gtol
    (gradient 2-norm), ftol (relative loss decrease, as SciPy's), max_seconds: the
    first reached stops the run; backup_tasks: copy outstanding portions to idle
    replicas; push_every: portions a replica accumulates before pushing;
    lease_seconds: a portion not done in this time is re-issued (None: never);
    eval_every: iterations between test-set evaluations (the last one always);
    slowdown: per replica, a factor by which it is slowed with a sleep after each
    portion (benchmark-only: makes stragglers on purpose)."""

    memory: int = 10
    portion_size: int = 256
    iterations: int = 100
    gtol: float = 1e-5
    ftol: float = 0.0
    max_seconds: float | None = None
    backup_tasks: bool = True
    push_every: int = 4
    lease_seconds: float | None = None
    eval_every: int = 1
    max_line_search: int = 20
    slowdown: tuple[float, ...] = field(default=())

    def __post_init__(self) -> None:
        if self.memory < 1:
            raise ConfigError(f"L-BFGS memory must be at least 1, got {self.memory}")
        if self.portion_size < 1:
            raise ConfigError(f"portion_size must be at least 1, got {self.portion_size}")
        if self.iterations < 1 or self.push_every < 1 or self.eval_every < 1:
            raise ConfigError("iterations, push_every and eval_every must be at least 1")
        if self.gtol < 0 or self.ftol < 0:
            raise ConfigError("gtol and ftol cannot be negative")
        if self.max_seconds is not None and self.max_seconds <= 0:
            raise ConfigError("max_seconds must be positive (or None)")
        if self.lease_seconds is not None and self.lease_seconds <= 0:
            raise ConfigError("lease_seconds must be positive (or None)")
        if self.max_line_search < 2:
            raise ConfigError("max_line_search must be at least 2")
        if any(not s >= 1.0 for s in self.slowdown):
            raise ConfigError("slowdown factors must be at least 1")

    def to_config(self) -> dict[str, Any]:
        config = asdict(self)
        config["slowdown"] = list(self.slowdown)
        return config

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Sandblaster:
        return cls(**{**config, "slowdown": tuple(config.get("slowdown", ()))})

    def check(self, model: Model, rows: int, replicas: int) -> None:
        """Refuse settings that do not fit the model, the data or the replicas."""
        if self.portion_size > rows:
            raise ConfigError(f"portion_size {self.portion_size} is larger than the "
                              f"{rows} training rows")
        if len(self.slowdown) > replicas:
            raise ConfigError(f"{len(self.slowdown)} slowdown factors for {replicas} replicas")
        if model.l2:
            try:
                model.data_loss_and_grad(model.init_params(np.random.default_rng(0)),
                                         np.zeros((1, _inputs(model))), np.zeros(1, int))
            except NotImplementedError as exc:
                raise ConfigError(f"Sandblaster adds the L2 term once per pass, which "
                                  f"{model!r} cannot leave out of its loss") from exc


def _inputs(model: Model) -> int:
    return next(iter(model.param_shapes().values()))[0]


def wire_bytes(message: Any) -> int:
    """Bytes `message` takes as a reply frame between nodes."""
    return codec.encode_message(codec.REPLY, [0], message).nbytes


@register_actor("asyncdb.SandblasterReplica")
class SandblasterReplica(Actor):
    """One model replica of a Sandblaster run. Messages (from the coordinator):

    portion pass, vector, kind, portion, rows, verdict, push_every[, shards]
        -> {"loss_sum", "examples", "pushed"}: computes the portion's gradient sum
        (kind "grad", held until the coordinator's verdict) or loss sum ("loss");
        a replica's first portion of a pass names the shards (re-created ones change)
    flush pass, verdict -> {"pushed"}: pushes what it accumulated
    counts -> its counters
    """

    @classmethod
    def admit(cls, config: dict[str, Any], policy: PeerPolicy) -> None:
        """A network peer's replica: a model within the parameter limit (three buffers
        of it), its data inline (never a path on that host)."""
        try:
            model = Model.from_config(config["model"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"bad replica config: {exc}") from exc
        if 3 * model.num_params() > policy.max_params:
            raise ConfigError(f"a Sandblaster replica of {model} is over this node's "
                              f"limit of {policy.max_params} parameters")
        inline_spec(config.get("data"))

    def __init__(self, index: int, model: dict[str, Any], shards: list[ActorRef],
                 bounds: list[list[int]], data: dict[str, Any], slowdown: float = 1.0) -> None:
        self.index = index
        self.model = Model.from_config(model)
        self.layout = ParameterLayout(self.model.param_shapes())
        self.client = ShardClient(shards, bounds)
        self.arrays = open_arrays(data)
        self.slowdown = float(slowdown)
        dtype = next(iter(self.model.init_params(np.random.default_rng(0)).values())).dtype
        size = self.layout.size
        self.params = np.zeros(size, dtype)
        self.staged = np.zeros(size, dtype)
        self.accum = np.zeros(size, dtype)
        self.param_views = self.layout.views(self.params)
        self.staged_views = self.layout.views(self.staged)
        self.pass_id = -1
        self.staged_portion: int | None = None
        self.accum_ids: list[int] = []
        self.counts = {"portions": 0, "loss_portions": 0, "fetches": 0, "pushes": 0,
                       "dropped": 0, "seconds": 0.0}

    async def receive(self, message: dict[str, Any]) -> Any:
        op = message.get("op")
        if op == "portion":
            return await self.portion(message)
        if op == "flush":
            return {"pushed": await self.flush(message)}
        if op == "counts":
            return dict(self.counts)
        raise ConfigError(f"Sandblaster replica: unknown op {op!r}")

    def _start_pass(self, pass_id: int) -> None:
        self.pass_id = pass_id
        self.staged_portion = None
        self.accum_ids = []
        self.accum[...] = 0.0

    def _apply(self, verdict: list[list[Any]]) -> None:
        for unit, counted in verdict:
            if unit != self.staged_portion:
                continue
            if counted:
                self.accum += self.staged
                self.accum_ids.append(int(unit))
            else:
                self.counts["dropped"] += 1
            self.staged_portion = None

    async def _push(self) -> list[int]:
        ids, self.accum_ids = self.accum_ids, []
        await self.client.accumulate(self.pass_id, ids, self.accum)
        self.accum[...] = 0.0
        self.counts["pushes"] += 1
        return ids

    async def flush(self, message: dict[str, Any]) -> list[int]:
        if int(message["pass"]) != self.pass_id:
            return []
        self._apply(message.get("verdict", []))
        return await self._push() if self.accum_ids else []

    async def portion(self, message: dict[str, Any]) -> dict[str, Any]:
        pass_id = int(message["pass"])
        pushed: list[int] = []
        if pass_id == self.pass_id:
            self._apply(message.get("verdict", []))
            if len(self.accum_ids) >= int(message.get("push_every", 1)):
                pushed = await self._push()
        else:  # a new pass: fetch its point once (from re-created shards, if any)
            self._start_pass(pass_id)
            shards = message.get("shards")
            if shards is not None and shards != self.client.shards:
                self.client = ShardClient(shards, self.client.bounds)
            await self.client.fetch(self.params, vector=str(message["vector"]))
            self.counts["fetches"] += 1
        lo, hi = (int(r) for r in message["rows"])
        x, y = self.arrays["x"][lo:hi], self.arrays["y"][lo:hi]
        began = time.perf_counter()
        if message["kind"] == "grad":
            loss, _ = self.model.data_loss_and_grad(self.param_views, x, y, self.staged_views)
            self.staged *= self.staged.dtype.type(hi - lo)  # models answer means
            self.staged_portion = int(message["portion"])
            self.counts["portions"] += 1
        else:
            loss = self.model.data_loss(self.param_views, x, y)
            self.counts["loss_portions"] += 1
        spent = time.perf_counter() - began
        if self.slowdown > 1.0:
            await asyncio.sleep((self.slowdown - 1.0) * spent)
        self.counts["seconds"] += time.perf_counter() - began
        return {"loss_sum": loss * (hi - lo), "examples": hi - lo, "pushed": pushed}


@register_actor("asyncdb.SandblasterEvaluator")
class Evaluator(Actor):
    """Beside the coordinator: fetches the parameters and measures test accuracy, so
    the coordinator never holds them. `evaluate` -> accuracy; `params` -> the vector."""

    network_spawn = False  # lives on the driver's node

    def __init__(self, model: dict[str, Any], client: ShardClient, x_test: np.ndarray,
                 y_test: np.ndarray, partitions: int = 1) -> None:
        self.model = Model.from_config(model)
        self.layout = layout_of(self.model, partitions)
        self.client = client  # the run's: re-created shards are swapped into it
        self.x_test, self.y_test = x_test, y_test
        self.dtype = next(iter(self.model.init_params(np.random.default_rng(0)).values())).dtype

    async def receive(self, message: dict[str, Any]) -> Any:
        flat = await self.client.parameters(self.dtype)
        if message.get("op") == "params":
            return flat
        if message.get("op") == "evaluate":
            return self.model.accuracy(tensors_of(self.layout, flat), self.x_test, self.y_test)
        raise ConfigError(f"evaluator: unknown op {message.get('op')!r}")
