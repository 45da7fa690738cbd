"""The work queue: units of work handed to workers under leases, each counted once.

One queue holds the units of one round (a Sandblaster gradient pass, an epoch's
shards of data) and is driven by whoever schedules them; it does no I/O and keeps no
clock of its own beyond the `clock` it is given, so it is tested without actors.

A unit goes through four states:

    pending --take--> leased --finish (first result)--> finished --settle--> settled

- `take(worker)` leases a pending unit (oldest first). When none is pending and
  backups are on, an idle worker gets a *backup copy* of an outstanding unit it does
  not hold (the one with the fewest copies, leased longest ago), up to `max_copies`
  live leases per unit, once the unit has been out `backup_after` times the mean time
  units took so far (a straggler's, not one about to finish: copies cost work).
- `finish(lease)` reports a result. The first result of a live lease counts (True)
  and the unit is held by that worker until it `settle`s it (its result is durable:
  the gradient reached the shards); every other copy's result, and any result on a
  lease that ended (its worker was given up as lost), is a duplicate (False).
- `lose(worker)`: the worker is gone. Its leases end, and units it finished but had
  not settled go back to pending (their results died with it).
- `expire()`: a lease past its deadline (`lease_seconds`) marks a straggler; its unit
  is re-issued (pending again) while the straggler's lease stays valid: whichever
  result comes first counts.
- `reopen(units)`: settled units found missing downstream are done again.

Invariant: a unit is counted (finish returns True) once each time it goes from pending
to finished, so whatever copies, losses and expiries happen, each settled unit was
counted once (and once more only after `lose` or `reopen` said its result was gone).
"""

from __future__ import annotations

import itertools
import time
from collections import Counter, deque
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field

from .errors import ConfigError

PENDING, LEASED, FINISHED, SETTLED = "pending", "leased", "finished", "settled"


@dataclass(frozen=True, eq=False)  # a lease is itself, whatever its fields
class Lease:
    """One worker's permission to compute one unit; `backup` if it is a copy."""

    unit: int
    worker: Hashable
    serial: int
    issued: float
    deadline: float | None
    backup: bool = False


@dataclass
class QueueStats:
    issued: int = 0
    reissued: int = 0
    backups_issued: int = 0
    backups_used: int = 0
    duplicates: int = 0
    lost: int = 0
    finished_by: Counter[Hashable] = field(default_factory=Counter)


