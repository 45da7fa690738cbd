"""The parameter shard: owns one contiguous slice of the parameters, answers fetches,
applies pushed gradients in place with its update rule, and reports what it saw.

Messages (dicts with an "op"; `ShardClient` is the caller's side):
    fetch [lo, hi]            -> {"values", "version", "stop"} (the slice, or [lo, hi))
    push  grad, version       -> {"version", "staleness", "stop"}; UpdateRejected if bad
          [sender, mark]        (mark [unit, attempt, steps]: the replica's unit steps it covers)
    mark  replica             -> the mark of that replica's last push applied here, or None
    stop                      -> None; from now on fetch and push replies say "stop"
    stats                     -> counters (updates, version, staleness, rejections)
    checkpoint                -> {"values", "state", "version"}
    restore values, state, version

Sandblaster shards (made with `lbfgs={"memory": m, "penalized": [[lo, hi], ...]}`) also
keep named vectors and the L-BFGS history for their slice (`shard_vectors.py`):
    fetch vector=NAME         -> that vector instead of the parameters ("x")
    vectors program           -> {"values": [scalars...]}
    begin pass, portions, target
    accumulate pass, portions, grad -> {"counted": bool}
    missing pass              -> {"portions": [ids not counted]}
"""

from __future__ import annotations

import bisect
import logging
import os
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from .actor import Actor, ActorRef
from .engine import ENGINES, Updater
from .errors import ConfigError, UpdateRejected
from .optim import UpdateRule
from .registry import register_actor
from .shard_client import ShardClient
from .shard_vectors import SliceVectors
from .system import PeerPolicy

log = logging.getLogger("asyncdb.shard")

# upper bounds (seconds) of the update-time histogram's buckets; the last one is +Inf
UPDATE_BUCKETS = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0)


