from __future__ import annotations

import random

import pytest

from asyncdb import ConfigError
from asyncdb.workqueue import WorkQueue


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_units_go_oldest_first_and_settle():
    q = WorkQueue(3)
    leases = [q.take("a"), q.take("b"), q.take("a")]
    assert [x.unit for x in leases] == [0, 1, 2]
    assert q.take("c") is None  # no backups: nothing more to hand out
    assert all(q.finish(x) for x in leases)
    assert q.drained and not q.done
    q.settle("a", [0, 2])
    q.settle("b", [1])
    assert q.done
    assert q.stats.finished_by == {"a": 2, "b": 1} and q.stats.duplicates == 0


def test_backup_copies_go_to_idle_workers_and_first_result_wins():
    q = WorkQueue(2, backups=True)
    slow, fast = q.take("slow"), q.take("fast")
    assert q.finish(fast)
    copy = q.take("fast")
    assert copy is not None and copy.unit == slow.unit and copy.backup
    assert q.take("slow") is None  # never a copy of what the worker holds itself
    assert q.finish(copy) is True
    assert q.finish(slow) is False  # the straggler's late result is a duplicate
    assert q.stats.backups_issued == 1 and q.stats.backups_used == 1
    assert q.stats.duplicates == 1


def test_copies_are_limited_and_spread():
    q = WorkQueue(3, backups=True, max_copies=2, backup_after=0.0)
    a, b, done = q.take("a"), q.take("b"), q.take("z")
    assert q.take("c") is None  # no unit finished yet: none is known to be late
    assert q.finish(done)
    c = q.take("c")
    d = q.take("d")
    assert {c.unit, d.unit} == {a.unit, b.unit}  # one copy each before a second of one
    assert q.take("e") is None  # both units at max_copies


def test_only_late_units_are_copied():
    clock = Clock()
    q = WorkQueue(2, backups=True, backup_after=2.0, clock=clock)
    fast, slow = q.take("fast"), q.take("slow")
    clock.now = 0.5
    assert q.finish(fast)  # units take 0.5 s so far
    assert q.take("fast") is None  # the slow one is not late yet: no copy
    assert q.next_deadline() == pytest.approx(1.0)  # out twice the mean
    clock.now = 1.0
    copy = q.take("fast")
    assert copy.unit == slow.unit and copy.backup


def test_a_lost_worker_gives_back_its_leases_and_unsettled_results():
    q = WorkQueue(4)
    a0, b1, a2 = q.take("a"), q.take("b"), q.take("a")
    assert q.finish(a0)  # counted, not yet settled
    assert sorted(q.lose("a")) == [0, 2]
    assert q.finish(a2) is False  # a result from a worker given up for lost is dropped
    again = [q.take("b").unit, q.take("b").unit, q.take("b").unit]
    assert sorted(again) == [0, 2, 3]
    assert q.finish(b1)


def test_an_expired_lease_is_reissued_and_both_results_race():
    clock = Clock()
    q = WorkQueue(1, lease_seconds=5.0, clock=clock)
    slow = q.take("slow")
    assert q.take("fast") is None
    assert q.next_deadline() == 5.0
    clock.now = 6.0
    assert q.expire() == [0]
    assert q.expire() == []  # once per lease
    assert q.take("slow") is None  # the straggler does not take its own unit again
    fast = q.take("fast")
    assert fast.unit == 0
    assert q.finish(slow) is True  # whichever comes first counts
    assert q.finish(fast) is False
    assert q.stats.reissued == 1


def test_reopen_and_release():
    q = WorkQueue([7, 9])
    a, b = q.take("a"), q.take("a")
    q.release(a)  # failed without a result: back to pending
    assert q.take("b").unit == 7
    assert q.finish(b)
    q.settle("a", [9])
    q.reopen([9])
    assert q.state[9] == "pending"
    with pytest.raises(ConfigError):
        q.reopen([3])


@pytest.mark.parametrize("seed", range(20))
def test_each_unit_counted_once_whatever_happens(seed):
    """Random takes, finishes (in any order), losses, expiries: every unit settles
    exactly once per time it was counted, and counted units are never double-counted."""
    rng = random.Random(seed)
    clock = Clock()
    q = WorkQueue(12, backups=True, lease_seconds=3.0, clock=clock)
    workers = ["w0", "w1", "w2", "w3"]
    held: dict[str, list] = {w: [] for w in workers}
    counted: dict[int, int] = {}
    for _ in range(2000):
        if q.done:
            break
        clock.now += rng.random()
        q.expire()
        w = rng.choice(workers)
        action = rng.random()
        if action < 0.45:
            lease = q.take(w)
            if lease is not None:
                held[w].append(lease)
        elif action < 0.85 and held[w]:
            lease = held[w].pop(rng.randrange(len(held[w])))
            if q.finish(lease):
                counted[lease.unit] = counted.get(lease.unit, 0) + 1
        elif action < 0.95:
            q.settle(w, q.unsettled(w))
        elif len(workers) > 1 and rng.random() < 0.2:
            unsettled = q.unsettled(w)
            back = q.lose(w)
            assert set(unsettled) <= set(back)
            for u in unsettled:
                counted[u] -= 1  # its result died with the worker
            workers.remove(w)
    for w in workers:  # drain what is left with the survivors
        while not q.done:
            for lease in held[w]:
                if q.finish(lease):
                    counted[lease.unit] = counted.get(lease.unit, 0) + 1
            held[w] = []
            lease = q.take(w)
            if lease is not None:
                held[w].append(lease)
            q.settle(w, q.unsettled(w))
        break
    assert q.done
    assert counted == dict.fromkeys(range(12), 1)


def test_bad_queues_are_refused():
    with pytest.raises(ConfigError):
        WorkQueue(0)
    with pytest.raises(ConfigError):
        WorkQueue([1, 1])
    with pytest.raises(ConfigError):
        WorkQueue(3, lease_seconds=0)
