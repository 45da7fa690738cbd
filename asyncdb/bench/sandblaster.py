"""`asyncdb bench sandblaster`: stragglers and backup tasks, the coordinator's traffic,
L-BFGS against SciPy's, and the paper's comparison with Downpour.

- Stragglers: 12 portions per iteration, 3 replicas in processes, one made 4x slower by
  a sleep after each portion (`Sandblaster(slowdown=...)`, a benchmark-only option);
  iteration time against the two fast replicas alone, with and without backup tasks.
- Coordinator bytes per iteration for two model sizes (digits, softmax regression and
  an MLP with ~50x the parameters).
- `lbfgs_iterations_ratio`: iterations to come within 1e-4 of the optimum of L2 softmax
  regression on digits, ours over SciPy's L-BFGS-B (None without SciPy, a test extra).
- Time to a test accuracy on the teacher task with 2 replicas: Downpour with Adagrad,
  Downpour with SGD, Sandblaster (reported, not a target).
"""

from __future__ import annotations

import itertools
import statistics
from dataclasses import dataclass
from typing import Any

import numpy as np

from asyncdb.models import MLP, Model, SoftmaxRegression

from ..cluster import Cluster
from ..datasets import Dataset, load, teacher
from ..downpour import Downpour
from ..optim import SGD, Adagrad, UpdateRule
from ..params import ParameterLayout
from ..runs import Run
from ..sandblaster import Sandblaster


@dataclass(frozen=True)
class Settings:
    portion_size: int = 1024
    portions: int = 12
    straggler_sizes: tuple[int, ...] = (784, 256, 10)
    slowdown: float = 4.0
    iterations: int = 12
    compare_examples: int = 60_000
    compare_sizes: tuple[int, ...] = (784, 128, 10)
    target_accuracy: float = 0.9
    compare_seconds: float = 60.0
    seed: int = 0


def _iteration_seconds(run: Run) -> float:
    """Median time between iterations, leaving out the first (it holds the first
    evaluation and the longer first line search)."""
    times = [e["time"] for e in run.history]
    return float(statistics.median(b - a for a, b in itertools.pairwise(times[1:])))


async def _stragglers(s: Settings, data: Dataset, replicas: int, backups: bool,
                      slowdown: tuple[float, ...]) -> Run:
    algorithm = Sandblaster(portion_size=s.portion_size, iterations=s.iterations,
                            eval_every=10**6, backup_tasks=backups, slowdown=slowdown,
                            gtol=0.0, ftol=0.0)
    async with Cluster.local(shards=1, replicas=replicas) as cluster:
        return await cluster.train(MLP(s.straggler_sizes, l2=1e-4), data, epochs=None,
                                   algorithm=algorithm, seed=s.seed)


async def stragglers(s: Settings) -> dict[str, Any]:
    rows = s.portions * s.portion_size
    data = teacher(rows, s.straggler_sizes[0], s.straggler_sizes[-1], test=1000, seed=s.seed)
    slow = (1.0, 1.0, s.slowdown)
    fast = await _stragglers(s, data, 2, True, ())
    with_backups = await _stragglers(s, data, 3, True, slow)
    without = await _stragglers(s, data, 3, False, slow)
    base = _iteration_seconds(fast)
    final = with_backups.final
    return {
        "iteration_seconds_fast_pair": base,
        "iteration_seconds_with_backups": _iteration_seconds(with_backups),
        "iteration_seconds_without_backups": _iteration_seconds(without),
        "straggler_overhead_with_backups": _iteration_seconds(with_backups) / base,
        "straggler_overhead_without_backups": _iteration_seconds(without) / base,
        "portions_per_replica": final["portions_per_replica"],
        "portions_per_replica_without_backups": without.final["portions_per_replica"],
        "backups_issued": final["backups_issued"], "backups_used": final["backups_used"],
    }


async def coordinator_bytes() -> dict[str, Any]:
    data = load("digits")
    out: dict[str, Any] = {}
    for label, model in (("small", SoftmaxRegression(64, 10, l2=1e-3)),
                         ("large", MLP([64, 512, 10], l2=1e-3))):
        async with Cluster.inproc(shards=2, replicas=2) as cluster:
            run = await cluster.train(model, data, epochs=None, algorithm=Sandblaster(
                iterations=20, portion_size=256, gtol=0.0, ftol=0.0))
        out[f"coordinator_bytes_per_iteration_{label}"] = round(
            run.final["coordinator_bytes_per_iteration"])
        out[f"params_{label}"] = model.num_params()
    out["coordinator_bytes_per_iteration"] = max(
        out["coordinator_bytes_per_iteration_small"], out["coordinator_bytes_per_iteration_large"])
    return out


