"""Fault tolerance with real processes and real signals: runs complete through kill -9
and SIGSTOP of replicas and shards, shards come back from checkpoints, replaced
replicas are fenced, and a run killed with its driver resumes from its checkpoints."""

from __future__ import annotations

import asyncio
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from processes import kill_9_when

import asyncdb
from asyncdb.models import MLP
from asyncdb.placement import split_rows

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def teacher() -> asyncdb.datasets.Dataset:
    return asyncdb.datasets.load("teacher", n=12_000, features=32, test=1000, seed=3)


def _model() -> MLP:
    return MLP([32, 64, 10])


async def _run_with_fault(data, *, victim: str, sig: int, tmp_path: Path,
                          liveness: float = 10.0) -> asyncdb.Run:
    """A 2-shard, 2-replica local run; `victim` ("shard" or "replica") 1's process gets
    `sig` once training is under way."""
    algorithm = asyncdb.Downpour(batch_size=32, unit_steps=40)
    async with asyncdb.Cluster.local(shards=2, replicas=2, liveness=liveness) as cluster:
        assert cluster.nodes is not None
        target = cluster.nodes.ids[1 if victim == "shard" else 3]
        under_way = asyncio.Event()
        training = asyncio.create_task(cluster.train(
            _model(), data, algorithm=algorithm, epochs=6, eval_every=0.1,
            checkpoint_dir=tmp_path / "ckpt", checkpoint_every=0.2,
            on_progress=lambda entry: entry["time"] > 0.6 and under_way.set()))
        await asyncio.wait_for(under_way.wait(), 60)
        assert not training.done()
        pid = cluster.nodes.processes[target].pid
        os.kill(pid, sig)
        run = await asyncio.wait_for(training, 120)
        if sig == signal.SIGSTOP:
            assert cluster.nodes.processes[target].exited.done()  # killed, not left stopped
    return run


def _events(run: asyncdb.Run, kind: str) -> list[dict]:
    return [e for e in run.events if e["event"] == kind]


@pytest.mark.parametrize("victim", ["replica", "shard"])
async def test_kill_9_of_a_process_does_not_lose_the_run(teacher, victim, tmp_path):
    run = await _run_with_fault(teacher, victim=victim, sig=signal.SIGKILL, tmp_path=tmp_path)
    assert run.lost == []
    assert run.units["done"] == run.units["planned"]
    failure = _events(run, "failure")
    assert len(failure) == 1 and [victim, 1] in failure[0]["actors"]
    assert "died" in failure[0]["reason"]
    recovered = _events(run, "recovered")
    assert [(e["role"], e["index"], e["generation"]) for e in recovered] == [(victim, 1, 1)]
    if victim == "shard":  # from a checkpoint taken during the run, not initial values
        assert [e["version"] > 0 for e in _events(run, "restored")] == [True]
    else:  # the unit went on from its last push both shards applied, not from its start
        assert run.units["examples_kept"] > 0
        planned = sum(math.ceil(6 * (hi - lo) / 32)
                      for lo, hi in split_rows(len(teacher.x_train), 2))
        # one push a step: every planned step once on each shard, plus the steps whose
        # push reached one shard only (lost, then redone)
        assert sum(s["updates"] for s in run.shards) == \
            2 * planned + run.units["examples_lost"] // 32
    assert run.final["test_accuracy"] > 0.6


@pytest.mark.parametrize("victim", ["replica", "shard"])
async def test_a_frozen_process_is_killed_and_replaced(teacher, victim, tmp_path):
    run = await _run_with_fault(teacher, victim=victim, sig=signal.SIGSTOP, tmp_path=tmp_path,
                                liveness=0.5)
    assert run.units["done"] == run.units["planned"]
    failure = _events(run, "failure")
    assert len(failure) == 1 and "frozen" in failure[0]["reason"]
    assert _events(run, "recovered")[0]["role"] == victim
    assert run.final["test_accuracy"] > 0.6


async def test_partitioned_replicas_go_on_with_a_re_created_shard(teacher, tmp_path):
    """A shard's death aborts the units in flight, and with them the partitions'
    lockstep: each partitioned replica is re-created beside the shard, and the new
    partitions talk to the re-created shard."""
    under_way, on_progress = _under_way(0.5)
    async with asyncdb.Cluster.local(shards=2, replicas=2, partitions=2) as cluster:
        shard = next(a for a in cluster.describe() if a["role"] == "shard" and a["index"] == 1)
        training = asyncio.create_task(cluster.train(
            _model(), teacher, algorithm=asyncdb.Downpour(batch_size=32, unit_steps=20),
            epochs=6, eval_every=0.1, checkpoint_every=0.2, on_progress=on_progress))
        await asyncio.wait_for(under_way.wait(), 60)
        os.kill(shard["pid"], signal.SIGKILL)
        run = await asyncio.wait_for(training, 180)
    recovered = sorted((e["role"], e["index"]) for e in _events(run, "recovered"))
    assert recovered == [("replica", 0), ("replica", 1), ("shard", 1)]
    assert run.lost == [] and _events(run, "abandoned") == []
    assert run.units["done"] == run.units["planned"]
    assert run.final["test_accuracy"] > 0.6


