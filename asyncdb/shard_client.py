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
from .errors import ConfigError

T = TypeVar("T")


@dataclass(frozen=True)
class ShardCheckpoint:
    """One shard's state: its slice, its update rule's state, its version."""

    values: np.ndarray
    state: dict[str, np.ndarray]
    version: int


class ShardClient:
    """Typed calls on a set of parameter shards holding one flat vector between them."""

    def __init__(self, shards: Sequence[ActorRef], bounds: Sequence[Sequence[int]]) -> None:
        if len(shards) != len(bounds) or not shards:
            raise ConfigError(f"{len(shards)} shards but {len(bounds)} bounds")
        self.shards = list(shards)
        self.bounds = [(int(lo), int(hi)) for lo, hi in bounds]
        if any(hi0 != lo1 for (_, hi0), (lo1, _) in zip(self.bounds, self.bounds[1:],
                                                          strict=False)):
            raise ConfigError(f"shard bounds {self.bounds} are not contiguous")
        self.size = self.bounds[-1][1]
        self.stopping = False  # a shard's reply said the run is ending early

    def __len__(self) -> int:
        return len(self.shards)

    async def _each(self, call: Callable[[int, ActorRef], Awaitable[T]]) -> list[T]:
        return list(await asyncio.gather(*(call(i, s) for i, s in enumerate(self.shards))))

    # -- Downpour: fetch and push ---------------------------------------------------

    async def fetch(self, out: np.ndarray, span: tuple[int, int] | None = None) -> list[int]:
        """Read the parameters into `out` (the whole flat vector, or with `span` only
        [lo, hi) of it, asking only the shards that hold some of it); returns each
        asked shard's version (-1 for shards not asked)."""
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
            reply = await shard.ask(message, borrow=True)
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
                   progress: dict[str, Any] | None = None) -> list[dict[str, int]]:
        """Send each shard its slice of the flat gradient `grad`, with the version of the
        parameters it was computed from; `progress` rides on shard 0's push. Each shard
        answers {"version", "staleness", "stop"} or raises `UpdateRejected`. A reply
        with "stop" (as a fetch's) sets `stopping`: the run is ending early."""

        async def one(i: int, shard: ActorRef) -> dict[str, int]:
            lo, hi = self.bounds[i]
            message: dict[str, Any] = {"op": "push", "grad": grad[lo:hi],
                                       "version": int(versions[i])}
            if i == 0 and progress is not None:
                message["progress"] = progress
            reply: dict[str, int] = await shard.ask(message)
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
        return await self._each(lambda _i, shard: shard.ask({"op": "stats"}))

    async def checkpoint(self) -> list[ShardCheckpoint]:
        """A copy of every shard's state, taken shard by shard."""

        async def one(_i: int, shard: ActorRef) -> ShardCheckpoint:
            reply = await shard.ask({"op": "checkpoint"})
            return ShardCheckpoint(reply["values"], dict(reply["state"]), int(reply["version"]))

        return await self._each(one)

    async def restore(self, checkpoints: Sequence[ShardCheckpoint]) -> list[int]:
        """Put every shard back to its checkpoint; returns the restored versions."""
        if len(checkpoints) != len(self.shards):
            raise ConfigError(f"{len(checkpoints)} checkpoints for {len(self.shards)} shards")

        async def one(i: int, shard: ActorRef) -> int:
            saved = checkpoints[i]
            return int(await shard.ask({"op": "restore", "values": saved.values,
                                        "state": saved.state, "version": saved.version}))

        return await self._each(one)
