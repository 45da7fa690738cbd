"""Model parallelism, the actors: partitions of one replica in one process and in
separate node processes compute the whole model's loss and gradients, train with
Downpour, fetch and push only their own parameters, and a dead partition loses its
replica without hanging the run."""

from __future__ import annotations

import asyncio
import math

import numpy as np
import pytest

import asyncdb
from asyncdb.data import inline_arrays
from asyncdb.modelparallel import ReplicaClient, spawn_partitioned_replica
from asyncdb.models import MLP, LocallyConnected1D, Model
from asyncdb.params import PartitionedLayout
from asyncdb.placement import split_rows
from asyncdb.shard_client import ShardClient

MODELS = [MLP([13, 11, 7, 10]), LocallyConnected1D(width=11, channels=[2, 3, 2], window=3,
                                                   classes=10)]


def norm_relative(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


async def split_gradient(node: asyncdb.Node, nodes: list[str], model: Model, params, x, y):
    """Loss and whole-shaped gradients from a partitioned replica on `nodes`."""
    parts = len(nodes)
    layout = PartitionedLayout(model, parts)
    flat = layout.flatten(params, dtype=x.dtype)
    bounds = layout.shard_bounds(parts)
    shards = [await node.spawn(asyncdb.ParameterShard, node=nodes[i], config={
        "index": i, "values": flat[lo:hi].astype(np.float32),
        "optimizer": asyncdb.SGD(0.1).to_config()}) for i, (lo, hi) in enumerate(bounds)]
    replica, refs = await spawn_partitioned_replica(
        node, 0, model, nodes, shards, bounds, layout.block_bounds,
        {"data": inline_arrays({"x": x, "y": y}), "algorithm": asyncdb.Downpour().to_config()})
    try:
        for _ in range(2):  # twice: the second step uses the other parity's buffers
            result = await ReplicaClient(replica).gradient(flat, x, y)
    finally:
        for ref in [*shards, *refs][::-1]:
            await node.ref(ref.node_id, "_system").ask({"op": "stop", "name": ref.name})
    return result["loss"], layout.tensors(result["grad"])


def problem(model: Model, dtype, seed: int = 0, batch: int = 17):
    """Parameters and a batch. In float32, one whose unsplit gradients agree with float64
    (1e-6): a ReLU input within rounding of zero flips its gate in the reference itself."""
    for attempt in range(seed, seed + 1000, 97):
        rng = np.random.default_rng(attempt)
        params = {k: v + rng.standard_normal(v.shape) * 0.1
                  for k, v in model.init_params(rng).items()}
        n_in = model.partition(0, 1).owned[0][0][1]
        x, y = rng.standard_normal((batch, n_in)), rng.integers(0, 10, batch)
        cast = {k: v.astype(dtype) for k, v in params.items()}
        if dtype == np.float64:
            return cast, x, y
        exact = model.loss_and_grad({k: v.astype(np.float64) for k, v in cast.items()},
                                    x.astype(dtype).astype(np.float64), y)[1]
        rounded = model.loss_and_grad(cast, x.astype(dtype), y)[1]
        if all(norm_relative(rounded[k], exact[k]) < 1e-6 for k in exact):
            return cast, x.astype(dtype), y
    raise AssertionError("no well-conditioned float32 problem found")


def check(model, params, x, y, loss, grads, tolerance):
    want_loss, want = model.loss_and_grad(params, x, y)
    assert abs(loss - want_loss) <= tolerance * abs(want_loss)
    for name in want:
        assert grads[name].shape == want[name].shape
        assert norm_relative(grads[name], want[name]) < tolerance, name


@pytest.mark.parametrize("model", MODELS, ids=repr)
@pytest.mark.parametrize("parts", [1, 2, 3])
@pytest.mark.parametrize(("dtype", "tolerance"), [(np.float64, 1e-10), (np.float32, 1e-5)])
async def test_partitions_in_one_process_compute_the_whole_gradient(model, parts, dtype,
                                                                    tolerance):
    params, x, y = problem(model, dtype)
    async with asyncdb.Node("driver") as node:
        loss, grads = await split_gradient(node, [node.id] * parts, model, params, x, y)
    check(model, params, x, y, loss, grads, tolerance)


@pytest.mark.slow
@pytest.mark.parametrize("big", [MLP([13, 121, 90, 10]),
                                 LocallyConnected1D(width=64, channels=[1, 8, 8], window=5,
                                                    classes=10)], ids=repr)
@pytest.mark.parametrize(("dtype", "tolerance"), [(np.float64, 1e-10), (np.float32, 1e-5)])
async def test_partitions_in_separate_processes_compute_the_whole_gradient(big, dtype,
                                                                           tolerance):
    async with asyncdb.Node("driver", ask_timeout=60) as node, \
            asyncdb.LocalNodes(node, 3) as nodes:
        for parts in (2, 3):  # arrays of 64 KiB and more: by reference over the rings
            params, x, y = problem(big, dtype, seed=parts, batch=512)
            loss, grads = await split_gradient(node, nodes.ids[:parts], big, params, x, y)
            check(big, params, x, y, loss, grads, tolerance)


async def exchange_bytes_per_step(model: Model, parts: int, batch: int = 32) -> int:
    params, x, y = problem(model, np.float32, batch=batch)
    async with asyncdb.Node("driver") as node:
        layout = PartitionedLayout(model, parts)
        flat = layout.flatten(params)
        bounds = layout.shard_bounds(parts)
        shards = [await node.spawn(asyncdb.ParameterShard, config={
            "index": i, "values": flat[lo:hi], "optimizer": asyncdb.SGD(0.1).to_config()})
            for i, (lo, hi) in enumerate(bounds)]
        replica, _ = await spawn_partitioned_replica(
            node, 0, model, [node.id] * parts, shards, bounds, layout.block_bounds,
            {"data": inline_arrays({"x": x, "y": y}), "algorithm": asyncdb.Downpour().to_config()})
        client = ReplicaClient(replica)
        await client.gradient(flat, x, y)
        return int((await client.counts())["exchange_bytes"])


async def test_locally_connected_partitions_exchange_only_their_boundaries():
    def lc(width):
        return LocallyConnected1D(width=width, channels=[1, 8, 8], window=5, classes=10)

    narrow = await exchange_bytes_per_step(lc(64), 2)
    assert narrow == await exchange_bytes_per_step(lc(512), 2)
    # the halo (2 positions x 8 channels x 32 rows x 4 bytes) each way, forward and back,
    # plus logits and dL/dlogits (32 x 10 x 4 bytes each)
    assert narrow == 2 * 2 * (2 * 8 * 32 * 4) + 2 * (32 * 10 * 4)
    mlp_narrow = await exchange_bytes_per_step(MLP([64, 64, 64, 10]), 2)
    mlp_wide = await exchange_bytes_per_step(MLP([64, 512, 512, 10]), 2)
    assert mlp_wide > 4 * mlp_narrow  # dense layers: every partition reads all columns


@pytest.fixture(scope="module")
def digits():
    return asyncdb.datasets.load("digits")


async def test_partitioned_replicas_train_in_process(digits):
    model = MLP([digits.n_features, 48, digits.n_classes])
    async with asyncdb.Cluster.inproc(shards=3, replicas=2, partitions=2) as cluster:
        run = await cluster.train(model, digits, algorithm=asyncdb.Downpour(batch_size=32),
                                  optimizer=asyncdb.Adagrad(lr=0.05), epochs=6)
    assert run.final["test_accuracy"] >= 0.9 and not run.lost
    assert {k: v.shape for k, v in run.params.items()} == model.param_shapes()
    assert run.config["partitions"] == 2
    assert run.replicas[0]["exchange_bytes"] > 0
    assert model.accuracy(run.params, digits.x_test, digits.y_test) == run.final["test_accuracy"]


async def test_each_partition_talks_only_to_the_shards_of_its_block(digits):
    model = MLP([digits.n_features, 40, digits.n_classes])
    layout = PartitionedLayout(model, 2)
    bounds = layout.shard_bounds(4)
    assert [layout.shards_of(p, bounds) for p in (0, 1)] == [[0, 1], [2, 3]]
    async with asyncdb.Node("driver") as node:
        flat = layout.flatten(model.init_params(np.random.default_rng(0)))
        shards = [await node.spawn(asyncdb.ParameterShard, config={
            "index": i, "values": flat[lo:hi], "optimizer": asyncdb.SGD(0.1).to_config()})
            for i, (lo, hi) in enumerate(bounds)]
        replica, _ = await spawn_partitioned_replica(
            node, 0, model, [node.id] * 2, shards, bounds, layout.block_bounds,
            {"data": inline_arrays({"x": digits.x_train, "y": digits.y_train}),
             "algorithm": asyncdb.Downpour(batch_size=16).to_config()})
        await ReplicaClient(replica).train(0, 200, 5)
        stats = await ShardClient(shards, bounds).stats()
    assert [s["updates"] for s in stats] == [5, 5, 5, 5]  # one push per step, own shards
    before = layout.flatten(model.init_params(np.random.default_rng(0)))
    assert before.size == sum(hi - lo for lo, hi in bounds)


async def test_fewer_shards_than_partitions_is_refused():
    with pytest.raises(asyncdb.ConfigError, match="at least one shard per partition"):
        asyncdb.Cluster.inproc(shards=1, replicas=1, partitions=2)
    with pytest.raises(asyncdb.ConfigError, match="cannot split"):
        PartitionedLayout(MLP([4, 2, 3]), 3)


@pytest.mark.slow
async def test_two_partitioned_replicas_learn_digits_like_unsplit_ones(digits):
    model = MLP([digits.n_features, 128, digits.n_classes])
    accuracy = {}
    for parts in (1, 2):
        async with asyncdb.Cluster.local(shards=2, replicas=2, partitions=parts) as cluster:
            run = await cluster.train(model, digits, algorithm=asyncdb.Downpour(batch_size=32),
                                      optimizer=asyncdb.Adagrad(lr=0.05), epochs=20)
        assert not run.lost
        accuracy[parts] = run.final["test_accuracy"]
    assert accuracy[2] >= 0.95  # (0.958 seen under load: asynchronous runs vary)
    # 359 test rows and asynchronous runs: 0.02 is seven rows either way
    assert abs(accuracy[2] - accuracy[1]) <= 0.02, accuracy


@pytest.mark.slow
@pytest.mark.parametrize("victim_part", [0, 1])  # 0 also hosts the replica the coordinator asks
async def test_a_dead_partition_restarts_its_replica_and_the_run_goes_on(digits, victim_part):
    model = MLP([digits.n_features, 64, digits.n_classes])
    algorithm = asyncdb.Downpour(batch_size=32, unit_steps=20)
    async with asyncdb.Cluster.local(shards=2, replicas=2, partitions=2) as cluster:
        assert cluster.nodes is not None
        victim = cluster.nodes.ids[2 + 2 + victim_part]  # after 2 shards and replica 0
        assert {"role": "partition", "index": f"1.{victim_part}", "node": victim} \
            .items() <= next(d for d in cluster.describe()
                             if d["index"] == f"1.{victim_part}").items()
        killed = asyncio.Event()

        def progress(entry):
            if entry["examples"] > 0 and not killed.is_set():
                cluster.nodes.kill(victim)  # kill -9
                killed.set()

        run = await asyncio.wait_for(cluster.train(
            model, digits, algorithm=algorithm, optimizer=asyncdb.Adagrad(lr=0.05),
            epochs=30, eval_every=0.05, on_progress=progress), 300)
    assert killed.is_set()
    assert run.lost == []
    recovered = [(e["role"], e["index"], e["generation"]) for e in run.events
                 if e["event"] == "recovered"]
    assert recovered == [("replica", 1, 1)]
    assert [e["node"] for e in run.events if e["event"] == "restart"] == [victim]
    assert run.units["done"] == run.units["planned"]
    planned = sum(math.ceil(30 * (hi - lo) / 32)
                  for lo, hi in split_rows(len(digits.x_train), 2)) * 32
    assert abs(run.final["examples"] - planned) <= 20 * 32  # within one unit
    assert run.final["test_accuracy"] >= 0.9


@pytest.mark.slow
async def test_partitions_spread_over_serve_peers(tmp_path, digits):
    from test_ws import SECRET, Serve

    peers = [Serve(tmp_path, name, "--peers", "127.0.0.1") for name in ("peer-a", "peer-b")]
    try:
        urls = [p.url for p in peers]
        model = MLP([digits.n_features, 64, digits.n_classes])
        async with asyncdb.Cluster.connect(urls, SECRET, shards=2, replicas=1,
                                           partitions=2) as cluster:
            params, x, y = problem(MLP([13, 121, 90, 10]), np.float64, batch=300)
            loss, grads = await split_gradient(cluster.node, cluster.peer_ids,
                                               MLP([13, 121, 90, 10]), params, x, y)
            check(MLP([13, 121, 90, 10]), params, x, y, loss, grads, 1e-10)
            run = await cluster.train(model, digits, algorithm=asyncdb.Downpour(batch_size=32),
                                      optimizer=asyncdb.Adagrad(lr=0.05), epochs=8)
        assert run.final["test_accuracy"] >= 0.93 and not run.lost
        assert run.replicas[0]["exchange_bytes"] > 0
    finally:
        for peer in peers:
            peer.stop()


def test_partitioned_layout_keeps_each_partition_contiguous_and_user_shapes():
    model = MLP([5, 7, 3])
    layout = PartitionedLayout(model, 2)
    tensors = model.init_params(np.random.default_rng(1))
    flat = layout.flatten(tensors)
    back = layout.tensors(flat)
    assert all(np.array_equal(back[k], tensors[k]) for k in tensors)
    lo, hi = layout.block_bounds[0]  # partition 0: W0[:, :3], b0[:3], W1[:3], b1
    expected = np.concatenate([tensors["W0"][:, :3].ravel(), tensors["b0"][:3],
                               tensors["W1"][:3].ravel(), tensors["b1"]])
    assert np.array_equal(flat[lo:hi], expected)
    assert layout.block_bounds[1] == (hi, layout.size) and layout.size == model.num_params()
