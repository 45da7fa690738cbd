"""Model parallelism: one Downpour replica split across partition actors.

A `Partition` is a Downpour replica of one share of the model (`models.partition`): it
fetches and pushes only its own block of the parameters, from the shards that hold that
block, and trains in lockstep with its peers. Per step it exchanges

    forward   the activation columns each peer reads but does not own (all of a dense
              layer's columns; a window's worth at the edges of a locally connected
              layer), then its partial logits (to partition 0);
    backward  dL/dlogits (from partition 0), then each peer's contribution to the
              gradient of the activation columns this partition owns.

Outgoing arrays live in `asyncdb.shared` buffers, so between processes on one host they
travel by reference over the shm ring (no copy on the way out); a `PartitionInbox`
beside each partition (whose own mailbox is busy with `train`) copies each arrival once
into the partition's buffers. Buffers alternate by step parity: lockstep keeps every
peer within one step.

`PartitionedReplica` is the replica the coordinator sees. It starts its partitions'
`train` together; if one fails (its process died, its node is gone) it aborts the
others and answers `ActorDead`: the replica is lost and nothing waits for ever.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import numpy as np

from asyncdb.models import Model
from asyncdb.models.partition import Span, softmax_cross_entropy
from asyncdb.transport import shared

from .actor import Actor, ActorRef
from .downpour import Replica
from .errors import ActorDead, AsyncDBError, ChannelClosed, ConfigError
from .exchange import Buffers, Exchange, Key, PartitionInbox, PartitionLink, exchange_plan
from .params import ParameterLayout
from .registry import register_actor
from .system import PeerPolicy

log = logging.getLogger("asyncdb.modelparallel")


@register_actor("asyncdb.Partition")
class Partition(Replica):
    """Partition `part` of `parts` of replica `index`. `peers` are all the replica's
    partitions (itself included), `shards` and `bounds` the shards holding this
    partition's block, bounds counted from the block's start; `shard_ids` their
    indices among the run's shards."""

    def __init__(self, index: int, part: int, parts: int, peers: list[ActorRef],
                 model: dict[str, Any], shards: list[ActorRef], bounds: list[list[int]],
                 data: dict[str, Any], algorithm: dict[str, Any], seed: int = 0,
                 exchange_timeout: float | None = 300.0, generation: int = 0,
                 shard_ids: list[int] | None = None) -> None:
        whole = Model.from_config(model)
        # which of the run's shards hold this block (`shards` are those, in order)
        self.shard_ids = list(range(len(shards))) if shard_ids is None else shard_ids
        self.part, self.parts = part, parts
        self.shares = [whole.partition(q, parts) for q in range(parts)]
        self.share = self.shares[part]
        self.plan = exchange_plan(self.shares, part)
        super().__init__(index, model, shards, bounds, data, algorithm, seed, generation)
        self.peers = peers
        self.exchange = Exchange(exchange_timeout)
        self.links: dict[int, PartitionLink] = {}
        self.buffers: list[Buffers] = []
        self.counts["exchange_bytes"] = 0
        self.timing = {"exchange_wait_s": 0.0, "compute_s": 0.0}
        self.exchange_steps = 0  # steps this partition has exchanged (train or gradient)

    @classmethod
    def admit(cls, config: dict[str, Any], policy: PeerPolicy) -> None:
        """As a replica's, and a partition count one connection could own."""
        super().admit(config, policy)
        part, parts = config.get("part"), config.get("parts")
        if not (isinstance(parts, int) and isinstance(part, int)
                and 0 <= part < parts <= policy.max_actors):
            raise ConfigError(f"partition {part!r} of {parts!r}: a replica has 1 to "
                              f"{policy.max_actors} partitions here")

    def _parameter_layout(self) -> ParameterLayout:
        return ParameterLayout(self.share.param_shapes())

    def _adopt(self, shards: list[ActorRef]) -> None:
        """`shards` are all the run's: this partition talks to those of its block."""
        super()._adopt([shards[i] for i in self.shard_ids])

    async def on_start(self) -> None:
        await self.node.spawn(PartitionInbox, name=f"{self.ref.name}-inbox",
                              config={"exchange": self.exchange})
        self.links = {q: PartitionLink(self.node.ref(p.node_id, f"{p.name}-inbox"))
                      for q, p in enumerate(self.peers) if q != self.part}
        peer_nodes = {p.node_id for p in self.peers} - {self.node.id}

        def lost(peer: str, error: BaseException) -> None:
            if peer in peer_nodes:
                self.exchange.fail(ChannelClosed(f"partition peer node {peer} is gone: {error}"))

        self.node.on_peer_lost(lost)

    async def receive(self, message: dict[str, Any]) -> Any:
        if message.get("op") == "gradient":
            return await self.gradient(message["params"], message["x"], message["y"])
        if message.get("op") == "counts":
            return {**self.counts, **self.timing}
        if message.get("op") == "compute":
            return await self.compute(int(message["start"]), int(message["stop"]),
                                      int(message["steps"]))
        return await super().receive(message)

    async def compute(self, start: int, stop: int, steps: int) -> dict[str, Any]:
        """`steps` forward and backward passes with their exchanges on consecutive
        batches of rows [start, stop), at the parameters of one fetch made first;
        nothing pushed. Answers the time they took (what model parallelism speeds up)."""
        await self._fetch()
        x, y = self.arrays["x"], self.arrays["y"]
        batch = self.algorithm.batch_size
        sent, waited = self.counts["exchange_bytes"], self.exchange.wait_seconds
        began = time.perf_counter()
        for i in range(steps):
            lo = start + (i * batch) % max(1, stop - start - batch)
            await self._compute(x[lo:lo + batch], y[lo:lo + batch])
        return {"seconds": time.perf_counter() - began,
                "exchange_bytes": self.counts["exchange_bytes"] - sent,
                "exchange_wait_s": self.exchange.wait_seconds - waited}

    async def train(self, start: int, stop: int, steps: int,
                    unit_rows: dict[str, np.ndarray] | None = None) -> dict[str, Any]:
        return {**await super().train(start, stop, steps, unit_rows), **self.timing}

    async def gradient(self, params: np.ndarray, x: np.ndarray,
                       y: np.ndarray) -> dict[str, Any]:
        """Loss and gradient of this partition's block at `params` (this block, any float
        dtype) on rows (x, y), in step with the peers; nothing fetched or pushed."""
        if params.shape != (self.layout.size,):
            raise ConfigError(f"partition {self.part} has {self.layout.size} parameters, "
                              f"got an array of shape {params.shape}")
        kept = self.param_views, self.grad_views
        grad = np.zeros_like(params)
        self.param_views = self.layout.views(np.array(params))
        self.grad_views = self.layout.views(grad)
        try:
            loss = await self._compute(x, y)
        finally:
            self.param_views, self.grad_views = kept
        return {"loss": loss, "grad": grad}

    async def on_stop(self) -> None:
        self.exchange.fail(ActorDead("partition stopped"))
        await self.node.stop_actor(f"{self.ref.name}-inbox")

    # -- buffers ----------------------------------------------------------------

    def _allocate(self, batch: int, f32: np.dtype[Any]) -> list[Buffers]:
        if self.buffers and self.buffers[0].logits.shape[0] == batch and \
                self.buffers[0].logits.dtype == f32:
            return self.buffers
        share, plan = self.share, self.plan
        classes = share.head.classes
        both: list[Buffers] = []
        for _parity in range(2):
            stages = share.stages
            both.append(Buffers(
                outs=[shared.empty((batch, s.out_span[1] - s.out_span[0]), f32) for s in stages],
                inputs=[np.empty((batch, s.in_span[1] - s.in_span[0]), f32) for s in stages],
                d_outs=[np.empty((batch, s.out_span[1] - s.out_span[0]), f32) for s in stages],
                grad_out=[{q: shared.empty((batch, hi - lo), f32) for q, (lo, hi) in r}
                          for r in plan.recv],
                grad_in=[{q: np.empty((batch, hi - lo), f32) for q, (lo, hi) in sd}
                         for sd in plan.send],
                logits=shared.empty((batch, classes), f32),
                peer_logits={q: np.empty((batch, classes), f32) for q in self.links
                             } if self.part == 0 else {},
                delta=(shared.empty((batch, classes), f32) if self.part == 0
                       else np.empty((batch, classes), f32))))
        self.exchange.targets.clear()
        for a, stage in enumerate(share.stages):
            for q, (lo, hi) in plan.recv[a]:
                cols = slice(lo - stage.in_span[0], hi - stage.in_span[0])
                self.exchange.expect(("act", a, q), (both[0].inputs[a][:, cols],
                                                     both[1].inputs[a][:, cols]))
            for q, _span in plan.send[a]:
                self.exchange.expect(("grad", a, q), (both[0].grad_in[a][q],
                                                      both[1].grad_in[a][q]))
        for q in both[0].peer_logits:
            self.exchange.expect(("logits", 0, q), (both[0].peer_logits[q],
                                                    both[1].peer_logits[q]))
        if self.part != 0:
            assert both[0].delta is not None and both[1].delta is not None
            self.exchange.expect(("delta", 0, 0), (both[0].delta, both[1].delta))
        self.buffers = both
        return both

    async def _send(self, q: int, kind: str, layer: int, step: int, data: np.ndarray) -> None:
        self.counts["exchange_bytes"] += data.nbytes
        await self.links[q].send(kind, layer, self.part, step, data)

    async def _wait(self, keys: list[Key], step: int) -> None:
        if keys:
            await self.exchange.wait(keys, step)

    # -- one step ---------------------------------------------------------------

    async def _compute(self, x: np.ndarray, y: np.ndarray) -> float:
        began, waited = time.perf_counter(), self.exchange.wait_seconds
        step = self.exchange_steps
        self.exchange_steps += 1
        dtype = self.param_views[next(iter(self.param_views))].dtype
        buf = self._allocate(len(x), dtype)[step % 2]
        x = np.asarray(x, dtype)
        h_last = await self._forward(buf, x, step)
        loss, delta = await self._logits(buf, h_last, y, step)
        await self._backward(buf, x, h_last, delta, step)
        wait = self.exchange.wait_seconds - waited
        self.timing["exchange_wait_s"] += wait
        self.timing["compute_s"] += time.perf_counter() - began - wait
        return loss

    def _stage_input(self, buf: Buffers, x: np.ndarray, a: int) -> np.ndarray:
        if a > 0:
            return buf.inputs[a]
        lo, hi = self.share.stages[0].in_span
        return x if (lo, hi) == (0, x.shape[1]) else x[:, lo:hi]

    async def _forward(self, buf: Buffers, x: np.ndarray, step: int) -> np.ndarray:
        """Run the hidden stages; returns my columns of the last activation."""
        share = self.share
        for a, stage in enumerate(share.stages):
            await self._wait([("act", a, q) for q, _ in self.plan.recv[a]], step)
            out = buf.outs[a]
            await shared.released(out)
            stage.forward(self.param_views, self._stage_input(buf, x, a), out)
            if a + 1 < len(share.stages):
                await self._share_activation(buf, a + 1, out, step)
        if share.stages:
            return buf.outs[-1]
        lo, hi = share.own(0)
        return x[:, lo:hi]

    async def _share_activation(self, buf: Buffers, a: int, out: np.ndarray,
                                step: int) -> None:
        """My columns of activation `a` (the output `out` of stage a - 1): to each peer
        that reads them, and into my own stage a's input."""
        own_lo, own_hi = self.share.own(a)
        sends = []
        for q, (lo, hi) in self.plan.send[a]:
            data = out if (lo, hi) == (own_lo, own_hi) else np.ascontiguousarray(
                out[:, lo - own_lo:hi - own_lo])
            sends.append(self._send(q, "act", a, step, data))
        await asyncio.gather(*sends)
        in_lo = self.share.stages[a].in_span[0]
        buf.inputs[a][:, own_lo - in_lo:own_hi - in_lo] = out

    async def _logits(self, buf: Buffers, h_last: np.ndarray, y: np.ndarray,
                      step: int) -> tuple[float, np.ndarray]:
        """Partial logits summed on partition 0, which sends dL/dlogits back."""
        head = self.share.head
        assert buf.delta is not None
        if self.part != 0:
            await shared.released(buf.logits)
            head.partial_logits(self.param_views, h_last, buf.logits)
            await self._send(0, "logits", 0, step, buf.logits)
            await self._wait([("delta", 0, 0)], step)
            return 0.0, buf.delta  # the loss is partition 0's to report
        await shared.released(buf.delta)
        head.partial_logits(self.param_views, h_last, buf.delta)
        await self._wait([("logits", 0, q) for q in buf.peer_logits], step)
        for partial in buf.peer_logits.values():
            buf.delta += partial
        loss, delta = softmax_cross_entropy(buf.delta, y)
        await asyncio.gather(*(self._send(q, "delta", 0, step, delta) for q in self.links))
        return loss, delta

    async def _backward(self, buf: Buffers, x: np.ndarray, h_last: np.ndarray,
                        delta: np.ndarray, step: int) -> None:
        share, grads = self.share, self.grad_views
        stages = share.stages
        share.head.backward(self.param_views, h_last, delta, grads,
                            buf.d_outs[-1] if stages else None)
        for a in range(len(stages) - 1, -1, -1):
            d_out = buf.d_outs[a]
            if a + 1 < len(stages):
                await self._wait([("grad", a + 1, q) for q, _ in self.plan.send[a + 1]], step)
                own_lo = share.own(a + 1)[0]
                for q, (lo, hi) in self.plan.send[a + 1]:
                    d_out[:, lo - own_lo:hi - own_lo] += buf.grad_in[a + 1][q]
            spans: list[Span] = []
            targets: list[np.ndarray] = []
            if a > 0:
                spans = [share.own(a), *(span for _, span in self.plan.recv[a])]
                for q, _ in self.plan.recv[a]:
                    await shared.released(buf.grad_out[a][q])
                targets = [buf.d_outs[a - 1], *(buf.grad_out[a][q] for q, _ in self.plan.recv[a])]
            stages[a].backward(self.param_views, self._stage_input(buf, x, a), buf.outs[a],
                               d_out, grads, spans, targets)
            await asyncio.gather(*(self._send(q, "grad", a, step, buf.grad_out[a][q])
                                   for q, _ in self.plan.recv[a]))


