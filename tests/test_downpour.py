from __future__ import annotations

import asyncio
import dataclasses
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
    for counts in run.replicas.values():
        assert counts["pushes"] == pytest.approx(counts["steps"] / 2, abs=1)
        # One fetch to start, then one due every 4 steps: made, or skipped because
        # the previous one was still in flight; never silently dropped.
        assert counts["fetches"] + counts["skipped_fetches"] == 1 + counts["steps"] // 4
        assert counts["fetches"] > counts["steps"] // 8


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


def record_pushes(monkeypatch) -> list[int]:
    """The replica of each push shard 0 receives, in order (progress rides on those)."""
    order: list[int] = []
    receive = asyncdb.ParameterShard.receive

    async def recording(self, message):
        if isinstance(message, dict) and isinstance(message.get("progress"), dict):
            order.append(int(message["progress"]["replica"]))
        return await receive(self, message)

    monkeypatch.setattr(asyncdb.ParameterShard, "receive", recording)
    return order


@pytest.mark.parametrize("warm", [0, 30])
async def test_warm_start_trains_one_replica_first(digits, monkeypatch, warm):
    pushes = record_pushes(monkeypatch)
    algorithm = asyncdb.Downpour(batch_size=32, warm_start_steps=warm)
    async with asyncdb.Cluster.inproc(shards=1, replicas=2) as cluster:
        run = await cluster.train(small_mlp(digits), digits, algorithm=algorithm, epochs=2)
    assert run.replicas[0]["steps"] == run.replicas[1]["steps"]  # same budget overall
    assert run.final["test_accuracy"] > 0.8
    assert set(pushes) == {0, 1} and len(pushes) == run.shards[0]["updates"]
    # Replica 0 alone for the warm-up; without it the replicas interleave at once.
    assert (pushes[:warm] == [0] * warm) and (1 in pushes[: warm + 5])


async def under_way(cluster) -> None:
    """Return once the shards' parameters have moved: training is under way."""
    first = None
    while True:
        await asyncio.sleep(0.05)
        try:
            now = await cluster.parameters()
        except asyncdb.ConfigError:  # the run's shards are not placed yet
            continue
        if first is None:
            first = now
        elif any(not np.array_equal(first[k], now[k]) for k in first):
            return


def teacher_run(cluster, **options):
    data = asyncdb.datasets.load("teacher", n=20_000, features=64, test=500)
    algorithm = asyncdb.Downpour(batch_size=16,
                                 warm_start_steps=options.pop("warm_start_steps", 0))
    return asyncio.create_task(cluster.train(MLP([64, 64, 10]), data, algorithm=algorithm,
                                             epochs=3.0, **options))


async def test_a_lost_replica_does_not_stop_training_inproc(digits):
    """Without recovery (in process), a lost replica's units go to the others."""
    algorithm = asyncdb.Downpour(batch_size=16, unit_steps=10)
    async with asyncdb.Cluster.inproc(shards=1, replicas=2) as cluster:
        seen = asyncio.Event()

        def progress(entry: dict) -> None:
            seen.set()

        training = asyncio.create_task(cluster.train(
            small_mlp(digits), digits, algorithm=algorithm, epochs=6.0, eval_every=0.05,
            on_progress=progress))
        await asyncio.wait_for(seen.wait(), 30)
        assert cluster.node is not None
        replica = next(n for n in cluster.node.actors() if n.startswith("replica") and
                       cluster.node.actor(n).index == 1)  # type: ignore[attr-defined]
        await cluster.node.stop_actor(replica)
        run = await asyncio.wait_for(training, 60)
    assert run.lost == [1]
    assert run.final["replicas"] == 1
    assert run.units["done"] == run.units["planned"]  # its share was done by replica 0
    assert any(e["event"] == "reassigned" for e in run.events)
    assert run.final["test_accuracy"] > 0.8


@pytest.mark.slow
async def test_a_lost_replica_is_noticed_at_once_and_training_goes_on():
    """With no restarts left, a killed replica is lost at once; the others do its units."""
    async with asyncdb.Cluster.local(shards=1, replicas=2) as cluster:
        training = teacher_run(cluster, eval_every=1000.0, max_restarts=0)
        await under_way(cluster)
        cluster.nodes.kill(cluster.nodes.ids[2])  # replica 1's node
        run = await training
    assert run.lost == [1]
    assert run.final["replicas"] == 1
    assert run.units["done"] == run.units["planned"]
    lost = next(e for e in run.events if e["event"] == "lost")
    assert lost["index"] == 1 and lost["time"] < run.seconds  # seen when it happened
    assert run.replicas[0]["steps"] > 0 and run.final["test_accuracy"] > 0.5


