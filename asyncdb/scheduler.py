"""Handing units of work to replicas: one worker loop per replica over a `WorkQueue`.

A worker leases a unit, asks its replica to do it (with a deadline), and reports the
result to the queue. An ask that fails because the replica, a shard or a node is gone
gives the unit back to the queue at once, so another replica takes it; with a
`Recovery`, the worker waits for the failed actors to be re-created and goes on with
its replica's new incarnation, and without one its replica is lost for the run. No
wait is unbounded: every ask has the unit deadline, and recovery gives up with a
clear error when it cannot bring an actor back.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from .actor import ActorRef
from .errors import ActorDead, AllReplicasLost, ChannelClosed, Timeout
from .recovery import Events, Recovery
from .workqueue import FINISHED, SETTLED, WorkQueue

log = logging.getLogger("asyncdb.scheduler")

Message = Callable[[int, int], dict[str, Any]]  # (unit, replica) -> the unit's message
ShardsGone = Callable[[], Awaitable[list[int]]]
Accept = Callable[[int, int, dict[str, Any]], None]  # (unit, replica, result)
Redo = Callable[[int, int], Awaitable[None]]  # (unit, replica): its attempt failed
LOST = (ChannelClosed, ActorDead, Timeout)
MAX_FAILURES = 5  # failed units in a row, with nothing found dead, before a replica is lost


class UnitScheduler:
    """Runs queues of units on replicas `0 .. replicas-1`; see the module docstring."""

    def __init__(self, replicas: list[ActorRef], events: Events, *,
                 recovery: Recovery | None = None, unit_timeout: float | None = None,
                 shard_nodes: Callable[[], list[str]] = list,
                 shards_gone: ShardsGone | None = None, redo: Redo | None = None) -> None:
        self.refs = list(replicas)
        self.events = events
        self.recovery = recovery
        self.unit_timeout = unit_timeout
        self.shard_nodes = shard_nodes
        self.shards_gone = shards_gone
        self.redo = redo  # told of a failed attempt before its unit goes back
        self.lost: list[int] = []
        self.retired: set[int] = set()  # removed on request: take no more units
        self.stopping = False
        self.reassigned = 0
        self._changed = asyncio.Event()
        self._draining: tuple[WorkQueue, Message, Accept] | None = None
        self._workers: dict[int, asyncio.Future[None]] = {}

    def stop(self) -> None:
        """Hand out no more units; the ones in flight finish."""
        self.stopping = True
        self._changed.set()

    def alive(self) -> list[int]:
        return [i for i in range(len(self.refs))
                if i not in self.lost and i not in self.retired]

    def add(self, ref: ActorRef) -> int:
        """One more replica: its index. During a drain it takes units at once."""
        self.refs.append(ref)
        index = len(self.refs) - 1
        if self._draining is not None and not self.stopping:
            queue, message, accept = self._draining
            self._workers[index] = asyncio.ensure_future(
                self._worker(index, queue, message, accept))
            self._changed.set()
        return index

    def units_left(self) -> int:
        """Units of the queue being drained that are not finished yet."""
        if self._draining is None:
            return 0
        queue = self._draining[0]
        return sum(1 for state in queue.state.values() if state not in (FINISHED, SETTLED))

    async def retire(self, replica: int) -> None:
        """Replica `replica` takes no more units; returns once the one it is doing (if
        any) is done."""
        self.retired.add(replica)
        self._changed.set()
        worker = self._workers.get(replica)
        if worker is not None:
            await asyncio.wait([worker])

    def ref(self, replica: int) -> ActorRef:
        if self.recovery is not None and self.recovery.tracks("replica", replica):
            return self.recovery.current("replica", replica).ref
        return self.refs[replica]

    async def drain(self, queue: WorkQueue, replicas: list[int], message: Message,
                    accept: Accept) -> None:
        """Run every unit of `queue` on `replicas` until all are done (or `stop`)."""
        self._draining = (queue, message, accept)
        self._workers = {i: asyncio.ensure_future(self._worker(i, queue, message, accept))
                         for i in replicas if i not in self.lost and i not in self.retired}
        try:
            while True:  # replicas added meanwhile bring workers of their own
                running = [w for w in self._workers.values() if not w.done()]
                if not running:
                    break
                await asyncio.wait(running, return_when=asyncio.FIRST_EXCEPTION)
                for worker in self._workers.values():
                    if worker.done() and worker.exception() is not None:
                        raise worker.exception()  # type: ignore[misc]
        finally:
            self._draining = None
            workers = list(self._workers.values())
            for worker in workers:
                worker.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
        if not queue.drained and not self.stopping:
            if self.recovery is not None:  # RecoveryFailed, if a shard is why
                await self.recovery.settled()
            raise AllReplicasLost(f"every replica was lost with {len(queue.pending)} units "
                                  "of work left")

    async def drain_in_turn(self, queue: WorkQueue, message: Message, accept: Accept) -> None:
        """Run `queue` on one replica at a time: the first live one, then the next if
        it is lost (warm start)."""
        for i in range(len(self.refs)):
            if i in self.lost:
                continue
            await self._worker(i, queue, message, accept)
            if queue.drained or self.stopping:
                return
        raise AllReplicasLost("every replica was lost during warm start")

    async def _worker(self, replica: int, queue: WorkQueue, message: Message,
                      accept: Accept) -> None:
        failures = 0
        while not self.stopping and replica not in self.retired:
            lease = queue.take(replica)
            if lease is None:
                if queue.drained:
                    return
                self._changed.clear()
                await self._changed.wait()  # a unit may come back from a lost replica
                continue
            try:
                result = await self.ref(replica).ask(message(lease.unit, replica),
                                                     timeout=self.unit_timeout)
            except LOST as exc:
                if self.redo is not None:
                    await self.redo(lease.unit, replica)
                queue.release(lease)
                self._changed.set()
                self.reassigned += 1
                self.events.record("reassigned", unit=lease.unit, replica=replica,
                                   reason=f"{type(exc).__name__}: {exc}")
                if not await self._survives(replica, exc, failures):
                    return
                failures += 1
                continue
            failures = 0
            if queue.finish(lease):
                queue.settle(replica, [lease.unit])
                accept(lease.unit, replica, result)
            self._changed.set()

    async def _survives(self, replica: int, error: BaseException, failures: int) -> bool:
        """After a failed unit: whether `replica` goes on (its new incarnation, or the
        same one when something else failed)."""
        recovery = self.recovery
        if recovery is None and self.shards_gone is not None:
            gone = await self.shards_gone()
            if gone:  # nothing re-creates a shard here: the run cannot go on
                log.error("replica %d failed and shards %s are unreachable: %s", replica,
                          gone, error)
                raise type(error)(f"shard {gone[0]} is unreachable, so the run cannot go on "
                                  f"(replica {replica}: {error})") from error
        if recovery is None or not recovery.tracks("replica", replica) \
                or failures >= MAX_FAILURES:
            if recovery is not None:  # a shard that cannot come back is the run's end
                recovery.suspect(self.shard_nodes())
                await recovery.settled()
            self.lost.append(replica)
            log.warning("replica %d lost (%s); training goes on with %d replicas",
                        replica, error, len(self.alive()))
            self.events.record("lost", role="replica", index=replica, reason=str(error))
            return False
        site = recovery.current("replica", replica)
        recovery.suspect([*site.nodes, *self.shard_nodes()])
        await recovery.settled()
        if not recovery.tracks("replica", replica):  # given up on: lost for this run
            return await self._survives(replica, error, MAX_FAILURES)
        if failures:  # the failure is not reported yet: give the report time to come
            await asyncio.sleep(min(0.05 * 2 ** failures, 1.0))
        return True
