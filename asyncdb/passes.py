"""Sandblaster's passes: one gradient or loss evaluation over the batch, cut into
portions handed to the replicas through a work queue (`workqueue.py`), the gradient
sums accumulated on the shards, each portion counted exactly once.

A replica that fails is dropped and its portions go to the others; with a `Recovery`
(node processes, peers) it is re-created instead and its new incarnation takes
portions again. A failure that re-created a shard cannot be mended inside a pass (the
vectors of every shard must come from one iteration): the pass raises `ShardsRestored`
and the coordinator goes back to its last checkpoint round.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from .actor import ActorRef
from .errors import ActorDead, ChannelClosed, Timeout, TrainingFailed
from .recovery import Recovery
from .sandblaster import Sandblaster
from .shard_client import ShardClient
from .workqueue import Lease, WorkQueue

log = logging.getLogger("asyncdb.sandblaster")

LOST = (ChannelClosed, ActorDead, Timeout)
MAX_FAILURES = 5  # failed asks in a row, with nothing found dead, before a replica is lost


class ShardsRestored(Exception):
    """A shard was re-created from its checkpoint during a pass: the iteration must be
    done again from the last checkpoint round."""


def shard_generations(recovery: Recovery | None, shards: int) -> tuple[int, ...]:
    """The incarnation of every shard (none without recovery)."""
    if recovery is None:
        return ()
    return tuple(recovery.current("shard", i).generation if recovery.tracks("shard", i)
                 else 0 for i in range(shards))


class Changes:
    """Wakes everyone waiting when something changed (a result, a loss, a busy
    replica). No lock: the waiters and notifiers share one event loop, so a waiter
    that checked its condition cannot miss the notification that follows."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def notify(self) -> None:
        self._event.set()
        self._event = asyncio.Event()

    async def wait(self, timeout: float | None = None) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._event.wait(), timeout)