async def iterations_ratio() -> dict[str, Any]:
    try:
        import scipy.optimize
    except ImportError:
        return {"lbfgs_iterations_ratio": None, "lbfgs_note": "SciPy is not installed"}
    data = load("digits")
    model = SoftmaxRegression(64, 10, l2=1e-2, dtype="float64")
    layout = ParameterLayout(model.param_shapes())
    x0 = layout.flatten(model.init_params(np.random.default_rng(0)), dtype=np.float64)

    def loss_and_grad(flat: np.ndarray) -> tuple[float, np.ndarray]:
        loss, grads = model.loss_and_grad(layout.views(flat), data.x_train, data.y_train)
        return loss, layout.flatten(grads, dtype=np.float64)

    trace: list[float] = []
    result = scipy.optimize.minimize(
        loss_and_grad, x0, jac=True, method="L-BFGS-B",
        callback=lambda xk: trace.append(loss_and_grad(xk)[0]),
        options={"maxcor": 10, "gtol": 1e-12, "ftol": 1e-15, "maxiter": 2000})
    best = float(result.fun)
    reference = next(i + 1 for i, f in enumerate(trace) if f <= best * (1 + 1e-4))
    async with Cluster.inproc(shards=2, replicas=2) as cluster:
        run = await cluster.train(model, data, epochs=None, algorithm=Sandblaster(
            memory=10, portion_size=256, iterations=4 * reference, gtol=1e-9))
    ours = next((e["iteration"] for e in run.history if e["loss"] <= best * (1 + 1e-4)), None)
    return {"lbfgs_iterations_ratio": None if ours is None else ours / reference,
            "lbfgs_iterations": ours, "reference_iterations": reference}


def _time_to(run: Run, target: float) -> float | None:
    return next((e["time"] for e in run.history
                 if e.get("test_accuracy") is not None and e["test_accuracy"] >= target), None)


async def comparison(s: Settings) -> dict[str, Any]:
    data = teacher(s.compare_examples, s.compare_sizes[0], s.compare_sizes[-1], test=2000,
                   seed=s.seed)
    out: dict[str, Any] = {}
    downpours: tuple[tuple[str, UpdateRule], ...] = (
        ("downpour_adagrad", Adagrad(lr=0.005)), ("downpour_sgd", SGD(lr=0.05)))
    for label, rule in downpours:
        async with Cluster.local(shards=2, replicas=2, colocate=True) as cluster:
            run = await cluster.train(MLP(s.compare_sizes), data, optimizer=rule,
                                      algorithm=Downpour(batch_size=128, n_fetch=4, n_push=4),
                                      epochs=5.0, eval_every=0.25, eval_rows=2000,
                                      seed=s.seed)
        out[f"{label}_seconds_to_target"] = _time_to(run, s.target_accuracy)
        out[f"{label}_final_accuracy"] = run.final["test_accuracy"]
    model: Model = MLP(s.compare_sizes, l2=1e-4)
    async with Cluster.local(shards=2, replicas=2, colocate=True) as cluster:
        run = await cluster.train(model, data, epochs=None, seed=s.seed, algorithm=Sandblaster(
            portion_size=2048, iterations=200, max_seconds=s.compare_seconds))
    out["sandblaster_seconds_to_target"] = _time_to(run, s.target_accuracy)
    out["sandblaster_final_accuracy"] = run.final["test_accuracy"]
    out["target_accuracy"] = s.target_accuracy
    return out


async def run(settings: Settings | None = None, repeat: int = 3) -> dict[str, Any]:
    """Straggler ratios are medians of `repeat` rounds (each round's ratio taken within
    that round); the rest is measured once."""
    s = settings or Settings()
    rounds = [await stragglers(s) for _ in range(repeat)]
    result: dict[str, Any] = {}
    for key in ("straggler_overhead_with_backups", "straggler_overhead_without_backups",
                "iteration_seconds_fast_pair", "iteration_seconds_with_backups",
                "iteration_seconds_without_backups"):
        result[key] = round(statistics.median(r[key] for r in rounds), 4)
    middle = sorted(rounds, key=lambda r: r["straggler_overhead_with_backups"])[repeat // 2]
    for key in ("portions_per_replica", "portions_per_replica_without_backups",
                "backups_issued", "backups_used"):
        result[key] = middle[key]
    result.update(await coordinator_bytes())
    result.update(await iterations_ratio())
    result.update(await comparison(s))
    result["samples"] = {"straggler_overhead_with_backups": [
        round(r["straggler_overhead_with_backups"], 4) for r in rounds],
        "straggler_overhead_without_backups": [
        round(r["straggler_overhead_without_backups"], 4) for r in rounds]}
    result["settings"] = dict(s.__dict__)
    result["repeat"] = repeat
    return result
