"""Sandblaster L-BFGS end to end: against SciPy's L-BFGS, the same trajectory whatever
the replicas and the placement, and a coordinator that sees only scalars."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.optimize

import asyncdb
from asyncdb.models import MLP, SoftmaxRegression
from asyncdb.params import ParameterLayout

L2 = 1e-2


@pytest.fixture(scope="module")
def digits():
    return asyncdb.datasets.load("digits")


def reference(model, data, seed=0):
    """SciPy's L-BFGS on the same objective from the same start: the optimum, and the
    iterations it took to come within 1e-4 of it."""
    layout = ParameterLayout(model.param_shapes())
    x0 = layout.flatten(model.init_params(np.random.default_rng(seed)), dtype=np.float64)

    def loss_and_grad(flat):
        loss, grads = model.loss_and_grad(layout.views(flat), data.x_train, data.y_train)
        return loss, layout.flatten(grads, dtype=np.float64)

    trace = []
    result = scipy.optimize.minimize(
        loss_and_grad, x0, jac=True, method="L-BFGS-B",
        callback=lambda xk: trace.append(loss_and_grad(xk)[0]),
        options={"maxcor": 10, "gtol": 1e-12, "ftol": 1e-15, "maxiter": 2000})
    best = result.fun
    return best, next(i + 1 for i, f in enumerate(trace) if f <= best * (1 + 1e-4))


def first_within(history, best):
    return next(e["iteration"] for e in history if e["loss"] <= best * (1 + 1e-4))


async def test_reaches_the_reference_optimum_as_fast_as_scipy(digits):
    model = SoftmaxRegression(64, 10, l2=L2, dtype="float64")
    best, reference_iterations = reference(model, digits)
    async with asyncdb.Cluster.inproc(shards=3, replicas=2) as cluster:
        run = await cluster.train(model, digits, epochs=None, algorithm=asyncdb.Sandblaster(
            memory=10, portion_size=128, iterations=int(1.5 * reference_iterations)))
    assert run.final["loss"] == pytest.approx(best, rel=1e-4)
    assert first_within(run.history, best) <= 1.5 * reference_iterations
    assert [e["iteration"] for e in run.history] == list(range(len(run.history)))
    for key in ("time", "loss", "grad_norm", "step", "line_search_losses",
                "line_search_gradients", "test_accuracy"):
        assert run.history[-1][key] is not None, key
    assert run.final["test_accuracy"] > 0.95
    assert run.params["W0"].dtype == np.float64
    assert sum(run.final["portions_per_replica"].values()) > 0
    # the parameters the run answers are the shards' and give the loss it reports
    loss, _ = model.loss_and_grad(run.params, digits.x_train, digits.y_train)
    assert loss == pytest.approx(run.final["loss"], rel=1e-12)


def losses(run):
    return np.array([e["loss"] for e in run.history])


async def trajectories(make_cluster, data, replicas, iterations=12):
    model = SoftmaxRegression(64, 10, l2=L2, dtype="float64")
    runs = []
    for r in replicas:
        async with make_cluster(r) as cluster:
            runs.append(await cluster.train(model, data, epochs=None, algorithm=asyncdb.Sandblaster(
                portion_size=100, push_every=3, iterations=iterations, ftol=0.0, gtol=0.0)))
    return runs


async def test_same_trajectory_with_1_2_and_4_replicas_in_process(digits):
    runs = await trajectories(lambda r: asyncdb.Cluster.inproc(shards=2, replicas=r), digits,
                              [1, 2, 4])
    base = losses(runs[0])
    assert len(base) == 13
    for run in runs[1:]:
        np.testing.assert_allclose(losses(run), base, rtol=1e-6, atol=0)
    assert len(runs[2].final["portions_per_replica"]) == 4


@pytest.mark.slow
async def test_same_trajectory_across_processes(digits):
    inproc = await trajectories(lambda r: asyncdb.Cluster.inproc(shards=2, replicas=r), digits,
                                [1], iterations=8)
    local = await trajectories(lambda r: asyncdb.Cluster.local(shards=2, replicas=r), digits,
                               [1, 2, 4], iterations=8)
    for run in local:
        np.testing.assert_allclose(losses(run), losses(inproc[0]), rtol=1e-6, atol=0)
        assert run.config["mode"] == "local" and not run.lost


async def test_coordinator_bytes_do_not_grow_with_the_model(digits):
    per_iteration = {}
    for model in (SoftmaxRegression(64, 10, l2=L2), MLP([64, 256, 10], l2=L2)):
        async with asyncdb.Cluster.inproc(shards=2, replicas=2) as cluster:
            run = await cluster.train(model, digits, epochs=None, algorithm=asyncdb.Sandblaster(
                portion_size=256, iterations=6, memory=4, ftol=0.0, gtol=0.0))
        assert run.final["iteration"] == 6
        # loss and gradient passes per iteration differ a little between models
        evaluations = sum(e["line_search_losses"] + e["line_search_gradients"]
                          for e in run.history) + 1
        per_iteration[model.num_params()] = (run.final["coordinator_bytes"], evaluations)
    (small, (small_bytes, small_evals)), (big, (big_bytes, big_evals)) = sorted(
        per_iteration.items())
    assert big > 20 * small
    assert big_bytes / big_evals < 1.5 * small_bytes / small_evals
    assert big_bytes / 6 < 100_000 < big * 8  # under 100 kB an iteration; one vector is more


@pytest.mark.slow
async def test_sandblaster_across_serve_processes(tmp_path, digits):
    from test_ws import SECRET, Serve

    peers = [Serve(tmp_path, name, "--peers", "127.0.0.1") for name in ("peer-a", "peer-b")]
    try:
        urls = [p.url for p in peers]
        model = SoftmaxRegression(64, 10, l2=L2, dtype="float64")
        algorithm = asyncdb.Sandblaster(portion_size=100, iterations=6, ftol=0.0, gtol=0.0)
        async with asyncdb.Cluster.connect(urls, SECRET, shards=2, replicas=2) as cluster:
            remote = await cluster.train(model, digits, epochs=None, algorithm=algorithm)
        async with asyncdb.Cluster.inproc(shards=2, replicas=1) as cluster:
            here = await cluster.train(model, digits, epochs=None, algorithm=algorithm)
    finally:
        for peer in peers:
            peer.stop()
    assert remote.config["mode"] == "remote" and not remote.lost
    np.testing.assert_allclose(losses(remote), losses(here), rtol=1e-6, atol=0)
    assert all(v > 0 for v in remote.final["portions_per_replica"].values())


async def test_stopping_rules_and_iteration_boundaries(digits):
    model = SoftmaxRegression(64, 10, l2=L2, dtype="float64")
    async with asyncdb.Cluster.inproc(shards=2, replicas=2) as cluster:
        run = await cluster.train(model, digits, epochs=None,
                                  algorithm=asyncdb.Sandblaster(iterations=3))
        assert run.final["stop"] == "iterations" and run.final["iteration"] == 3
        assert [s["version"] for s in run.shards] == [3, 3]  # state at the boundary
        run = await cluster.train(model, digits, epochs=None,
                                  algorithm=asyncdb.Sandblaster(iterations=500, gtol=0.05))
        assert run.final["stop"] == "gtol" and run.final["grad_norm"] <= 0.05
        assert run.history[-2]["grad_norm"] > 0.05
        run = await cluster.train(model, digits, epochs=None,
                                  algorithm=asyncdb.Sandblaster(iterations=500, ftol=1e-3))
        assert run.final["stop"] == "ftol" and run.final["iteration"] < 500
        run = await cluster.train(model, digits, epochs=None,
                                  algorithm=asyncdb.Sandblaster(iterations=10**6,
                                                                max_seconds=0.3))
        assert run.final["stop"] == "max_seconds"