@pytest.mark.slow
async def test_replica_0_lost_during_warm_start_does_not_end_the_run():
    async with asyncdb.Cluster.local(shards=1, replicas=2) as cluster:
        training = teacher_run(cluster, eval_every=0.2, warm_start_steps=10**6,
                               max_restarts=0)
        await under_way(cluster)  # replica 0 is warming up alone
        cluster.nodes.kill(cluster.nodes.ids[1])  # replica 0's node
        run = await training
    assert run.lost == [0]
    assert run.replicas[1]["steps"] > 0 and run.final["test_accuracy"] > 0.5


@pytest.mark.slow
async def test_a_shard_that_cannot_come_back_fails_the_run_and_is_no_lost_replica(caplog):
    async with asyncdb.Cluster.local(shards=1, replicas=2) as cluster:
        training = teacher_run(cluster, eval_every=1000.0, max_restarts=0)
        await under_way(cluster)
        cluster.nodes.kill(cluster.nodes.ids[0])  # the shard's node
        with pytest.raises(asyncdb.RecoveryFailed, match="shard"):
            await training
    assert "replica 0 lost" not in caplog.text and "replica 1 lost" not in caplog.text


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


async def test_a_nan_in_the_data_spoils_batches_not_the_run(digits):
    x = digits.x_train.copy()
    x[5, 3] = np.nan
    spoiled = dataclasses.replace(digits, x_train=x)
    async with asyncdb.Cluster.inproc(shards=1, replicas=1) as cluster:
        run = await cluster.train(small_mlp(digits), spoiled,
                                  algorithm=asyncdb.Downpour(batch_size=32), epochs=4)
    counts = run.replicas[0]
    assert counts["bad_batches"] >= 1  # every pass over the data meets the row once
    assert counts["examples"] == 32 * (counts["steps"] - counts["bad_batches"])
    assert np.isfinite(run.final["loss"]) and run.final["test_accuracy"] > 0.8
    assert all(s["rejected"] == 0 for s in run.shards)


class InfGradientMLP(MLP):
    """An MLP whose gradient turns Inf on batches holding a row marked in feature 0,
    while its loss stays finite (what a per-batch loss check alone would miss)."""

    def loss_and_grad(self, params, x, y, grads=None):
        loss, grads = super().loss_and_grad(params, x, y, grads)
        if (np.asarray(x)[:, 0] > 100).any():
            grads["b0"][0] = np.inf
        return loss, grads


async def test_a_non_finite_gradient_with_a_finite_loss_is_dropped_before_the_push(digits):
    x = digits.x_train.copy()
    x[7, 0] = 1000.0
    marked = dataclasses.replace(digits, x_train=x)
    model = InfGradientMLP([digits.n_features, 32, digits.n_classes])
    async with asyncdb.Cluster.inproc(shards=1, replicas=1) as cluster:
        run = await cluster.train(model, marked, optimizer=asyncdb.Adagrad(lr=0.05),
                                  algorithm=asyncdb.Downpour(batch_size=32, n_push=4),
                                  epochs=4)
    counts = run.replicas[0]
    assert counts["bad_batches"] >= 1  # the batches pending with the marked one
    assert counts["examples"] == 32 * (counts["steps"] - counts["bad_batches"])
    assert all(s["rejected"] == 0 for s in run.shards)  # no Inf reached a shard
    assert np.isfinite(run.final["loss"]) and run.final["test_accuracy"] > 0.8


@pytest.mark.parametrize("lr", [1e3, 1e30])  # the loss explodes; the update overflows
async def test_a_diverging_run_stops_with_its_history(digits, lr):
    async with asyncdb.Cluster.inproc(shards=1, replicas=1) as cluster:
        with pytest.raises(asyncdb.TrainingDiverged, match="diverged") as info:
            await cluster.train(small_mlp(digits), digits, optimizer=asyncdb.SGD(lr=lr),
                                algorithm=asyncdb.Downpour(batch_size=32), epochs=20,
                                eval_every=0.02)
    assert isinstance(info.value.history, list)
    for entry in info.value.history:
        assert {"time", "loss", "val_accuracy"} <= entry.keys()


async def test_a_run_on_data_that_is_all_nan_is_not_reported_done(digits):
    spoiled = dataclasses.replace(digits, x_train=np.full_like(digits.x_train, np.nan))
    async with asyncdb.Cluster.inproc(shards=1, replicas=1) as cluster:
        with pytest.raises(asyncdb.TrainingDiverged, match="NaN or Inf"):
            await cluster.train(small_mlp(digits), spoiled, epochs=1)