async def test_a_replaced_replica_generation_is_refused_by_shards():
    async with asyncdb.Node("driver") as node:
        shard = await node.spawn(asyncdb.ParameterShard, config={
            "index": 0, "values": np.zeros(4, np.float32),
            "optimizer": asyncdb.SGD(lr=1.0).to_config()})
        grad = np.ones(4, np.float32)
        await shard.ask({"op": "push", "grad": grad, "version": 0, "sender": [1, 0]})
        await shard.ask({"op": "fence", "fences": {"1": 1}})
        with pytest.raises(asyncdb.UpdateRejected, match="replaced"):
            await shard.ask({"op": "push", "grad": grad, "version": 0, "sender": [1, 0]})
        await shard.ask({"op": "push", "grad": grad, "version": 0, "sender": [1, 1]})
        stats = await shard.ask({"op": "stats"})
        assert stats["updates"] == 2 and stats["fenced"] == 1
        values = (await shard.ask({"op": "fetch"}))["values"]
        np.testing.assert_array_equal(values, -2 * grad)  # the refused push left no trace


DRIVER = """
import asyncio, sys
import asyncdb
from asyncdb.models import MLP
from asyncdb.placement import split_rows

async def main():
    data = asyncdb.datasets.load("teacher", n=12_000, features=32, test=1000, seed=3)
    resume = sys.argv[2] if len(sys.argv) > 2 else None
    async with asyncdb.Cluster.local(shards=2, replicas=2) as cluster:
        def progress(entry):
            print("progress", entry["examples"], flush=True)
        run = await cluster.train(
            MLP([32, 64, 10]), data, algorithm=asyncdb.Downpour(batch_size=32, unit_steps=40),
            epochs=6, eval_every=0.1, checkpoint_dir=sys.argv[1], checkpoint_every=0.2,
            resume=resume, on_progress=progress)
    resumed = [e["units_done"] for e in run.events if e["event"] == "resumed"]
    print("final", run.final["test_accuracy"], run.units["done"], run.units["planned"],
          resumed[0] if resumed else 0, flush=True)

if __name__ == "__main__":
    asyncdb.run(main())
"""


@pytest.mark.timeout(600)  # three runs of a driver process, one killed on the way
def test_a_run_whose_driver_was_killed_resumes_from_its_checkpoints(tmp_path):
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    ckpt = tmp_path / "ckpt"
    kill_9_when([str(script), str(ckpt)], lambda line: (  # a few evaluations and a checkpoint
        line.startswith("progress") and bool(list(ckpt.glob("run.*.ckpt")))
        and int(line.split()[1]) > 20_000))
    resumed = subprocess.run([sys.executable, str(script), str(ckpt), str(ckpt)],
                             capture_output=True, text=True, timeout=300, check=True)
    final = [line for line in resumed.stdout.splitlines() if line.startswith("final")]
    _word, accuracy, done, planned, done_before = final[0].split()
    assert int(done) == int(planned)
    assert 0 < int(done_before) < int(planned)  # it went on from the checkpoint
    clean = subprocess.run([sys.executable, str(script), str(tmp_path / "clean")],
                           capture_output=True, text=True, timeout=300, check=True)
    clean_accuracy = float(clean.stdout.splitlines()[-1].split()[1])
    assert float(accuracy) >= clean_accuracy - 0.02


