from __future__ import annotations

import asyncio
import itertools

import numpy as np
import pytest

import asyncdb
from asyncdb import ParameterLayout, ShardClient
from asyncdb.shard_client import ShardCheckpoint


@pytest.fixture
async def shard():
    async with asyncdb.Node("ps") as node:
        values = np.arange(10, dtype=np.float32)
        ref = await node.spawn(asyncdb.ParameterShard, config={
            "index": 0, "values": values, "optimizer": asyncdb.SGD(lr=0.5).to_config(),
            "threads": 1})
        yield ShardClient([ref], [(0, 10)])


async def test_fetch_push_and_staleness(shard):
    values = np.empty(10, np.float32)
    assert await shard.fetch(values) == [0]
    np.testing.assert_array_equal(values, np.arange(10))
    grad = np.ones(10, np.float32)
    assert (await shard.push(grad, [0]))[0]["staleness"] == 0
    assert (await shard.push(grad, [0]))[0]["staleness"] == 1
    np.testing.assert_allclose(await shard.parameters(), np.arange(10) - 1.0)
    [stats] = await shard.stats()
    assert stats["updates"] == 2 and stats["staleness_max"] == 1
    assert stats["staleness_mean"] == pytest.approx(0.5)


async def test_a_same_node_fetch_gets_a_snapshot_not_the_live_slice(shard):
    # The fetch is answered first; the push queued behind it runs before the fetcher
    # copies its answer. A live slice would show the push under version 0.
    fetched = np.empty(10, np.float32)
    versions, _ = await asyncio.gather(shard.fetch(fetched),
                                       shard.push(np.ones(10, np.float32), [0]))
    assert versions == [0]
    np.testing.assert_array_equal(fetched, np.arange(10))
    np.testing.assert_allclose(await shard.parameters(), np.arange(10) - 0.5)


@pytest.mark.parametrize(
    ("grad", "reason"),
    [
        (np.ones(9, np.float32), "shape"),
        (np.ones((10, 1), np.float32), "shape"),
        (np.ones(10, np.float64), "dtype"),
        (np.array([np.nan] + [0.0] * 9, np.float32), "NaN"),
        (np.array([np.inf] + [0.0] * 9, np.float32), "NaN or Inf"),
        ([1.0] * 10, "must be an array"),
    ],
)
async def test_bad_pushes_are_rejected_and_change_nothing(shard, grad, reason):
    before = await shard.parameters()
    with pytest.raises(asyncdb.UpdateRejected, match=reason):
        await shard.push(grad, [0])
    after = np.empty(10, np.float32)
    assert await shard.fetch(after) == [0]
    np.testing.assert_array_equal(after, before)
    assert (await shard.stats())[0]["rejected"] == 1


async def test_bad_version_is_rejected(shard):
    with pytest.raises(asyncdb.UpdateRejected, match="version"):
        await shard.push(np.ones(10, np.float32), [-3])


async def test_checkpoint_and_restore(shard):
    await shard.push(np.ones(10, np.float32), [0])
    saved = await shard.checkpoint()
    await shard.push(np.ones(10, np.float32), [1])
    assert await shard.restore(saved) == [1]
    np.testing.assert_allclose(await shard.parameters(), np.arange(10) - 0.5)
    with pytest.raises(asyncdb.UpdateRejected):
        await shard.restore([ShardCheckpoint(np.zeros(3, np.float32), {}, 0)])


def test_layout_views_and_balanced_bounds():
    layout = ParameterLayout({"W0": (3, 4), "b0": (4,), "W1": (4, 2)})
    assert layout.size == 24
    flat = np.arange(24, dtype=np.float32)
    views = layout.views(flat)
    assert views["b0"].tolist() == [12, 13, 14, 15] and views["W1"].shape == (4, 2)
    assert np.shares_memory(views["W0"], flat)
    bounds = layout.shard_bounds(5)
    assert bounds[0][0] == 0 and bounds[-1][1] == 24
    assert all(a[1] == b[0] for a, b in itertools.pairwise(bounds))
    assert max(hi - lo for lo, hi in bounds) - min(hi - lo for lo, hi in bounds) <= 1
    np.testing.assert_array_equal(layout.flatten(views), flat)
    with pytest.raises(asyncdb.ConfigError):
        layout.shard_bounds(0)


async def spawn_shard(node, optimizer, values=None):
    values = np.arange(10, dtype=np.float32) if values is None else values
    ref = await node.spawn(asyncdb.ParameterShard, config={
        "index": 0, "values": values, "optimizer": optimizer.to_config(), "threads": 1})
    return ShardClient([ref], [(0, 10)]), node.actor(ref.name)


@pytest.mark.parametrize("engine", ["blocked", "numexpr"])
@pytest.mark.parametrize("optimizer", [asyncdb.SGD(lr=10.0), asyncdb.Adagrad(lr=0.1)])
async def test_a_finite_gradient_that_would_overflow_leaves_the_shard_intact(engine, optimizer):
    async with asyncdb.Node("ps") as node:
        ref = await node.spawn(asyncdb.ParameterShard, config={
            "index": 0, "values": np.arange(10, dtype=np.float32),
            "optimizer": optimizer.to_config(), "threads": 1, "engine": engine})
        client = ShardClient([ref], [(0, 10)])
        await client.push(np.full(10, 1e3, np.float32), [0])  # an ordinary step first
        before = await client.checkpoint()
        huge = np.full(10, 3e38, np.float32)  # finite; its square or lr * it is not
        with pytest.raises(asyncdb.UpdateRejected, match="overflow"):
            await client.push(huge, [1])
        after = await client.checkpoint()
        np.testing.assert_array_equal(after[0].values, before[0].values)
        for name, state in before[0].state.items():
            np.testing.assert_array_equal(after[0].state[name], state)
        assert np.isfinite(after[0].values).all() and after[0].version == 1
        await client.push(np.ones(10, np.float32), [1])  # and it goes on learning
        assert np.isfinite(await client.parameters()).all()
        assert (await client.stats())[0]["rejected"] == 1


@pytest.mark.parametrize("version", [True, False, 2**63, -1, 1.0, "1"])
async def test_versions_must_be_plain_ints_in_range(version):
    async with asyncdb.Node("ps") as node:
        client, actor = await spawn_shard(node, asyncdb.SGD(lr=0.5))
        with pytest.raises(asyncdb.UpdateRejected, match="version"):
            actor.push(np.ones(10, np.float32), version)
        [saved] = await client.checkpoint()
        with pytest.raises(asyncdb.UpdateRejected, match="version"):
            actor.restore({"values": saved.values, "state": saved.state, "version": version})
        np.testing.assert_array_equal(await client.parameters(), np.arange(10))
        actor.push(np.ones(10, np.float32), 2**63 - 1)  # the largest version is fine
