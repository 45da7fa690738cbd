"""`ShardClient`: the one place that knows the parameter shards' messages.

Replicas, partitions, the coordinator and the cluster talk to the shards through it,
as ps-lite's workers use `KVWorker::Push/Pull`: each call goes to every shard at once
(the slicer is the list of `bounds`, one contiguous [lo, hi) range per shard) and is a
coroutine, so `asyncio.ensure_future(client.push(...))` is the handle to wait on later.
The shard's side of each message is `ParameterShard.receive`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from .actor import ActorRef
from .errors import AsyncDBError, ConfigError

T = TypeVar("T")


@dataclass(frozen=True)
class ShardCheckpoint:
    """One shard's state: its slice, its update rule's state, its version."""

    values: np.ndarray
    state: dict[str, np.ndarray]
    version: int


async def start_shard(shard: ActorRef, start: ShardCheckpoint) -> None:
    """Put a shard just spawned with `start.values` at the rest of `start` (its update
    rule's or L-BFGS state, its version), when there is any."""
    if start.state or start.version:
        await shard.ask({"op": "restore", "values": start.values, "state": start.state,
                         "version": start.version})


class ShardClient:
    """Typed calls on a set of parameter shards holding one flat vector between them."""

    def __init__(self, shards: Sequence[ActorRef], bounds: Sequence[Sequence[int]],
                 meter: Callable[[Any], None] | None = None) -> None:
        """`meter`, if given, sees every reply (to count what this client receives)."""
        if len(shards) != len(bounds) or not shards:
            raise ConfigError(f"{len(shards)} shards but {len(bounds)} bounds")
        self.shards = list(shards)
        self.bounds = [(int(lo), int(hi)) for lo, hi in bounds]
        if any(hi0 != lo1 for (_, hi0), (lo1, _) in zip(self.bounds, self.bounds[1:],
                                                          strict=False)):
            raise ConfigError(f"shard bounds {self.bounds} are not contiguous")
        self.size = self.bounds[-1][1]
        self.meter = meter
        self.stopping = False  # a shard's reply said the run is ending early

    def __len__(self) -> int:
        return len(self.shards)

    async def _each(self, call: Callable[[int, ActorRef], Awaitable[T]]) -> list[T]:
        return list(await asyncio.gather(*(call(i, s) for i, s in enumerate(self.shards))))

    async def _ask(self, shard: ActorRef, message: dict[str, Any], borrow: bool = False) -> Any:
        reply = await shard.ask(message, borrow=borrow)
        if self.meter is not None:
            self.meter(reply)
        return reply

    # -- Downpour: fetch and push ---------------------------------------------------

    async def fetch(self, out: np.ndarray, span: tuple[int, int] | None = None,
                    vector: str = "x") -> list[int]:
        """Read the parameters into `out` (the whole flat vector, or with `span` only
        [lo, hi) of it, asking only the shards that hold some of it); returns each
        asked shard's version (-1 for shards not asked). Sandblaster shards also
        answer for their other named vectors (`vector="xt"`: the trial point)."""
        lo, hi = span if span is not None else (0, self.size)
        versions = [-1] * len(self.shards)

        async def one(i: int, shard: ActorRef) -> None:
            s_lo, s_hi = self.bounds[i]
            a, b = max(lo, s_lo), min(hi, s_hi)
            if a >= b:
                return
            message: dict[str, Any] = {"op": "fetch"}
            if (a, b) != (s_lo, s_hi):
                message.update(lo=a - s_lo, hi=b - s_lo)
            if vector != "x":
                message["vector"] = vector
            reply = await self._ask(shard, message, borrow=True)
            out[a:b] = reply["values"]
            versions[i] = int(reply["version"])
            self.stopping = self.stopping or bool(reply.get("stop"))

        await self._each(one)
        return versions

    async def parameters(self, dtype: Any = np.float32) -> np.ndarray:
        """A fresh copy of the whole flat parameter vector."""
        flat = np.empty(self.size, dtype)
        await self.fetch(flat)
        return flat

    async def push(self, grad: np.ndarray, versions: Sequence[int],
                   progress: dict[str, Any] | None = None,
                   sender: tuple[int, int] | None = None,
                   mark: list[int] | None = None) -> list[dict[str, int]]:
        """Send each shard its slice of the flat gradient `grad`, with the version of the
        parameters it was computed from; `progress` rides on shard 0's push; `sender`
        (replica, generation) lets shards refuse a replaced incarnation; `mark`
        ([unit, attempt, steps]) tells each shard how far into its unit the replica's
        push goes (see `marks`). Each shard
        answers {"version", "staleness", "stop"} or raises `UpdateRejected`. A reply
        with "stop" (as a fetch's) sets `stopping`: the run is ending early."""

        async def one(i: int, shard: ActorRef) -> dict[str, int]:
            lo, hi = self.bounds[i]
            message: dict[str, Any] = {"op": "push", "grad": grad[lo:hi],
                                       "version": int(versions[i])}
            if sender is not None:
                message["sender"] = list(sender)
                if mark is not None:
                    message["mark"] = mark
            if i == 0 and progress is not None:
                message["progress"] = progress
            reply: dict[str, int] = await self._ask(shard, message)
            self.stopping = self.stopping or bool(reply.get("stop"))
            return reply

        return await self._each(one)

    async def stop(self) -> None:
        """End the run early: from now on every shard's replies to fetches and pushes
        say so, and the replicas finish at their next exchange."""
        await self._each(lambda _i, shard: shard.ask({"op": "stop"}, timeout=10))

    # -- inspection and state -----------------------------------------------------------

    async def stats(self) -> list[dict[str, Any]]:
        """Each shard's counters (updates, version, fetches, staleness, rejections...)."""
        return await self._each(lambda _i, shard: self._ask(shard, {"op": "stats"}))

    async def marks(self, replica: int, timeout: float) -> list[list[int] | None]:
        """Each shard's mark of replica `replica`'s last push it applied ([unit, attempt,
        steps]); None for a shard that has none or does not answer within `timeout`."""

        async def one(shard: ActorRef) -> list[int] | None:
            try:
                reply = await shard.ask({"op": "mark", "replica": replica}, timeout=timeout)
            except AsyncDBError:
                return None
            return [int(v) for v in reply] if isinstance(reply, list) else None

        return list(await asyncio.gather(*(one(shard) for shard in self.shards)))

    async def checkpoint(self) -> list[ShardCheckpoint]:
        """A copy of every shard's state, taken shard by shard."""
        return await self._each(lambda i, _shard: self.checkpoint_shard(i))

    async def checkpoint_shard(self, index: int) -> ShardCheckpoint:
        """A copy of shard `index`'s state."""
        reply = await self._ask(self.shards[index], {"op": "checkpoint"})
        return ShardCheckpoint(reply["values"], dict(reply["state"]), int(reply["version"]))

    async def restore(self, checkpoints: Sequence[ShardCheckpoint]) -> list[int]:
        """Put every shard back to its checkpoint; returns the restored versions."""
        if len(checkpoints) != len(self.shards):
            raise ConfigError(f"{len(checkpoints)} checkpoints for {len(self.shards)} shards")
        return await self._each(lambda i, _shard: self.restore_shard(i, checkpoints[i]))

    async def restore_shard(self, index: int, saved: ShardCheckpoint) -> int:
        """Put shard `index` back to `saved`; returns its restored version."""
        return int(await self._ask(self.shards[index],
            {"op": "restore", "values": saved.values, "state": saved.state,
             "version": saved.version}))

    async def fence(self, fences: dict[int, int], index: int | None = None) -> None:
        """Make every shard (or shard `index`) refuse pushes from replica generations
        below `fences[replica]`."""
        message = {"op": "fence", "fences": {str(k): v for k, v in fences.items()}}
        if index is not None:
            await self.shards[index].ask(message)
        else:
            await self._each(lambda _i, shard: shard.ask(message))

    def replace(self, index: int, shard: ActorRef) -> None:
        """Shard `index` now lives at `shard` (re-created after its node failed)."""
        self.shards[index] = shard
    # -- Sandblaster: vector programs and exactly-once accumulation -------------------

    async def vectors(self, *program: list[Any]) -> list[float]:
        """Run one program of vector operations (see `shard_vectors.py`: copy, axpy,
        scale, dot, paxpy, pdot, history, version) on every shard's slice; returns
        the scalars it answers, each summed over the shards."""
        ops = [list(op) for op in program]

        async def one(_i: int, shard: ActorRef) -> list[float]:
            reply = await self._ask(shard, {"op": "vectors", "program": ops})
            return [float(v) for v in reply["values"]]

        parts = await self._each(one)
        return [sum(column) for column in zip(*parts, strict=True)]

    async def begin(self, pass_id: int, portions: int, target: str) -> None:
        """Open gradient pass `pass_id` of `portions` portions, accumulating into
        `target` ("g" or "gt"), zeroed."""
        await self._each(lambda _i, shard: self._ask(shard, {
            "op": "begin", "pass": pass_id, "portions": portions, "target": target}))

    async def accumulate(self, pass_id: int, portions: Sequence[int],
                         grad: np.ndarray) -> list[bool]:
        """Push the sum `grad` of `portions` of pass `pass_id`; each shard answers
        whether it counted it (False: a repeat or a stale pass, dropped)."""
        ids = [int(p) for p in portions]

        async def one(i: int, shard: ActorRef) -> bool:
            lo, hi = self.bounds[i]
            reply = await self._ask(shard, {"op": "accumulate", "pass": pass_id,
                                            "portions": ids, "grad": grad[lo:hi]})
            return bool(reply["counted"])

        return await self._each(one)

    async def missing(self, pass_id: int) -> list[int]:
        """Portions of pass `pass_id` that some shard has not counted, sorted."""

        async def one(_i: int, shard: ActorRef) -> list[int]:
            reply = await self._ask(shard, {"op": "missing", "pass": pass_id})
            return [int(p) for p in reply["portions"]]

        return sorted(set().union(*await self._each(one)))