class Passes:
    """Runs passes over the batch: portions through a work queue to the replicas,
    gradients accumulated on the shards exactly once; see the module docstring."""

    def __init__(self, shards: ShardClient, replicas: list[ActorRef], rows: int,
                 settings: Sandblaster, meter: Any, recovery: Recovery | None = None) -> None:
        self.shards = shards
        self.recovery = recovery
        self.generations = shard_generations(recovery, len(shards) if recovery else 0)
        self.live = dict(enumerate(replicas))
        self.lost: list[int] = []
        self.settings = settings
        self.meter = meter
        size = settings.portion_size
        self.portions = [(lo, min(lo + size, rows)) for lo in range(0, rows, size)]
        self.pass_id = 0
        self.totals = {"backups_issued": 0, "backups_used": 0, "duplicates": 0,
                       "reissued": 0, "taken_back": 0, "passes": 0}
        self.portions_per_replica = dict.fromkeys(self.live, 0)
        self.seconds: dict[int, float] = {}  # each replica's latest time for a portion
        self.away: set[int] = set()  # replicas waiting to be re-created: not counted on

    async def run(self, kind: str, vector: str, target: str | None = None) -> float:
        """The batch's loss sum at `vector` ("x" or "xt"); with `target` ("g" or "gt")
        its gradient sum is accumulated there on the shards."""
        self.pass_id += 1
        self.totals["passes"] += 1
        self._refresh()
        n = len(self.portions)
        if target is not None:
            await self.shards.begin(self.pass_id, n, target)
        losses: dict[int, float] = {}
        units: list[int] = list(range(n))
        push_every = self.settings.push_every
        while units:
            queue = WorkQueue(units, backups=self.settings.backup_tasks,
                              lease_seconds=self.settings.lease_seconds)
            await self._drain(queue, kind, vector, push_every, losses)
            units = await self.shards.missing(self.pass_id) if target is not None else []
            if units:
                log.warning("pass %d: shards miss portions %s; doing them again",
                            self.pass_id, units)
            push_every = 1  # portions pushed again go one by one: none is counted twice
        return sum(losses[u] for u in range(n))

    def _refresh(self) -> None:
        """Replicas re-created since the last pass take part under their new refs."""
        recovery = self.recovery
        if recovery is None:
            return
        for r in list(self.live):
            if recovery.tracks("replica", r):
                self.live[r] = recovery.current("replica", r).ref

    async def _drain(self, queue: WorkQueue, kind: str, vector: str, push_every: int,
                     losses: dict[int, float]) -> None:
        """Until every portion is settled. A replica still busy on a portion whose
        backup already counted is not waited for: its ask is dropped, and what it
        holds is found on the shards or done again by the others (`_unstick`)."""
        changed = Changes()
        busy: set[int] = set()
        feeders = [asyncio.ensure_future(self._feed(r, queue, kind, vector, push_every,
                                                    losses, changed, busy))
                   for r in list(self.live)]
        running = set(feeders)
        try:
            while not queue.done and running:
                for task in [t for t in running if t.done()]:
                    running.discard(task)
                    if task.exception() is not None:  # a feeder that failed fails the pass
                        raise task.exception()  # type: ignore[misc]
                if self._stuck(queue, busy):
                    await self._unstick(queue, busy, kind, changed)
                    continue
                if not any(task.done() for task in running):
                    await changed.wait()
        finally:
            for task in feeders:
                task.cancel()
            await asyncio.gather(*feeders, return_exceptions=True)
        stats = queue.stats
        for key in ("backups_issued", "backups_used", "duplicates", "reissued"):
            self.totals[key] += getattr(stats, key)
        if kind == "grad":  # loss-only portions are not counted here
            for r in self.portions_per_replica:
                self.portions_per_replica[r] += stats.finished_by[r]
        if not queue.done:
            raise TrainingFailed(f"every replica was lost (pass {self.pass_id}); "
                                 f"lost: {self.lost}")

    @staticmethod
    def _stuck(queue: WorkQueue, busy: set[int]) -> bool:
        """Every portion has a result, and the only ones not yet durable are held by
        replicas busy with something else (a straggler's superseded copy)."""
        held = {queue.holder[u] for u in queue.holder}
        return queue.drained and bool(held) and held <= busy

    async def _unstick(self, queue: WorkQueue, busy: set[int], kind: str,
                       changed: Changes) -> None:
        """Settle what the shards already counted; give back what a busy replica still
        holds, for the idle ones to do again (a late push of it is a duplicate the
        shards drop)."""
        if kind == "grad":
            missing = set(await self.shards.missing(self.pass_id))
            for unit, holder in list(queue.holder.items()):
                if unit not in missing:
                    queue.settle(holder, [unit])
        for holder in {queue.holder[u] for u in queue.holder} & busy:
            back = queue.lose(holder)
            self.totals["taken_back"] += len(back)
        changed.notify()

    async def _ask(self, r: int, message: dict[str, Any]) -> Any:
        reply = await self.live[r].ask(message)
        self.meter(reply)
        return reply

    async def _feed(self, r: int, queue: WorkQueue, kind: str, vector: str,
                    push_every: int, losses: dict[int, float],
                    changed: Changes, busy: set[int]) -> None:
        failures = 0
        try:
            while True:
                try:
                    await self._feed_loop(r, queue, kind, vector, push_every, losses,
                                          changed, busy)
                    return
                except LOST as exc:  # the replica, its node or a shard is gone
                    back = queue.lose(r)
                    changed.notify()
                    if not await self._comes_back(r, exc, failures):
                        self._lose(r, back, exc)
                        return
                    failures += 1
        finally:  # ended, failed or lost: the drain looks again
            changed.notify()

    async def _comes_back(self, r: int, exc: BaseException, failures: int) -> bool:
        """After replica `r`'s ask failed: wait for recovery, then whether it goes on
        (its new incarnation, or itself when nothing was found dead).
        `ShardsRestored` if a shard was re-created meanwhile."""
        recovery = self.recovery
        if recovery is None or not recovery.tracks("replica", r) or failures >= MAX_FAILURES:
            return False
        site = recovery.current("replica", r)
        before = site.generation
        shard_nodes = [recovery.current("shard", i).node for i in range(len(self.shards))]
        recovery.suspect([*site.nodes, *shard_nodes])
        self.away.add(r)
        try:
            await recovery.settled()
        finally:
            self.away.discard(r)
        if shard_generations(recovery, len(self.shards)) != self.generations:
            raise ShardsRestored(f"a shard was re-created during pass {self.pass_id}")
        if not recovery.tracks("replica", r):  # given up on
            return False
        site = recovery.current("replica", r)
        if site.generation != before:
            self.live[r] = site.ref
            log.info("replica %d is back (generation %d) in pass %d", r, site.generation,
                     self.pass_id)
        elif failures:  # nothing found dead yet: give a report time to come
            await asyncio.sleep(min(0.05 * 2 ** failures, 1.0))
        log.debug("replica %d goes on after %s", r, exc)
        return True

    async def _feed_loop(self, r: int, queue: WorkQueue, kind: str, vector: str,
                         push_every: int, losses: dict[int, float],
                         changed: Changes, busy: set[int]) -> None:
        verdict: list[list[Any]] = []
        taken = 0  # a replica's first portion of a pass is always given: it times it again
        while not queue.done:
            queue.expire()
            lease = queue.take(r) if not taken or self._in_time(r, queue) else None
            if lease is None:
                if verdict or queue.unsettled(r):
                    reply = await self._ask(r, {"op": "flush", "pass": self.pass_id,
                                                "verdict": verdict})
                    verdict = []
                    queue.settle(r, reply["pushed"])
                    changed.notify()
                    continue
                await self._wait(queue, changed)
                continue
            # near the end of a pass (less left than a round of accumulating for
            # everyone) results are pushed at once: nobody sits on counted portions
            every = 1 if len(queue.pending) < len(self.live) * push_every else push_every
            taken += 1
            began = queue.clock()
            reply = await self._busy(r, busy, changed, self._portion(
                lease, kind, vector, every, verdict, first=taken == 1))
            self.seconds[r] = queue.clock() - began
            verdict = []
            queue.settle(r, reply["pushed"])
            if queue.finish(lease):
                losses[lease.unit] = float(reply["loss_sum"])
                if kind == "grad":
                    verdict.append([lease.unit, True])
                else:
                    queue.settle(r, [lease.unit])
            elif kind == "grad":
                verdict.append([lease.unit, False])
            changed.notify()

    def _in_time(self, r: int, queue: WorkQueue) -> bool:
        """With backups on, a replica's next portion of a pass (or backup copy) goes to
        it only if its last portion took less than the others would need to finish
        theirs and do what is left (at least twice their mean): a straggler waits for
        the next pass instead of holding work the others must copy. The fastest
        replica always qualifies, so nothing is left undone."""
        mine = self.seconds.get(r)
        others = [self.seconds[o] for o in self.live
                  if o != r and o in self.seconds and o not in self.away]
        if not self.settings.backup_tasks or mine is None or not others:
            return True
        rounds = -(-len(queue.pending) // len(others))  # what is left, shared out
        return mine < max(2, rounds + 1) * sum(others) / len(others)

    async def _busy(self, r: int, busy: set[int], changed: Changes,
                    message: dict[str, Any]) -> Any:
        """Ask replica `r` for a portion, marked busy meanwhile (the drain may stop
        waiting for it)."""
        busy.add(r)
        changed.notify()
        try:
            return await self._ask(r, message)
        finally:
            busy.discard(r)

    def _portion(self, lease: Lease, kind: str, vector: str, push_every: int,
                 verdict: list[list[Any]], first: bool = False) -> dict[str, Any]:
        lo, hi = self.portions[lease.unit]
        message = {"op": "portion", "pass": self.pass_id, "vector": vector, "kind": kind,
                   "portion": lease.unit, "rows": [lo, hi], "verdict": verdict,
                   "push_every": push_every}
        if first:  # where the point is fetched: the shards as they are now
            message["shards"] = list(self.shards.shards)
        return message

    async def _wait(self, queue: WorkQueue, changed: Changes) -> None:
        deadline = queue.next_deadline()
        timeout = None if deadline is None else max(0.0, deadline - queue.clock())
        await changed.wait(timeout)  # on timeout a lease is late: expire() re-issues it

    def _lose(self, r: int, back: list[int], exc: BaseException) -> None:
        self.live.pop(r, None)
        if r not in self.lost:
            self.lost.append(r)
        log.warning("replica %d lost in pass %d (%s: %s); portions %s go to the others; "
                    "%d replicas left", r, self.pass_id, type(exc).__name__, exc, back,
                    len(self.live))
        if not self.live:
            raise TrainingFailed(f"every replica was lost (pass {self.pass_id})") from exc

