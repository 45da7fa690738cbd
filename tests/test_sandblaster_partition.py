"""Sandblaster with partitioned replicas: a float64 run split in 2 or 3 (uneven)
partitions follows the unsplit run's loss trajectory, in one process and across node
processes; the partitions push only to their own shards, each portion counted once."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

import asyncdb
from asyncdb.data import inline_arrays
from asyncdb.modelparallel import spawn_partitioned_replica
from asyncdb.models import MLP
from asyncdb.params import PartitionedLayout
from asyncdb.passes import Passes
from asyncdb.sandblaster_partition import SandblasterPartition
from asyncdb.shard_client import ShardClient


@pytest.fixture(scope="module")
def digits():
    return asyncdb.datasets.load("digits")


def settings() -> asyncdb.Sandblaster:
    return asyncdb.Sandblaster(iterations=5, portion_size=200, push_every=2, backup_tasks=False)


async def trajectory(cluster: asyncdb.Cluster, digits) -> list[float]:
    model = MLP([digits.n_features, 13, 10, digits.n_classes], dtype="float64", l2=1e-3)
    run = await asyncio.wait_for(
        cluster.train(model, digits, algorithm=settings(), epochs=None), 300)
    assert not run.lost
    assert {k: v.shape for k, v in run.params.items()} == model.param_shapes()
    return [e["loss"] for e in run.history]


def same(a: list[float], b: list[float]) -> None:
    assert len(a) == len(b) > 3
    for x, y in zip(a, b, strict=True):
        assert abs(x - y) <= 1e-6 * abs(y)


@pytest.fixture(scope="module")
def unsplit(digits) -> list[float]:
    async def go() -> list[float]:
        async with asyncdb.Cluster.inproc(shards=3, replicas=2) as cluster:
            return await trajectory(cluster, digits)
    return asyncio.run(go())


@pytest.mark.parametrize("parts", [2, 3])
async def test_partitioned_sandblaster_follows_the_unsplit_trajectory(digits, unsplit, parts):
    async with asyncdb.Cluster.inproc(shards=3, replicas=2, partitions=parts) as cluster:
        losses = await trajectory(cluster, digits)
    same(losses, unsplit)
    assert losses[-1] < losses[0]


@pytest.mark.slow
async def test_partitioned_sandblaster_across_processes(digits, unsplit):
    async with asyncdb.Cluster.local(shards=2, replicas=2, partitions=2) as cluster:
        losses = await trajectory(cluster, digits)
    same(losses, unsplit)


class LossyPartition(SandblasterPartition):
    """Partition 1 loses its first push on the way: the shards of partition 0's block
    counted those portions, the shards of its own block did not."""

    async def _push_sums(self) -> list[int]:
        if self.part == 1 and self.counts["pushes"] == 0:
            ids, self.accum_ids = self.accum_ids, []
            self.accum[0][...] = 0.0
            self.counts["pushes"] += 1
            return ids
        return await super()._push_sums()


async def test_a_push_that_reached_some_shards_counts_once_on_each(digits):
    model = MLP([digits.n_features, 9, digits.n_classes], dtype="float64")
    layout = PartitionedLayout(model, 2)
    bounds = layout.shard_bounds(3)
    x = layout.flatten(model.init_params(np.random.default_rng(3)), dtype=np.float64)
    rows = len(digits.x_train)
    async with asyncdb.Node("driver") as node:
        shards = [await node.spawn(asyncdb.ParameterShard, config={
            "index": i, "values": x[lo:hi], "optimizer": asyncdb.SGD().to_config(),
            "threads": 1, "lbfgs": {"memory": 3}}) for i, (lo, hi) in enumerate(bounds)]
        config = {"data": inline_arrays({"x": digits.x_train, "y": digits.y_train}),
                  "algorithm": asyncdb.Downpour(batch_size=100).to_config()}
        replicas = [(await spawn_partitioned_replica(
            node, i, model, [node.id] * 2, shards, bounds, layout.block_bounds, config,
            kind))[0] for i, kind in enumerate([SandblasterPartition, LossyPartition])]
        client = ShardClient(shards, bounds)
        passes = Passes(client, replicas, rows, asyncdb.Sandblaster(
            portion_size=100, push_every=2, backup_tasks=False), lambda reply: None)
        loss_sum = await asyncio.wait_for(passes.run("grad", "x", "g"), 60)
        loss, grads = model.data_loss_and_grad(layout.tensors(x), digits.x_train,
                                               digits.y_train)
        assert loss_sum == pytest.approx(loss * rows, rel=1e-10)
        accumulated = np.empty(layout.size, np.float64)
        await client.fetch(accumulated, vector="g")
        reference = layout.flatten(grads, dtype=np.float64) * rows
        error = np.linalg.norm(accumulated - reference) / np.linalg.norm(reference)
        assert error < 1e-10, error
        stats = await client.stats()
        # partition 0's shards dropped the repeats of the redone portions; its own counted
        lo_block = [s["lbfgs"]["duplicate_pushes"] for s, b in zip(stats, bounds, strict=True)
                    if b[1] <= layout.block_bounds[0][1]]
        assert min(lo_block) >= 1
        # the loss passes of the line search: partition 0's loss, nothing pushed
        assert await passes.run("loss", "x") == pytest.approx(loss * rows, rel=1e-10)
