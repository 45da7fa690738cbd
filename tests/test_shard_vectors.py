from __future__ import annotations

import numpy as np
import pytest

import asyncdb
from asyncdb import ShardClient
from asyncdb.shard_vectors import SliceVectors


def make(n=6, memory=2, penalized=((0, 4),)):
    return SliceVectors(0, np.arange(n, dtype=np.float64), memory, penalized)


def test_vector_programs_match_numpy():
    v = make()
    x = np.arange(6, dtype=np.float64)
    v.vectors["g"][:] = 1.0
    values, version = v.run([["copy", "d", "g"], ["axpy", 2.0, "x", "d"], ["scale", -1.0, "d"],
                             ["dot", "d", "x"], ["pdot", "x", "x"], ["version", 7]])
    d = -(1.0 + 2.0 * x)
    np.testing.assert_array_equal(v.vectors["d"], d)
    assert values == [float(d @ x), float(x[:4] @ x[:4])] and version == 7
    v.run([["paxpy", 0.5, "x", "g"]])
    np.testing.assert_array_equal(v.vectors["g"], np.r_[1.0 + 0.5 * x[:4], 1.0, 1.0])
    v.vectors["xt"][:] = x + 1
    v.vectors["gt"][:] = 3.0
    sy, yy = v.run([["history", 1, "xt", "x", "gt", "g"]])[0]
    np.testing.assert_array_equal(v.vectors["s1"], np.ones(6))
    assert yy == pytest.approx(float(((3.0 - v.vectors["g"]) ** 2).sum()))
    assert sy == pytest.approx(float((3.0 - v.vectors["g"]).sum()))


@pytest.mark.parametrize("program", [
    [["dot", "x", "nope"]], [["axpy", "two", "x", "g"]], [["history", 5, "x", "x", "g", "g"]],
    [["scale", float("nan"), "x"]], [["frobnicate"]], "dot", [["copy", "x"]],
])
def test_bad_programs_change_nothing(program):
    v = make()
    before = {k: a.copy() for k, a in v.vectors.items()}
    with pytest.raises(asyncdb.UpdateRejected):
        v.run([["scale", 0.0, "x"], *program] if isinstance(program, list) else program)
    for name, value in before.items():
        np.testing.assert_array_equal(v.vectors[name], value)


def test_accumulation_counts_each_portion_once():
    v = make()
    v.begin(1, 5, "g")
    one = np.ones(6)
    assert v.accumulate(1, [0, 1], one)
    assert not v.accumulate(1, [1, 2], one)  # repeats 1: the whole push is dropped
    assert not v.accumulate(0, [3], one)  # a stale pass
    assert v.accumulate(1, [2], one)
    np.testing.assert_array_equal(v.vectors["g"], 2 * one)
    assert v.missing(1) == [3, 4]
    assert (v.duplicates, v.stale) == (1, 1)
    with pytest.raises(asyncdb.UpdateRejected):
        v.accumulate(1, [9], one)
    with pytest.raises(asyncdb.UpdateRejected):
        v.accumulate(1, [3], np.ones(6, np.float32))
    with pytest.raises(asyncdb.UpdateRejected):
        v.missing(2)
    v.begin(2, 1, "gt")
    assert v.missing(2) == [0]


async def test_a_sandblaster_shard_rejects_bad_input_and_stays_intact():
    async with asyncdb.Node("ps") as node:
        ref = await node.spawn(asyncdb.ParameterShard, config={
            "index": 0, "values": np.arange(4, dtype=np.float64),
            "optimizer": asyncdb.SGD().to_config(), "lbfgs": {"memory": 2}})
        client = ShardClient([ref], [(0, 4)])
        await client.vectors(["copy", "d", "x"])
        with pytest.raises(asyncdb.UpdateRejected):
            await client.vectors(["copy", "d", "g"], ["dot", "d", "y7"])
        with pytest.raises(asyncdb.UpdateRejected):
            await client.accumulate(3, [0], np.ones(4))  # no pass open
        out = np.empty(4)
        await client.fetch(out, vector="d")
        np.testing.assert_array_equal(out, np.arange(4))
        saved = await client.checkpoint()
        await client.vectors(["scale", 0.0, "d"], ["version", 4])
        assert await client.restore(saved) == [0]
        await client.fetch(out, vector="d")
        np.testing.assert_array_equal(out, np.arange(4))
        assert (await client.stats())[0]["rejected"] == 2
        plain = await node.spawn(asyncdb.ParameterShard, config={
            "index": 1, "values": np.zeros(4, np.float32),
            "optimizer": asyncdb.SGD().to_config()})
        with pytest.raises(asyncdb.UpdateRejected, match="Sandblaster"):
            await ShardClient([plain], [(0, 4)]).vectors(["dot", "x", "x"])