class ReplicaClient:
    """Typed calls on a replica actor (`Replica.receive` answers them)."""

    def __init__(self, ref: ActorRef) -> None:
        self.ref = ref

    async def train(self, start: int, stop: int, steps: int,
                    shards: list[ActorRef] | None = None) -> dict[str, Any]:
        message = {"op": "train", "start": start, "stop": stop, "steps": steps}
        if shards is not None:
            message["shards"] = shards
        result: dict[str, Any] = await self.ref.ask(message, timeout=None)
        return result

    async def gradient(self, params: np.ndarray, x: np.ndarray,
                       y: np.ndarray) -> dict[str, Any]:
        """Loss and gradient at `params` on (x, y) (`Partition` and
        `PartitionedReplica` answer it)."""
        result: dict[str, Any] = await self.ref.ask(
            {"op": "gradient", "params": params, "x": x, "y": y}, timeout=None)
        return result

    async def compute(self, start: int, stop: int, steps: int) -> dict[str, Any]:
        """Steps without fetch or push (`Partition.compute`; a `PartitionedReplica`
        answers one summary per partition under "partitions")."""
        result: dict[str, Any] = await self.ref.ask(
            {"op": "compute", "start": start, "stop": stop, "steps": steps}, timeout=None)
        return result

    async def counts(self) -> dict[str, Any]:
        result: dict[str, Any] = await self.ref.ask({"op": "counts"})
        return result