class WorkQueue:
    """Units `0 .. units-1` of one round (or the ids given), leased to workers."""

    def __init__(self, units: int | Iterable[int], *, backups: bool = False,
                 lease_seconds: float | None = None, max_copies: int = 2,
                 backup_after: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        ids = list(range(units)) if isinstance(units, int) else list(units)
        if not ids:
            raise ConfigError("a work queue needs at least one unit")
        if len(set(ids)) != len(ids):
            raise ConfigError("unit ids must be distinct")
        if lease_seconds is not None and lease_seconds <= 0:
            raise ConfigError("lease_seconds must be positive (or None: no deadline)")
        if max_copies < 1:
            raise ConfigError("max_copies must be at least 1")
        if backup_after < 0:
            raise ConfigError("backup_after cannot be negative")
        self.backup_after = backup_after
        self._took: list[float] = []  # how long finished units were out
        self.backups = backups
        self.lease_seconds = lease_seconds
        self.max_copies = max_copies
        self.clock = clock
        self.state = dict.fromkeys(ids, PENDING)
        self.pending: deque[int] = deque(ids)
        self.leases: dict[int, list[Lease]] = {u: [] for u in ids}
        self.holder: dict[int, Hashable] = {}  # finished, not settled: who holds it
        self.stats = QueueStats()
        self._serial = itertools.count()
        self._expired: set[int] = set()

    # -- questions ---------------------------------------------------------------------

    @property
    def units(self) -> list[int]:
        return list(self.state)

    @property
    def done(self) -> bool:
        """Every unit settled."""
        return all(s == SETTLED for s in self.state.values())

    @property
    def drained(self) -> bool:
        """Nothing pending or leased: every unit finished or settled."""
        return all(s in (FINISHED, SETTLED) for s in self.state.values())

    def outstanding(self) -> list[int]:
        return [u for u, s in self.state.items() if s == LEASED]

    def unsettled(self, worker: Hashable) -> list[int]:
        return [u for u, w in self.holder.items() if w == worker]

    def next_deadline(self) -> float | None:
        """When `expire` or `take` may next have something new: a lease deadline, or
        an outstanding unit becoming old enough for a backup copy."""
        deadlines = [lease.deadline for u in self.outstanding() for lease in self.leases[u]
                     if lease.deadline is not None and lease.serial not in self._expired]
        if self.backups and self._took:
            deadlines += [self._backup_time(u) for u in self.outstanding()
                          if len(self.leases[u]) < self.max_copies]
        return min(deadlines, default=None)

    def _backup_time(self, unit: int) -> float:
        first = min(x.issued for x in self.leases[unit])
        return first + self.backup_after * sum(self._took) / len(self._took)

    # -- transitions ---------------------------------------------------------------

    def take(self, worker: Hashable) -> Lease | None:
        """A lease for `worker`: a pending unit, else a backup copy, else None."""
        for unit in self.pending:  # oldest first; a straggler does not retake its own
            if self.state[unit] == PENDING or not self._holds(unit, worker):
                self.pending.remove(unit)
                return self._lease(unit, worker, backup=False)
        if not self.backups:
            return None
        if not self._took:
            return None  # no unit finished yet: nothing says which one is late
        now = self.clock()
        candidates = [u for u in self.outstanding() if not self._holds(u, worker)
                      and len(self.leases[u]) < self.max_copies
                      and self._backup_time(u) <= now]
        if not candidates:
            return None
        unit = min(candidates, key=lambda u: (len(self.leases[u]),
                                              min(x.issued for x in self.leases[u])))
        self.stats.backups_issued += 1
        return self._lease(unit, worker, backup=True)

    def finish(self, lease: Lease) -> bool:
        """Report `lease`'s result: True if it is the first (count it), else False."""
        live = self.leases.get(lease.unit, [])
        if lease in live and self.state[lease.unit] == LEASED:
            self._took.append(self.clock() - lease.issued)
            self.state[lease.unit] = FINISHED
            self.holder[lease.unit] = lease.worker
            self.leases[lease.unit] = []
            self._drop_pending(lease.unit)
            self.stats.finished_by[lease.worker] += 1
            if lease.backup:
                self.stats.backups_used += 1
            return True
        if lease in live:
            live.remove(lease)
        self.stats.duplicates += 1
        return False

    def release(self, lease: Lease) -> None:
        """The worker gave `lease` back without a result (it failed on it)."""
        live = self.leases.get(lease.unit, [])
        if lease in live:
            live.remove(lease)
            if not live and self.state[lease.unit] == LEASED:
                self._requeue(lease.unit)

    def settle(self, worker: Hashable, units: Iterable[int]) -> None:
        """`worker`'s results for `units` are durable."""
        for unit in units:
            if self.holder.get(unit) == worker:
                del self.holder[unit]
                self.state[unit] = SETTLED

    def lose(self, worker: Hashable) -> list[int]:
        """`worker` is gone: end its leases and re-queue what only it had. Returns the
        units that went back to pending."""
        back: list[int] = []
        for unit, live in self.leases.items():
            mine = [x for x in live if x.worker == worker]
            for lease in mine:
                live.remove(lease)
            if mine and not live and self.state[unit] == LEASED:
                back.append(unit)
        back += [u for u, w in self.holder.items() if w == worker]
        for unit in back:
            self.holder.pop(unit, None)
            self._requeue(unit)
        self.stats.lost += len(back)
        return back

    def expire(self) -> list[int]:
        """Re-issue units whose every lease is past its deadline (stragglers)."""
        now = self.clock()
        late = [u for u in self.outstanding()
                if all(self._late(x, now) for x in self.leases[u]) and u not in self.pending]
        for unit in late:
            self.pending.append(unit)
            self.stats.reissued += 1
            self._expired.update(x.serial for x in self.leases[unit])  # once per lease
        return late

    def _late(self, lease: Lease, now: float) -> bool:
        return (lease.deadline is not None and lease.deadline <= now
                and lease.serial not in self._expired)

    def reopen(self, units: Iterable[int]) -> None:
        """Settled units whose results were found missing: pending again."""
        for unit in units:
            if unit not in self.state:
                raise ConfigError(f"unit {unit} is not in this queue")
            if self.state[unit] == SETTLED:
                self._requeue(unit)

    # -- inner ------------------------------------------------------------------------

    def _lease(self, unit: int, worker: Hashable, backup: bool) -> Lease:
        now = self.clock()
        deadline = None if self.lease_seconds is None else now + self.lease_seconds
        lease = Lease(unit, worker, next(self._serial), now, deadline, backup)
        self.state[unit] = LEASED
        self.leases[unit].append(lease)
        self.stats.issued += 1
        return lease

    def _holds(self, unit: int, worker: Hashable) -> bool:
        return any(x.worker == worker for x in self.leases[unit])

    def _requeue(self, unit: int) -> None:
        self.state[unit] = PENDING
        self.leases[unit] = []
        if unit not in self.pending:
            self.pending.append(unit)
        self.stats.reissued += 1

    def _drop_pending(self, unit: int) -> None:
        if unit in self.pending:
            self.pending.remove(unit)