@pytest.mark.parametrize("victim", ["replica", "shard"])
async def test_a_killed_serve_peer_does_not_lose_the_run(three_peers, victim, tmp_path):
    from test_ws import SECRET

    data = asyncdb.datasets.load("digits")
    urls = [p.url for p in three_peers]
    async with asyncdb.Cluster.connect(urls, SECRET, shards=1, replicas=2,
                                       heartbeat=1.0) as cluster:
        under_way = asyncio.Event()
        training = asyncio.create_task(cluster.train(
            MLP([64, 64, 10]), data, algorithm=asyncdb.Downpour(batch_size=16, unit_steps=20),
            optimizer=asyncdb.Adagrad(lr=0.05), epochs=30, eval_every=0.1,
            checkpoint_every=0.2,
            on_progress=lambda entry: entry["time"] > 0.5 and under_way.set()))
        await asyncio.wait_for(under_way.wait(), 60)
        role = {a["role"]: a["node"] for a in cluster.describe()
                if a["role"] in ("shard", "replica") and a["index"] in (0, 1)}
        target = role["shard"] if victim == "shard" else \
            next(a["node"] for a in cluster.describe() if a["role"] == "replica"
                 and a["index"] == 1)
        peer = three_peers[["peer-a", "peer-b", "peer-c"].index(target)]
        os.kill(peer.proc.pid, signal.SIGKILL)
        run = await asyncio.wait_for(training, 180)
    assert run.units["done"] == run.units["planned"]
    failure = _events(run, "failure")
    assert len(failure) == 1 and failure[0]["node"] == target, run.events
    recovered = _events(run, "recovered")
    assert [e["role"] for e in recovered] == [victim]
    assert recovered[0]["node"] != target
    assert run.final["test_accuracy"] > 0.9


async def test_a_run_without_periodic_checkpoints_does_all_its_units(tmp_path):
    data = asyncdb.datasets.load("digits")
    async with asyncdb.Cluster.inproc(shards=1, replicas=2) as cluster:
        run = await cluster.train(MLP([64, 32, 10]), data, epochs=2,
                                  algorithm=asyncdb.Downpour(unit_steps=10),
                                  checkpoint_dir=tmp_path, checkpoint_every=math.inf)
    assert run.units["done"] == run.units["planned"] > 2
    assert list(tmp_path.glob("shard-0.*.ckpt"))  # the one taken at the start


def _under_way(after: float) -> tuple[asyncio.Event, object]:
    event = asyncio.Event()
    return event, lambda entry: entry["time"] > after and event.set()


@pytest.mark.parametrize("cluster_of", [asyncdb.Cluster.inproc, asyncdb.Cluster.local])
async def test_replicas_added_during_a_run_take_units(teacher, cluster_of):
    under_way, on_progress = _under_way(0.3)
    async with cluster_of(shards=1, replicas=1) as cluster:
        with pytest.raises(asyncdb.ConfigError, match="in progress"):
            await cluster.add_replicas(1)
        training = asyncio.create_task(cluster.train(
            _model(), teacher, algorithm=asyncdb.Downpour(batch_size=32, unit_steps=20),
            epochs=12, eval_every=0.1, on_progress=on_progress))
        await asyncio.wait_for(under_way.wait(), 60)
        assert await cluster.add_replicas(1) == [1]
        where = {a["index"]: a for a in cluster.describe() if a["role"] == "replica"}
        run = await asyncio.wait_for(training, 120)
    assert sorted(where) == [0, 1] and where[1]["alive"]
    if cluster_of is asyncdb.Cluster.local:
        assert where[1]["pid"] not in (where[0]["pid"], os.getpid())
    assert run.units["done"] == run.units["planned"]
    assert [e["index"] for e in _events(run, "joined")] == [1]
    assert int(run.replicas[1]["examples_done"]) > 0  # it took units from the queue
    examples = sum(int(r["examples_done"]) for r in run.replicas.values())
    assert examples == run.final["examples"]
    assert run.final["test_accuracy"] > 0.6


async def test_a_replica_of_two_partitions_added_during_a_run_takes_units(teacher):
    under_way, on_progress = _under_way(0.3)
    async with asyncdb.Cluster.local(shards=2, replicas=1, partitions=2) as cluster:
        training = asyncio.create_task(cluster.train(
            _model(), teacher, algorithm=asyncdb.Downpour(batch_size=32, unit_steps=20),
            epochs=8, eval_every=0.1, on_progress=on_progress))
        await asyncio.wait_for(under_way.wait(), 60)
        assert await cluster.add_replicas(1) == [1]
        parts = {a["index"]: a for a in cluster.describe() if a["role"] == "partition"}
        run = await asyncio.wait_for(training, 120)
    assert sorted(parts) == ["0.0", "0.1", "1.0", "1.1"]
    pids = {parts[p]["pid"] for p in parts}
    assert len(pids) == 4 and os.getpid() not in pids  # a new process per partition
    [joined] = _events(run, "joined")
    assert joined["nodes"] == [parts["1.0"]["node"], parts["1.1"]["node"]]
    assert run.units["done"] == run.units["planned"]
    assert int(run.replicas[1]["examples_done"]) > 0  # it took units from the queue
    assert all(p["exchange_bytes"] > 0 for p in run.replicas[1]["partitions"])
    assert run.final["test_accuracy"] > 0.6