@register_actor("asyncdb.PartitionedReplica")
class PartitionedReplica(Actor):
    """The replica the coordinator sees: runs its partitions' `train` together."""

    def __init__(self, index: int, partitions: list[ActorRef],
                 blocks: list[list[int]]) -> None:
        self.index = index
        self.partitions = partitions
        self.blocks = [(int(lo), int(hi)) for lo, hi in blocks]

    async def receive(self, message: dict[str, Any]) -> Any:
        if message.get("op") == "train":
            return await self.train(int(message["start"]), int(message["stop"]),
                                    int(message["steps"]), message.get("shards"))
        if message.get("op") == "gradient":
            return await self.gradient(message["params"], message["x"], message["y"])
        if message.get("op") == "compute":
            parts = await self._together([
                ReplicaClient(p).compute(int(message["start"]), int(message["stop"]),
                                         int(message["steps"])) for p in self.partitions])
            return {"seconds": max(p["seconds"] for p in parts), "partitions": parts,
                    "exchange_bytes": sum(int(p["exchange_bytes"]) for p in parts)}
        if message.get("op") in ("portion", "flush"):  # Sandblaster: every partition
            return self._portion(message, await self._together(
                [p.ask(message, timeout=None) for p in self.partitions]))
        if message.get("op") == "counts":
            return self._summary(await asyncio.gather(
                *(ReplicaClient(p).counts() for p in self.partitions)))
        raise ConfigError(f"partitioned replica: unknown op {message.get('op')!r}")

    async def gradient(self, params: np.ndarray, x: np.ndarray,
                       y: np.ndarray) -> dict[str, Any]:
        """Loss and flat gradient (partition blocks end to end, as `params`) on (x, y)."""
        if params.shape != (self.blocks[-1][1],):
            raise ConfigError(f"replica {self.index} has {self.blocks[-1][1]} parameters, "
                              f"got an array of shape {params.shape}")
        results = await self._together([
            ReplicaClient(p).gradient(params[lo:hi], x, y)
            for p, (lo, hi) in zip(self.partitions, self.blocks, strict=True)])
        return {"loss": results[0]["loss"],
                "grad": np.concatenate([r["grad"] for r in results])}

    async def train(self, start: int, stop: int, steps: int,
                    shards: list[ActorRef] | None = None) -> dict[str, Any]:
        """Every partition trains the unit; `shards` (all the run's, as they are now)
        go along, so a partition whose shard was re-created finds it."""
        return self._summary(await self._together(
            [ReplicaClient(p).train(start, stop, steps, shards) for p in self.partitions]))

    async def _together(self, calls: list[Any]) -> list[dict[str, Any]]:
        """Run one call per partition; if one fails, abort the others and raise
        `ActorDead` (the replica is lost)."""
        tasks = [asyncio.ensure_future(call) for call in calls]
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        failed = [i for i, t in enumerate(tasks) if t in done and t.exception() is not None]
        if not failed:
            return [t.result() for t in tasks]
        part = failed[0]
        error = tasks[part].exception()
        reason = f"partition {part} of replica {self.index} failed: {error!r}"
        for q, ref in enumerate(self.partitions):
            if q != part:
                with contextlib.suppress(AsyncDBError):
                    await PartitionLink(self.node.ref(ref.node_id, f"{ref.name}-inbox")
                                        ).abort(reason)
        await asyncio.wait(tasks, timeout=30)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        log.warning("replica %d lost: %s", self.index, reason)
        raise ActorDead(f"replica {self.index} lost: {reason}") from error

    @staticmethod
    def _portion(message: dict[str, Any], parts: list[dict[str, Any]]) -> dict[str, Any]:
        """Partition 0's loss; pushed are the portions every partition pushed (each
        pushes its own block to its own shards)."""
        pushed = set.intersection(*(set(p["pushed"]) for p in parts))
        if message["op"] == "flush":
            return {"pushed": sorted(pushed)}
        return {**parts[0], "pushed": sorted(pushed)}

    def _summary(self, parts: list[dict[str, Any]]) -> dict[str, Any]:
        """Partition 0's counters (steps, examples, the loss), the exchange summed."""
        summary = dict(parts[0])
        summary["exchange_bytes"] = sum(int(p.get("exchange_bytes", 0)) for p in parts)
        summary["partitions"] = parts
        return summary


