"""Sandblaster with partitioned replicas: a `Partition` that computes portions.

Each partition of a replica fetches its own block of the point once per pass from the
shards holding that block, computes its block of a portion's gradient sum with its peers
(forward, backward and the exchanges of `modelparallel`), holds it until the
coordinator's verdict, and pushes the sums it accumulated to its own shards, tagged with
the pass and portion ids. Every partition of a replica gets the same messages, so they
push the same ids at the same points; `PartitionedReplica` answers a portion as pushed
only when every partition pushed it. A push that reached some shards and not others (a
partition lost on the way) shows in `missing`, which counts a portion only when every
shard has it: it is done again, one portion a push, and the shards that had it drop
the repeat.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import numpy as np

from .errors import ConfigError
from .modelparallel import Partition
from .registry import register_actor
from .shard_client import ShardClient


@register_actor("asyncdb.SandblasterPartition")
class SandblasterPartition(Partition):
    """Partition `part` of Sandblaster replica `index`. Messages as `SandblasterReplica`'s
    (portion, flush, counts), sent to every partition of the replica at once."""

    def __init__(self, index: int, part: int, parts: int, peers: list[Any],
                 model: dict[str, Any], shards: list[Any], bounds: list[list[int]],
                 data: dict[str, Any], algorithm: dict[str, Any], seed: int = 0,
                 slowdown: float = 1.0, shard_ids: list[int] | None = None,
                 generation: int = 0) -> None:
        super().__init__(index, part, parts, peers, model, shards, bounds, data,
                         algorithm, seed, generation=generation, shard_ids=shard_ids)
        dtype = next(iter(self.model.init_params(np.random.default_rng(0)).values())).dtype
        size = self.layout.size
        self.params = np.zeros(size, dtype)
        self.staged = np.zeros(size, dtype)
        self.grad = self.staged
        self.accum = [np.zeros(size, dtype)]
        self.param_views = self.layout.views(self.params)
        self.grad_views = self.layout.views(self.staged)
        self.slowdown = float(slowdown)
        self.pass_id = -1
        self.staged_portion: int | None = None
        self.accum_ids: list[int] = []
        self.counts.update({"portions": 0, "loss_portions": 0, "dropped": 0})
        self.timing["seconds"] = 0.0

    async def receive(self, message: dict[str, Any]) -> Any:
        op = message.get("op")
        if op == "portion":
            return await self.portion(message)
        if op == "flush":
            return {"pushed": await self.flush(message)}
        return await super().receive(message)

    def _start_pass(self, pass_id: int) -> None:
        self.pass_id = pass_id
        self.staged_portion = None
        self.accum_ids = []
        self.accum[0][...] = 0.0

    def _apply(self, verdict: list[list[Any]]) -> None:
        for unit, counted in verdict:
            if unit != self.staged_portion:
                continue
            if counted:
                self.accum[0] += self.staged
                self.accum_ids.append(int(unit))
            else:
                self.counts["dropped"] += 1
            self.staged_portion = None

    async def _push_sums(self) -> list[int]:
        ids, self.accum_ids = self.accum_ids, []
        await self.client.accumulate(self.pass_id, ids, self.accum[0])
        self.accum[0][...] = 0.0
        self.counts["pushes"] += 1
        return ids

    async def flush(self, message: dict[str, Any]) -> list[int]:
        if int(message["pass"]) != self.pass_id:
            return []
        self._apply(message.get("verdict", []))
        return await self._push_sums() if self.accum_ids else []

    async def portion(self, message: dict[str, Any]) -> dict[str, Any]:
        """A portion's gradient sum (kind "grad", staged) or loss sum ("loss"): the loss
        is partition 0's (the others answer 0)."""
        pass_id = int(message["pass"])
        pushed: list[int] = []
        if pass_id == self.pass_id:
            self._apply(message.get("verdict", []))
            if len(self.accum_ids) >= int(message.get("push_every", 1)):
                pushed = await self._push_sums()
        else:  # a new pass: fetch this block of its point once (re-created shards too)
            self._start_pass(pass_id)
            shards = message.get("shards")
            if shards is not None:
                mine = [shards[i] for i in self.shard_ids]
                if mine != self.client.shards:
                    self.client = ShardClient(mine, self.client.bounds)
            await self.client.fetch(self.params, vector=str(message["vector"]))
            self.counts["fetches"] += 1
        lo, hi = (int(r) for r in message["rows"])
        x, y = self.arrays["x"][lo:hi], self.arrays["y"][lo:hi]
        began = time.perf_counter()
        self.staged[...] = 0.0
        loss = await self._compute(x, y)  # the loss gradient too: a loss portion drops it
        if message["kind"] == "grad":
            self.staged *= self.staged.dtype.type(hi - lo)  # the step answers means
            self.staged_portion = int(message["portion"])
            self.counts["portions"] += 1
        elif message["kind"] == "loss":
            self.counts["loss_portions"] += 1
        else:
            raise ConfigError(f"Sandblaster partition: unknown portion kind {message['kind']!r}")
        spent = time.perf_counter() - began
        if self.slowdown > 1.0:
            await asyncio.sleep((self.slowdown - 1.0) * spent)
        self.timing["seconds"] += time.perf_counter() - began
        return {"loss_sum": loss * (hi - lo), "examples": hi - lo, "pushed": pushed}
