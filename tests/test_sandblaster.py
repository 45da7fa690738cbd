"""Sandblaster passes: portions through the work queue, gradients accumulated on the
shards exactly once, whatever backups, losses and partial pushes happen."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

import asyncdb
from asyncdb.data import inline_arrays
from asyncdb.models import MLP, Model, SoftmaxRegression
from asyncdb.params import ParameterLayout
from asyncdb.passes import Passes
from asyncdb.sandblaster import SandblasterReplica
from asyncdb.shard_client import ShardClient
from asyncdb.workqueue import WorkQueue


@pytest.fixture(scope="module")
def digits():
    return asyncdb.datasets.load("digits")


class Setup:
    """Sandblaster shards and replicas spawned on given nodes, without a coordinator."""

    def __init__(self, model: Model, data, seed: int = 3) -> None:
        self.model = model
        self.data = data
        self.layout = ParameterLayout(model.param_shapes())
        self.bounds = self.layout.shard_bounds(3)
        tensors = model.init_params(np.random.default_rng(seed))
        self.x = self.layout.flatten(tensors, dtype=np.float64)

    async def spawn(self, node, shard_nodes, replica_nodes, slowdown=()):
        shards = []
        for i, (lo, hi) in enumerate(self.bounds):
            shards.append(await node.spawn(asyncdb.ParameterShard, node=shard_nodes[i],
                                           config={
                "index": i, "values": self.x[lo:hi], "optimizer": asyncdb.SGD().to_config(),
                "threads": 1, "lbfgs": {"memory": 3}}))
        self.client = ShardClient(shards, self.bounds)
        spec = inline_arrays({"x": self.data.x_train, "y": self.data.y_train})
        self.replicas = [await node.spawn(SandblasterReplica, node=where, config={
            "index": i, "model": self.model.to_config(), "shards": shards,
            "bounds": [list(b) for b in self.bounds], "data": spec,
            "slowdown": slowdown[i] if i < len(slowdown) else 1.0})
            for i, where in enumerate(replica_nodes)]

    def full_gradient(self) -> tuple[float, np.ndarray]:
        """Single process, whole batch: the sums a gradient pass must accumulate."""
        n = len(self.data.x_train)
        loss, grads = self.model.data_loss_and_grad(self.layout.views(self.x.copy()),
                                                    self.data.x_train, self.data.y_train)
        return loss * n, self.layout.flatten(grads, dtype=np.float64) * n

    async def accumulated(self, name: str = "g") -> np.ndarray:
        out = np.empty(self.layout.size, np.float64)
        await self.client.fetch(out, vector=name)
        return out


def settings(**options):
    return asyncdb.Sandblaster(**{"portion_size": 64, "push_every": 3, **options})


def assert_close(accumulated, reference):
    error = np.linalg.norm(accumulated - reference) / np.linalg.norm(reference)
    assert error < 1e-5, error


async def test_a_gradient_pass_equals_the_full_batch_gradient(digits):
    setup = Setup(MLP([64, 16, 10], dtype="float64"), digits)
    async with asyncdb.Node("driver") as node:
        await setup.spawn(node, [node.id] * 3, [node.id] * 3)
        passes = Passes(setup.client, setup.replicas, len(digits.x_train), settings(),
                        lambda reply: None)
        loss_sum = await passes.run("grad", "x", "g")
        loss_ref, grad_ref = setup.full_gradient()
        assert loss_sum == pytest.approx(loss_ref, rel=1e-10)
        assert_close(await setup.accumulated(), grad_ref)
        assert await passes.run("loss", "x") == pytest.approx(loss_ref, rel=1e-10)
        portions = -(-len(digits.x_train) // 64)  # 64 rows each, the last one short
        assert sum(passes.portions_per_replica.values()) == len(passes.portions) == portions
        assert all(v > 0 for v in passes.portions_per_replica.values())


async def test_forced_backups_count_each_portion_once(digits):
    setup = Setup(SoftmaxRegression(64, 10, dtype="float64"), digits)
    async with asyncdb.Node("driver") as node:
        # replica 2 is 2000x slower: the others finish first and copy its portions
        await setup.spawn(node, [node.id] * 3, [node.id] * 3, slowdown=(1.0, 1.0, 2000.0))
        passes = Passes(setup.client, setup.replicas, len(digits.x_train), settings(),
                        lambda reply: None)
        await passes.run("grad", "x", "g")
        assert passes.totals["backups_issued"] >= 1
        assert passes.totals["backups_used"] >= 1
        assert_close(await setup.accumulated(), setup.full_gradient()[1])
        counts = await setup.replicas[2].ask({"op": "counts"})
        assert counts["portions"] >= 1  # it did compute; its copy lost the race


class StallingReplica(SandblasterReplica):
    """Computes its first portion, then never finishes another: a straggler that holds
    a counted portion it has not pushed while it is busy for ever."""

    async def portion(self, message):
        if self.counts["portions"] >= 1:
            await asyncio.Event().wait()
        return await super().portion(message)


async def test_a_pass_does_not_wait_for_a_busy_straggler(digits):
    setup = Setup(SoftmaxRegression(64, 10, dtype="float64"), digits)
    async with asyncdb.Node("driver") as node:
        await setup.spawn(node, [node.id] * 3, [node.id] * 2)
        shards = setup.client.shards
        setup.replicas.append(await node.spawn(StallingReplica, config={
            "index": 2, "model": setup.model.to_config(), "shards": shards,
            "bounds": [list(b) for b in setup.bounds],
            "data": inline_arrays({"x": digits.x_train, "y": digits.y_train})}))
        passes = Passes(setup.client, setup.replicas, len(digits.x_train),
                        settings(push_every=8), lambda reply: None)
        loss_ref, grad_ref = setup.full_gradient()
        # the stalled replica's counted portion is taken back and done again
        loss_sum = await asyncio.wait_for(passes.run("grad", "x", "g"), 60)
        assert loss_sum == pytest.approx(loss_ref, rel=1e-10)
        assert_close(await setup.accumulated(), grad_ref)
        assert passes.totals["taken_back"] >= 1
        assert passes.portions_per_replica[2] >= 1
        # a loss pass ends too, though the replica never answers again
        loss = await asyncio.wait_for(passes.run("loss", "x"), 60)
        assert loss == pytest.approx(loss_ref, rel=1e-10)


class KillingPasses(Passes):
    """Kills a replica's node when it is given its third portion of the pass, so it
    dies holding counted results it has not pushed yet."""

    def __init__(self, *args, victim: int, kill, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.victim, self.kill, self.given = victim, kill, 0

    def _portion(self, lease, *args, **kwargs):
        if lease.worker == self.victim:
            self.given += 1
            if self.given == 3:
                self.kill()
        return super()._portion(lease, *args, **kwargs)


@pytest.mark.slow
async def test_a_replica_killed_mid_pass_loses_nothing(digits, cluster):
    node, nodes = cluster  # two node processes: replica 0 in one, the victim in the other
    setup = Setup(SoftmaxRegression(64, 10, dtype="float64"), digits)
    await setup.spawn(node, [node.id] * 3, [nodes.ids[0], nodes.ids[1]])
    passes = KillingPasses(setup.client, setup.replicas, len(digits.x_train),
                           settings(push_every=4, backup_tasks=False), lambda reply: None,
                           victim=1, kill=lambda: nodes.kill(nodes.ids[1]))
    loss_sum = await passes.run("grad", "x", "g")
    assert passes.given == 3
    assert passes.lost == [1] and sorted(passes.live) == [0]
    assert passes.totals["reissued"] >= 2  # its unpushed results were done again
    loss_ref, grad_ref = setup.full_gradient()
    assert loss_sum == pytest.approx(loss_ref, rel=1e-10)
    assert_close(await setup.accumulated(), grad_ref)
    # and the next pass goes on with the survivors
    assert await passes.run("loss", "x") == pytest.approx(loss_ref, rel=1e-10)


class PartialPushPasses(Passes):
    """Before the first pass's portions are handed out, a push of portions 0 and 1
    reaches shard 0 alone, as from a replica that died in the middle of pushing."""

    def __init__(self, *args, grad, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.grad, self.done = grad, False

    async def _drain(self, queue, *args):
        if not self.done:
            self.done = True
            lo, hi = self.shards.bounds[0]
            reply = await self.shards.shards[0].ask({
                "op": "accumulate", "pass": self.pass_id, "portions": [0, 1],
                "grad": self.grad[lo:hi]})
            assert reply["counted"]
        await super()._drain(queue, *args)


async def test_shards_missing_portions_get_them_again_one_by_one(digits):
    setup = Setup(SoftmaxRegression(64, 10, dtype="float64"), digits)
    model, layout = setup.model, setup.layout
    rows = slice(0, 128)  # portions 0 and 1 at 64 rows each
    _, grads = model.data_loss_and_grad(layout.views(setup.x.copy()),
                                        digits.x_train[rows], digits.y_train[rows])
    partial = layout.flatten(grads, dtype=np.float64) * 128
    async with asyncdb.Node("driver") as node:
        await setup.spawn(node, [node.id] * 3, [node.id] * 2)
        passes = PartialPushPasses(setup.client, setup.replicas, len(digits.x_train),
                                   settings(push_every=4), lambda reply: None, grad=partial)
        await passes.run("grad", "x", "g")
        assert_close(await setup.accumulated(), setup.full_gradient()[1])
        stats = await setup.client.stats()
        assert stats[0]["lbfgs"]["duplicate_pushes"] >= 1  # the replica's push repeating 0, 1


async def test_every_replica_lost_is_a_clear_error(digits):
    setup = Setup(SoftmaxRegression(64, 10, dtype="float64"), digits)
    async with asyncdb.Node("driver") as node:
        await setup.spawn(node, [node.id] * 3, [node.id])
        await node.ref(node.id, "_system").ask({"op": "stop",
                                                "name": setup.replicas[0].name})
        passes = Passes(setup.client, setup.replicas, len(digits.x_train), settings(),
                        lambda reply: None)
        with pytest.raises(asyncdb.TrainingFailed, match="every replica was lost"):
            await passes.run("grad", "x", "g")
        # the shards are intact and answer
        assert len(await setup.client.stats()) == 3


@pytest.mark.parametrize(("options", "match"), [
    ({"memory": 0}, "memory"),
    ({"portion_size": 0}, "portion_size"),
    ({"iterations": 0}, "iterations"),
    ({"gtol": -1.0}, "gtol"),
    ({"slowdown": (0.5,)}, "slowdown"),
    ({"lease_seconds": 0.0}, "lease_seconds"),
])
def test_bad_settings_are_refused(options, match):
    with pytest.raises(asyncdb.ConfigError, match=match):
        asyncdb.Sandblaster(**options)


class NoDataTerm(Model):
    """A model with an L2 term it cannot leave out of its loss."""

    l2 = 0.1

    def param_shapes(self):
        return {"W0": (64, 10)}

    def init_params(self, rng):
        return {"W0": np.zeros((64, 10), np.float32)}

    def loss_and_grad(self, params, x, y, grads=None):
        return 0.0, {"W0": np.zeros((64, 10), np.float32)}

    def predict(self, params, x):
        return np.zeros(len(x), int)

    def to_config(self):
        return {"type": "NoDataTerm"}


async def test_bad_runs_are_refused_and_start_nothing(digits):
    async with asyncdb.Cluster.inproc(shards=2, replicas=2) as cluster:
        model = SoftmaxRegression(64, 10, l2=0.01)
        with pytest.raises(asyncdb.ConfigError, match="larger than"):
            await cluster.train(model, digits, epochs=None,
                                algorithm=asyncdb.Sandblaster(portion_size=10_000))
        with pytest.raises(asyncdb.ConfigError, match="epochs"):
            await cluster.train(model, digits, algorithm=asyncdb.Sandblaster())
        with pytest.raises(asyncdb.ConfigError, match="leave out"):
            await cluster.train(NoDataTerm(), digits, epochs=None,
                                algorithm=asyncdb.Sandblaster())
        with pytest.raises(asyncdb.ConfigError, match="slowdown"):
            await cluster.train(model, digits, epochs=None,
                                algorithm=asyncdb.Sandblaster(slowdown=(1.0, 1.0, 2.0)))
        assert cluster.node.actors() == []


@pytest.mark.slow
async def test_a_replica_dying_every_iteration_ends_the_run_with_a_clear_error(digits):
    """With no restarts allowed, each killed replica is lost for the run."""
    model = SoftmaxRegression(64, 10, l2=0.01, dtype="float64")
    async with asyncdb.Cluster.local(shards=1, replicas=3) as cluster:
        victims = list(cluster.nodes.ids[1:])
        killed = []

        def kill_one(entry):
            if victims:
                killed.append(entry["iteration"])
                cluster.nodes.kill(victims.pop(0))

        with pytest.raises(asyncdb.TrainingFailed, match="every replica was lost"):
            await asyncio.wait_for(cluster.train(
                model, digits, epochs=None, on_progress=kill_one, max_restarts=0,
                algorithm=asyncdb.Sandblaster(iterations=20, portion_size=128)), 120)
        assert killed == [0, 1, 2]


async def test_a_replica_pushes_only_what_the_coordinator_counted(digits):
    setup = Setup(SoftmaxRegression(64, 10, dtype="float64"), digits)
    async with asyncdb.Node("driver") as node:
        await setup.spawn(node, [node.id] * 3, [node.id])
        await setup.client.begin(1, 23, "g")
        replica = setup.replicas[0]

        def portion(unit, verdict):
            return {"op": "portion", "pass": 1, "vector": "x", "kind": "grad", "portion": unit,
                    "rows": [64 * unit, 64 * unit + 64], "verdict": verdict, "push_every": 1}

        assert (await replica.ask(portion(0, [])))["pushed"] == []
        assert (await replica.ask(portion(1, [[0, False]])))["pushed"] == []  # a lost race
        assert (await replica.ask({"op": "flush", "pass": 1, "verdict": [[1, True]]})) == {
            "pushed": [1]}
        assert await setup.client.missing(1) == [0, *range(2, 23)]
        _, grads = setup.model.data_loss_and_grad(setup.layout.views(setup.x.copy()),
                                                  digits.x_train[64:128],
                                                  digits.y_train[64:128])
        assert_close(await setup.accumulated(),
                     setup.layout.flatten(grads, dtype=np.float64) * 64)
        assert (await replica.ask({"op": "counts"}))["dropped"] == 1


@pytest.mark.parametrize("backups", [True, False])
def test_a_straggler_gets_no_portion_it_would_finish_after_the_others(backups):
    passes = Passes(None, ["r0", "r1", "r2"], 12 * 64, settings(backup_tasks=backups),
                    lambda reply: None)
    passes.seconds = {0: 1.0, 1: 1.2, 2: 4.0}  # replica 2 takes 4x as long

    def queue(pending: int) -> WorkQueue:
        q = WorkQueue(12, backups=backups)
        for _ in range(12 - pending):
            q.take("other")
        return q

    # much left: the others need longer than it does, so it helps
    assert passes._in_time(2, queue(12))
    # little left: the others are done before it would be; with backups on it waits
    assert passes._in_time(2, queue(3)) is not backups
    assert passes._in_time(2, queue(0)) is not backups
    # the fast ones always qualify, backup copies included
    assert all(passes._in_time(r, queue(p)) for r in (0, 1) for p in (0, 1, 3, 12))
    # a replica not timed yet (or alone) is never held back
    passes.seconds = {2: 4.0}
    assert passes._in_time(2, queue(0))