async def spawn_partitioned_replica(
        node: Any, index: int, model: Model, nodes: list[str], shards: list[ActorRef],
        bounds: list[tuple[int, int]], block_bounds: list[tuple[int, int]],
        config: dict[str, Any], kind: type[Partition] | None = None,
        generation: int = 0) -> tuple[ActorRef, list[ActorRef]]:
    """Spawn incarnation `generation` of replica `index` as one partition per node of
    `nodes`, each talking to the shards inside its block, and the `PartitionedReplica`
    over them (on partition 0's node). `kind`: the partition actor (`Partition`,
    Downpour's, by default). Returns that replica and everything spawned, in spawn
    order."""
    parts = len(nodes)
    suffix = f"-g{generation}" if generation else ""
    names = [f"replica{index}-part{p}{suffix}" for p in range(parts)]
    peers = [node.ref(nodes[p], names[p]) for p in range(parts)]
    spawned: list[ActorRef] = []
    for p, (lo, hi) in enumerate(block_bounds):
        mine = [i for i, (s_lo, s_hi) in enumerate(bounds) if lo <= s_lo and s_hi <= hi]
        ref = await node.spawn(kind or Partition, name=names[p], node=nodes[p], config={
            **config, "index": index, "part": p, "parts": parts, "peers": peers,
            **({"generation": generation} if generation else {}),
            "shard_ids": mine,
            "model": model.to_config(), "shards": [shards[i] for i in mine],
            "bounds": [[bounds[i][0] - lo, bounds[i][1] - lo] for i in mine]})
        spawned.append(ref)
    replica = await node.spawn(PartitionedReplica, node=nodes[0], config={
        "index": index, "partitions": spawned, "blocks": [list(b) for b in block_bounds]})
    return replica, [*spawned, replica]