async def test_a_replica_removed_during_a_run_finishes_its_unit_and_leaves(teacher):
    under_way, on_progress = _under_way(0.3)
    async with asyncdb.Cluster.local(shards=1, replicas=3) as cluster:
        training = asyncio.create_task(cluster.train(
            _model(), teacher, algorithm=asyncdb.Downpour(batch_size=32, unit_steps=20),
            epochs=4, eval_every=0.1, on_progress=on_progress))
        await asyncio.wait_for(under_way.wait(), 60)
        with pytest.raises(asyncdb.ConfigError, match="at least one"):
            await cluster.remove_replicas(3)
        assert await cluster.remove_replicas(1) == [2]
        assert [a["index"] for a in cluster.describe() if a["role"] == "replica"] == [0, 1]
        run = await asyncio.wait_for(training, 120)
    assert run.units["done"] == run.units["planned"]
    assert run.units["reassigned"] == 0  # its unit was finished, not given back
    left = _events(run, "left")
    assert [e["index"] for e in left] == [2]
    assert left[0]["units_left"] > 0  # it left at once, while the others went on
    examples = sum(int(r["examples_done"]) for r in run.replicas.values())
    assert examples == run.final["examples"]
    assert run.final["test_accuracy"] > 0.6


async def test_a_serve_peer_added_during_a_run_takes_units(three_peers):
    from test_ws import SECRET

    data = asyncdb.datasets.load("digits")
    urls = [p.url for p in three_peers]
    under_way, on_progress = _under_way(0.3)
    async with asyncdb.Cluster.connect(urls[:2], SECRET, shards=1, replicas=1) as cluster:
        training = asyncio.create_task(cluster.train(
            MLP([64, 64, 10]), data, algorithm=asyncdb.Downpour(batch_size=16, unit_steps=20),
            optimizer=asyncdb.Adagrad(lr=0.05), epochs=15, eval_every=0.1,
            on_progress=on_progress))
        await asyncio.wait_for(under_way.wait(), 60)
        with pytest.raises(asyncdb.ConfigError, match="add_peer"):
            await cluster.add_replicas(1)
        assert await cluster.add_peer(urls[2]) == [1]
        with pytest.raises(asyncdb.ConfigError, match="already in the cluster"):
            await cluster.add_peer(urls[0])
        where = {a["index"]: a["node"] for a in cluster.describe() if a["role"] == "replica"}
        run = await asyncio.wait_for(training, 180)
    assert where[1] == "peer-c"
    assert run.units["done"] == run.units["planned"]
    assert [(e["index"], e["node"]) for e in _events(run, "joined")] == [(1, "peer-c")]
    assert int(run.replicas[1]["examples_done"]) > 0  # it did units, their rows inline
    assert run.final["test_accuracy"] > 0.9


async def test_a_frozen_serve_peer_is_replaced_and_wakes_to_change_nothing(three_peers):
    from test_ws import SECRET

    data = asyncdb.datasets.load("digits")
    under_way, on_progress = _under_way(0.3)
    async with asyncdb.Cluster.connect([p.url for p in three_peers], SECRET, shards=1,
                                       replicas=2, heartbeat=1.0) as cluster:
        # Long enough that replica 0 alone cannot finish while the heartbeat (1 to
        # 1.5 s) finds the frozen peer: the new incarnation must take units after.
        training = asyncio.create_task(cluster.train(
            MLP([64, 64, 10]), data, algorithm=asyncdb.Downpour(batch_size=16, unit_steps=20),
            optimizer=asyncdb.Adagrad(lr=0.05), epochs=100, eval_every=0.1,
            on_progress=on_progress))
        await asyncio.wait_for(under_way.wait(), 60)
        target = next(a["node"] for a in cluster.describe()
                      if a["role"] == "replica" and a["index"] == 1)
        peer = three_peers[["peer-a", "peer-b", "peer-c"].index(target)]
        assert cluster.recovery is not None
        events = cluster.recovery.events
        os.kill(peer.proc.pid, signal.SIGSTOP)
        try:  # the heartbeat finds it silent; its replica comes back elsewhere
            recovered = await asyncio.wait_for(
                events.wait("recovered", role="replica", index=1), 60)
        finally:
            os.kill(peer.proc.pid, signal.SIGCONT)  # the old incarnation wakes up
        run = await asyncio.wait_for(training, 180)
    assert recovered["node"] != target and recovered["generation"] == 1
    failure = _events(run, "failure")
    assert len(failure) == 1 and failure[0]["node"] == target
    assert run.units["done"] == run.units["planned"]
    assert run.replicas[1]["generation"] == 1  # no result of the old one was taken
    assert run.final["test_accuracy"] > 0.9