@register_actor("asyncdb.ParameterShard")
class ParameterShard(Actor):
    borrow_arrays = True  # gradients are applied, never kept

    def __init__(self, index: int, values: np.ndarray, optimizer: dict[str, Any],
                 engine: str = "blocked", threads: int | None = None,
                 lbfgs: dict[str, Any] | None = None) -> None:
        self.index = index
        dtype = np.float64 if np.asarray(values).dtype == np.float64 else np.float32
        self.values = np.array(values, dtype).reshape(-1)
        self.lbfgs = None if lbfgs is None else SliceVectors(
            index, self.values, int(lbfgs.get("memory", 10)), lbfgs.get("penalized", ()))
        self.updater = Updater(UpdateRule.from_config(optimizer), len(self.values),
                               engine, threads)
        self.version = 0
        self.rejected = 0
        self.staleness_sum = 0
        self.staleness_max = 0
        self.update_seconds = 0.0
        self.update_counts = [0] * (len(UPDATE_BUCKETS) + 1)
        self.fetches = 0
        self.progress: dict[str, dict[str, Any]] = {}  # per replica, carried by pushes
        # replica index -> lowest generation whose pushes are still accepted: an
        # incarnation that was replaced (it froze, then woke up) is refused
        self.fences: dict[int, int] = {}
        self.fenced = 0
        self.marks: dict[int, list[int]] = {}  # replica -> its last applied push's mark
        self.stopping = False  # the run is ending early: replies tell the replicas

    @classmethod
    def admit(cls, config: dict[str, Any], policy: PeerPolicy) -> None:
        """A network peer's shard: a slice within the parameter limit, a known engine,
        no more threads than this host has cores."""
        values = config.get("values")
        if not isinstance(values, np.ndarray):
            raise ConfigError("a shard's values must be an array")
        if values.size > policy.max_params:
            raise ConfigError(f"a shard of {values.size} parameters is over this node's "
                              f"limit of {policy.max_params}")
        lbfgs = config.get("lbfgs")
        if lbfgs is not None:
            memory = lbfgs.get("memory", 10) if isinstance(lbfgs, dict) else None
            if not isinstance(memory, int) or memory < 1:
                raise ConfigError(f"bad L-BFGS memory {memory!r}")
            if values.size * (5 + 2 * memory) > policy.max_params:
                raise ConfigError(f"a Sandblaster shard of {values.size} parameters with "
                                  f"{memory} history pairs is over this node's limit of "
                                  f"{policy.max_params}")
        if config.get("engine", "blocked") not in ENGINES:
            raise ConfigError(f"unknown update engine; choose from {ENGINES}")
        threads, cores = config.get("threads"), os.cpu_count() or 1
        if threads is not None and (not isinstance(threads, int) or not 1 <= threads <= cores):
            raise ConfigError(f"a shard may use 1 to {cores} threads here, not {threads!r}")

    async def on_stop(self) -> None:
        self.updater.close()

    async def receive(self, message: dict[str, Any]) -> Any:
        op = message.get("op") if isinstance(message, dict) else None
        if op == "push":
            self._check_sender(message.get("sender"))
            result = self.push(message.get("grad"), message.get("version", self.version))
            self._mark(message.get("sender"), message.get("mark"))
            progress = message.get("progress")
            if isinstance(progress, dict):
                self.progress[str(progress.get("replica"))] = progress
            return result
        if op == "fetch":
            return self.fetch(message.get("lo", 0), message.get("hi", len(self.values)),
                              message.get("vector", "x"))
        if op == "stop":
            self.stopping = True
            return None
        if op == "stats":
            return self.stats()
        if op == "checkpoint":
            state = {k: v.copy() for k, v in self.updater.state.items()}
            if self.lbfgs is not None:
                state.update(self.lbfgs.state())
            return {"values": self.values.copy(), "version": self.version, "state": state}
        if op == "restore":
            return self.restore(message)
        if op == "fence":
            return self.fence(message.get("fences"))
        if op == "mark":
            return self.marks.get(message.get("replica"))  # type: ignore[arg-type]
        if op in ("vectors", "begin", "accumulate", "missing"):
            return self.sandblaster(op, message)
        raise UpdateRejected(f"shard {self.index}: unknown op {op!r}")
    def fence(self, fences: Any) -> dict[str, int]:
        """Refuse pushes from replica generations below `fences[replica]` from now on."""
        if not isinstance(fences, dict) or not all(
                isinstance(k, str) and k.isdigit() and type(v) is int and v >= 0
                for k, v in fences.items()):
            raise UpdateRejected(f"shard {self.index}: fences must map replica to generation")
        for replica, generation in fences.items():
            index = int(replica)
            self.fences[index] = max(self.fences.get(index, 0), generation)
        return {str(k): v for k, v in self.fences.items()}

    def _check_sender(self, sender: Any) -> None:
        if sender is None:
            return
        if not (isinstance(sender, list) and len(sender) == 2
                and all(type(v) is int and v >= 0 for v in sender)):
            raise UpdateRejected(f"shard {self.index}: malformed sender {sender!r}")
        replica, generation = sender
        if generation < self.fences.get(replica, 0):
            self.fenced += 1
            log.warning("shard %d refused a push from replica %d generation %d (replaced by "
                        "generation %d)", self.index, replica, generation, self.fences[replica])
            raise UpdateRejected(f"shard {self.index}: replica {replica} generation "
                                 f"{generation} was replaced; push refused")
        self.fences[replica] = generation

    def _mark(self, sender: Any, mark: Any) -> None:
        """Remember how far into its unit the replica's push just applied went."""
        if sender is not None and isinstance(mark, list) and len(mark) == 3 \
                and all(type(v) is int for v in mark):
            self.marks[sender[0]] = mark

    def fetch(self, lo: Any, hi: Any, vector: Any = "x") -> dict[str, Any]:
        if not (isinstance(lo, int) and isinstance(hi, int) and 0 <= lo < hi <= len(self.values)):
            raise UpdateRejected(f"shard {self.index}: bad fetch range [{lo!r}, {hi!r}) "
                                 f"of a slice of {len(self.values)}")
        values = self.values
        if vector != "x":
            if self.lbfgs is None or vector not in self.lbfgs.vectors:
                raise UpdateRejected(f"shard {self.index}: no vector named {vector!r}")
            values = self.lbfgs.vectors[vector]
        self.fetches += 1
        return {"values": values[lo:hi], "version": self.version, "stop": self.stopping}

    def sandblaster(self, op: str, message: dict[str, Any]) -> Any:
        vectors = self.lbfgs
        if vectors is None:
            raise UpdateRejected(f"shard {self.index}: {op!r} needs a Sandblaster shard")
        try:
            if op == "vectors":
                values, version = vectors.run(message.get("program"))
                if version is not None:
                    self.version = version
                return {"values": values}
            if op == "begin":
                vectors.begin(message.get("pass"), message.get("portions"),
                              message.get("target"))
                return None
            if op == "accumulate":
                return {"counted": vectors.accumulate(message.get("pass"),
                                                      message.get("portions"),
                                                      message.get("grad"))}
            return {"portions": vectors.missing(message.get("pass"))}
        except UpdateRejected as exc:
            self.rejected += 1
            log.warning("shard %d rejected %s: %s", self.index, op, exc)
            raise

    def push(self, grad: Any, fetched_version: Any) -> dict[str, Any]:
        """Apply `grad` computed from parameters of version `fetched_version`. The update
        is checked after it is computed, not by bounding the gradient first: the new
        parameters and optimizer state go to spare buffers and are adopted only if all
        finite, so a finite gradient that would overflow (SGD to -inf, an Adagrad
        accumulator to inf) is rejected with the shard intact."""
        self._check(grad)
        assert isinstance(grad, np.ndarray)
        if not _is_version(fetched_version):
            self._reject(f"bad version {fetched_version!r}")
        start = time.perf_counter()
        values = self.updater.step(self.values, grad)
        seconds = time.perf_counter() - start
        self.update_seconds += seconds
        self.update_counts[bisect.bisect_left(UPDATE_BUCKETS, seconds)] += 1
        if values is None:
            self._reject("the update would make parameters or optimizer state "
                         "overflow to Inf or NaN")
        assert values is not None
        self.values = values
        staleness = max(0, self.version - fetched_version)
        self.version += 1
        self.staleness_sum += staleness
        self.staleness_max = max(self.staleness_max, staleness)
        return {"version": self.version, "staleness": staleness, "stop": self.stopping}

    def _check(self, grad: Any) -> None:
        problem = None
        if not isinstance(grad, np.ndarray):
            problem = f"gradient must be an array, got {type(grad).__name__}"
        elif grad.dtype != self.values.dtype:
            problem = f"gradient dtype {grad.dtype} is not {self.values.dtype}"
        elif grad.shape != self.values.shape:
            problem = f"gradient shape {grad.shape} does not match slice {self.values.shape}"
        elif not np.isfinite(grad).all():
            problem = "gradient holds NaN or Inf"
        if problem is not None:
            self._reject(problem)

    def _reject(self, problem: str) -> None:
        self.rejected += 1
        log.warning("shard %d rejected a push: %s", self.index, problem)
        raise UpdateRejected(f"shard {self.index}: {problem}; parameters unchanged")

    def stats(self) -> dict[str, Any]:
        return {
            "index": self.index, "size": len(self.values), "version": self.version,
            "updates": self.version, "fetches": self.fetches, "rejected": self.rejected,
            "staleness_mean": self.staleness_sum / self.version if self.version else 0.0,
            "staleness_max": self.staleness_max, "fenced": self.fenced,
            "update_seconds": self.update_seconds, "update_counts": list(self.update_counts),
            "engine": self.updater.engine, "threads": self.updater.threads,
            "progress": self.progress,
            **({"lbfgs": self.lbfgs.stats()} if self.lbfgs is not None else {}),
        }

    def restore(self, message: dict[str, Any]) -> int:
        """Adopt a checkpoint; every part is checked before anything changes."""
        values = np.asarray(message["values"], self.values.dtype).reshape(-1)
        if values.shape != self.values.shape:
            raise UpdateRejected(f"shard {self.index}: checkpoint shape {values.shape} "
                                 f"does not match {self.values.shape}")
        version = message.get("version", 0)
        if not _is_version(version):
            raise UpdateRejected(f"shard {self.index}: bad checkpoint version {version!r}")
        state = message.get("state") or {}
        states = {name: np.asarray(saved, self.updater.state[name].dtype).reshape(-1)
                  for name, saved in state.items() if name in self.updater.state}
        if any(saved.shape != self.values.shape for saved in states.values()):
            raise UpdateRejected(f"shard {self.index}: checkpoint state shape does not match")
        if not all(np.isfinite(a).all() for a in (values, *states.values())):
            raise UpdateRejected(f"shard {self.index}: checkpoint holds NaN or Inf")
        if self.lbfgs is not None:
            self.lbfgs.restore(state)
        self.values[...] = values
        for name, saved in states.items():
            self.updater.state[name][...] = saved
        self.version = version
        return self.version


def _is_version(value: Any) -> bool:
    """A version number: an int (not a bool) in [0, 2**63)."""
    return type(value) is int and 0 <= value < 2**63


async def fetch_parameters(shards: Sequence[ActorRef], bounds: Sequence[tuple[int, int]],
                           size: int) -> np.ndarray:
    """The whole flat parameter vector, fetched from every shard at once."""
    client = ShardClient(shards, bounds)
    if client.size != size:
        raise ConfigError(f"shard bounds cover {client.size} parameters, not {size}")
    return await client.parameters()
