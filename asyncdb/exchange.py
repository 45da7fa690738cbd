"""What partitions of one replica send each other, and how arrivals are received:
`Exchange` (arrivals into per-parity buffers, waits with a deadline), `PartitionLink`
(the typed sender), `PartitionInbox` (the receiving actor beside each partition), and
`exchange_plan` (which activation columns go from whom to whom)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from asyncdb.models.partition import Partition as Share
from asyncdb.models.partition import Span, overlap

from .actor import Actor, ActorRef
from .errors import ActorDead, ConfigError, Timeout
from .registry import register_actor

Key = tuple[str, int, int]  # (kind, layer, source partition)
EARLY_MAX = 1024  # arrivals kept until their buffers exist (one step's worth is plenty)

class Exchange:
    """Arrivals from peer partitions: where each goes (one buffer per step parity),
    which step last arrived, and the coroutine waiting for a set of them."""

    def __init__(self, timeout: float | None) -> None:
        self.timeout = timeout
        self.targets: dict[Key, tuple[np.ndarray, np.ndarray]] = {}
        self.arrived: dict[tuple[Key, int], int] = {}
        self.error: BaseException | None = None
        self.wait_seconds = 0.0
        self._waiter: asyncio.Future[None] | None = None
        # Arrivals for buffers not made yet (a peer began its first step sooner).
        self._early: list[tuple[Key, int, np.ndarray]] = []

    def expect(self, key: Key, buffers: tuple[np.ndarray, np.ndarray]) -> None:
        self.targets[key] = buffers
        early = [e for e in self._early if e[0] == key]
        self._early = [e for e in self._early if e[0] != key]
        for _key, step, data in early:
            self.deliver(key, step, data)

    def deliver(self, key: Key, step: int, data: np.ndarray) -> None:
        buffers = self.targets.get(key)
        target = None if buffers is None else buffers[step % 2]
        if target is None or data.shape != target.shape or data.dtype != target.dtype:
            if len(self._early) >= EARLY_MAX:
                raise ConfigError(f"partition exchange: nothing expected for {key}, "
                                  f"{data.dtype}{data.shape}")
            self._early.append((key, step, np.array(data)))
            return
        if self.arrived.get((key, step % 2), -1) >= step:
            raise ConfigError(f"partition exchange: {key} for step {step} arrived twice")
        target[...] = data
        self.arrived[(key, step % 2)] = step
        self._wake()

    def fail(self, error: BaseException) -> None:
        if self.error is None:
            self.error = error
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def wait(self, keys: list[Key], step: int) -> None:
        """Until every key has arrived for `step`; raises what `fail` was given, or
        `Timeout` when the peers stay silent for `timeout` seconds."""
        began = time.perf_counter()
        try:
            async with asyncio.timeout(self.timeout):
                while True:
                    if self.error is not None:
                        raise self.error
                    if all(self.arrived.get((k, step % 2)) == step for k in keys):
                        return
                    self._waiter = asyncio.get_running_loop().create_future()
                    await self._waiter
        except TimeoutError as exc:
            raise Timeout(f"partition peers sent nothing for {self.timeout} s") from exc
        finally:
            self.wait_seconds += time.perf_counter() - began


class PartitionLink:
    """Typed sends to a peer partition's inbox (the side that answers is
    `PartitionInbox.receive`)."""

    def __init__(self, inbox: ActorRef) -> None:
        self.inbox = inbox

    async def send(self, kind: str, layer: int, source: int, step: int,
                   data: np.ndarray) -> None:
        await self.inbox.tell({"op": "exchange", "kind": kind, "layer": layer,
                               "source": source, "step": step, "data": data})

    async def abort(self, reason: str) -> None:
        await self.inbox.tell({"op": "abort", "reason": reason})


@register_actor("asyncdb.PartitionInbox")
class PartitionInbox(Actor):
    """Copies each array a peer partition sends into the partition's buffers. Only its
    partition spawns it (its config holds a live object), never a network peer."""

    borrow_arrays = True  # copied out before the handler returns
    network_spawn = False  # made by its partition, beside it, never by a peer

    def __init__(self, exchange: Exchange) -> None:
        self.exchange = exchange

    async def receive(self, message: dict[str, Any]) -> Any:
        op = message.get("op")
        if op == "exchange":
            key = (str(message["kind"]), int(message["layer"]), int(message["source"]))
            self.exchange.deliver(key, int(message["step"]), message["data"])
        elif op == "abort":
            self.exchange.fail(ActorDead(f"replica aborted: {message.get('reason')}"))
        else:
            raise ConfigError(f"partition inbox: unknown op {op!r}")


@dataclass
class Buffers:
    """One step parity's arrays for a batch size."""

    outs: list[np.ndarray]                 # stage a's output (shared)
    inputs: list[np.ndarray]               # stage a's input columns (a >= 1)
    d_outs: list[np.ndarray]               # dL/d(stage a's output)
    grad_out: list[dict[int, np.ndarray]]  # stage a's input-gradient share for peer q (shared)
    grad_in: list[dict[int, np.ndarray]]   # peer q's share for my columns of stage a's input
    logits: np.ndarray                     # partial logits (shared)
    peer_logits: dict[int, np.ndarray] = field(default_factory=dict)
    delta: np.ndarray | None = None        # dL/dlogits: partition 0 sends it, others receive it


@dataclass
class Plan:
    """Who sends what to whom, for the columns of each activation a >= 1."""

    send: list[list[tuple[int, Span]]]     # my columns of activation a that peer q reads
    recv: list[list[tuple[int, Span]]]     # peer q's columns of activation a that I read


def exchange_plan(shares: list[Share], part: int) -> Plan:
    mine = shares[part]
    layers = len(mine.stages)
    send: list[list[tuple[int, Span]]] = [[] for _ in range(layers)]
    recv: list[list[tuple[int, Span]]] = [[] for _ in range(layers)]
    for a in range(1, layers):
        for q, other in enumerate(shares):
            if q == part:
                continue
            out = overlap(mine.own(a), other.stages[a].in_span)
            if out is not None:
                send[a].append((q, out))
            into = overlap(other.own(a), mine.stages[a].in_span)
            if into is not None:
                recv[a].append((q, into))
    return Plan(send, recv)
