from __future__ import annotations

import numpy as np
import pytest

import asyncdb
from asyncdb import ShardClient


async def _spawn_shards(node, where, values, optimizer):
    bounds = [(0, 4), (4, 9), (9, len(values))]
    refs = [await node.spawn(asyncdb.ParameterShard, node=where[i % len(where)], config={
        "index": i, "values": values[lo:hi], "optimizer": optimizer.to_config(),
        "threads": 1}) for i, (lo, hi) in enumerate(bounds)]
    return ShardClient(refs, bounds)


@pytest.mark.slow
async def test_client_drives_shards_in_other_processes(cluster):
    node, nodes = cluster
    values = np.arange(12, dtype=np.float32)
    client = await _spawn_shards(node, nodes.ids, values, asyncdb.SGD(lr=1.0))
    np.testing.assert_array_equal(await client.parameters(), values)
    replies = await client.push(np.full(12, 2.0, np.float32), [0, 0, 0],
                                progress={"replica": 0, "examples": 5, "loss": 1.0})
    assert [r["version"] for r in replies] == [1, 1, 1]
    np.testing.assert_array_equal(await client.parameters(), values - 2.0)
    stats = await client.stats()
    assert [s["updates"] for s in stats] == [1, 1, 1]
    assert stats[0]["progress"]["0"]["examples"] == 5
    saved = await client.checkpoint()
    await client.push(np.ones(12, np.float32), [1, 1, 1])
    assert await client.restore(saved) == [1, 1, 1]
    np.testing.assert_array_equal(await client.parameters(), values - 2.0)


async def test_fetch_a_span_asks_only_the_shards_that_hold_it():
    async with asyncdb.Node("ps") as node:
        values = np.arange(12, dtype=np.float32)
        client = await _spawn_shards(node, [node.id], values, asyncdb.SGD(lr=1.0))
        out = np.full(12, -1.0, np.float32)
        assert await client.fetch(out, span=(5, 8)) == [-1, 0, -1]
        np.testing.assert_array_equal(out[5:8], values[5:8])
        assert (out[:5] == -1).all() and (out[8:] == -1).all()
        assert await client.fetch(out, span=(2, 10)) == [0, 0, 0]
        np.testing.assert_array_equal(out[2:10], values[2:10])
        assert [s["fetches"] for s in await client.stats()] == [1, 2, 1]


async def test_bad_client_inputs_are_refused():
    async with asyncdb.Node("ps") as node:
        client = await _spawn_shards(node, [node.id], np.zeros(12, np.float32),
                                     asyncdb.SGD(lr=1.0))
        with pytest.raises(asyncdb.ConfigError):
            ShardClient(client.shards, [(0, 4), (5, 12), (12, 12)])
        with pytest.raises(asyncdb.ConfigError):
            ShardClient(client.shards[:2], client.bounds)
        with pytest.raises(asyncdb.ConfigError):
            await client.restore([])
        with pytest.raises(asyncdb.UpdateRejected, match="fetch range"):
            await client.shards[0].ask({"op": "fetch", "lo": 3, "hi": 99})
