from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

import asyncdb
from asyncdb.downpour import RateLimit
from asyncdb.models import MLP, SoftmaxRegression


@pytest.fixture(scope="module")
def digits():
    return asyncdb.datasets.load("digits")


def small_mlp(data):
    return MLP([data.n_features, 32, data.n_classes])


@pytest.mark.parametrize("placement", ["inproc", "local"])
async def test_downpour_learns_digits(placement, digits):
    cluster = getattr(asyncdb.Cluster, placement)(shards=2, replicas=2)
    entries = []
    async with cluster:
        run = await cluster.train(small_mlp(digits), digits,
                                  algorithm=asyncdb.Downpour(batch_size=32),
                                  optimizer=asyncdb.Adagrad(lr=0.05), epochs=12,
                                  eval_every=0.05, on_progress=entries.append)
    assert run.final["test_accuracy"] >= 0.93
    assert run.final["loss"] < 0.5
    assert entries and entries[-1] == run.history[-1]
    for key in ("examples", "examples_per_s", "loss", "test_accuracy", "staleness_mean",
                "staleness_max", "updates"):
        assert key in run.final
    assert run.final["examples"] == sum(r["examples"] for r in run.replicas.values())
    assert run.final["updates"] == sum(s["updates"] for s in run.shards)
    assert run.final["staleness_mean"] >= 0 and not run.lost
    assert set(run.params) == {"W0", "b0", "W1", "b1"}
    model = small_mlp(digits)
    assert model.accuracy(run.params, digits.x_test, digits.y_test) == pytest.approx(
        run.final["test_accuracy"])


async def test_asynchronous_replicas_see_stale_parameters(digits):
    async with asyncdb.Cluster.inproc(shards=1, replicas=3) as cluster:
        run = await cluster.train(small_mlp(digits), digits,
                                  algorithm=asyncdb.Downpour(n_fetch=4, n_push=2,
                                                             batch_size=16), epochs=3)
    assert run.final["staleness_max"] >= 2  # other replicas pushed since the fetch
    counts = run.replicas[0]
    assert counts["pushes"] == pytest.approx(counts["steps"] / 2, abs=1)
    assert counts["fetches"] <= counts["steps"] // 4 + 1


async def test_rate_limits_are_obeyed(digits):
    algorithm = asyncdb.Downpour(batch_size=8, fetch_rate=20.0, push_rate=10.0)
    async with asyncdb.Cluster.inproc(shards=1, replicas=1) as cluster:
        run = await cluster.train(SoftmaxRegression(64, 10), digits, algorithm=algorithm,
                                  steps=400)
    counts = run.replicas[0]
    seconds = counts["seconds"]
    # The first of each is free (one second's burst holds one op); then the rate.
    assert counts["fetches"] <= 2 + 20.0 * seconds
    assert counts["pushes"] <= 2 + 10.0 * seconds
    assert counts["skipped_fetches"] > 0 and counts["deferred_pushes"] > 0
    assert counts["steps"] == 400  # training never waits on the limits


def test_rate_limit_buckets():
    bytes_limit = RateLimit(None, 1000.0)
    assert bytes_limit.try_take(600)
    assert not bytes_limit.try_take(600)
    ops_limit = RateLimit(5.0, None)
    assert ops_limit.try_take(0) and not ops_limit.try_take(0)
    time.sleep(0.25)
    assert ops_limit.try_take(0)
    unlimited = RateLimit(None, None)
    assert all(unlimited.try_take(10**9) for _ in range(100))


async def test_warm_start_trains_one_replica_first(digits):
    algorithm = asyncdb.Downpour(batch_size=32, warm_start_steps=30)
    async with asyncdb.Cluster.inproc(shards=1, replicas=2) as cluster:
        run = await cluster.train(small_mlp(digits), digits, algorithm=algorithm, epochs=2)
    assert run.replicas[0]["steps"] == run.replicas[1]["steps"]  # same budget overall
    assert run.final["test_accuracy"] > 0.8


@pytest.mark.slow
async def test_a_lost_replica_does_not_stop_training():
    data = asyncdb.datasets.load("teacher", n=20_000, features=64, test=500)
    model = MLP([64, 64, 10])
    async with asyncdb.Cluster.local(shards=1, replicas=2) as cluster:
        victim = cluster.nodes.ids[2]
        training = asyncio.create_task(cluster.train(
            model, data, algorithm=asyncdb.Downpour(batch_size=16), epochs=15.0,
            eval_every=0.1))
        await asyncio.sleep(1.0)
        assert not training.done()
        cluster.nodes.kill(victim)
        run = await asyncio.wait_for(training, 60)
    assert run.lost == [1]
    assert run.final["replicas"] == 1
    assert run.replicas[0]["steps"] > 0 and run.final["test_accuracy"] > 0.5


async def test_bad_configurations_are_refused(digits):
    with pytest.raises(asyncdb.ConfigError):
        asyncdb.Downpour(n_push=0)
    with pytest.raises(asyncdb.ConfigError):
        asyncdb.Downpour(fetch_rate=-1)
    with pytest.raises(asyncdb.ConfigError):
        asyncdb.Cluster.inproc(shards=0)
    async with asyncdb.Cluster.inproc(replicas=2) as cluster:
        with pytest.raises(asyncdb.ConfigError):
            await cluster.train(small_mlp(digits), digits,
                                algorithm=asyncdb.Downpour(batch_size=10_000))
        with pytest.raises(asyncdb.ConfigError):
            await cluster.parameters()


def test_shared_training_data_is_one_copy():
    from asyncdb.data import SharedArrays, open_arrays

    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    with SharedArrays({"x": x, "empty": np.zeros((0, 2))}) as shared:
        opened = open_arrays(shared.spec)
        np.testing.assert_array_equal(opened["x"], x)
        assert not opened["x"].flags.writeable
        assert opened["empty"].shape == (0, 2)
