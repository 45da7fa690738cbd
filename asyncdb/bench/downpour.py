"""`asyncdb bench downpour`: Downpour SGD against a plain single-process SGD loop.

One run measures everything: the synthetic task (inputs labelled by a fixed random
teacher network), a baseline process training the same model on the same batches with
plain SGD and one BLAS thread, Downpour on `Cluster.local` with one and two replicas
(one BLAS thread per process), and the shard's Adagrad update against in-place numpy.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from asyncdb.models import MLP

from ..cluster import Cluster
from ..data import SharedArrays, open_arrays
from ..datasets import teacher
from ..downpour import Downpour
from ..engine import Updater, default_threads
from ..optim import Adagrad


@dataclass(frozen=True)
class Settings:
    examples: int = 200_000
    features: int = 784
    sizes: tuple[int, ...] = (784, 512, 512, 10)
    batch_size: int = 128
    baseline_lr: float = 0.05
    adagrad_lr: float = 0.005
    n_fetch: int = 16
    n_push: int = 16
    shards: int = 2
    colocate: bool = True
    seed: int = 0
    update_params: int = 16 << 20


def numpy_adagrad(param: np.ndarray, grad: np.ndarray, accum: np.ndarray,
                  scratch: np.ndarray, lr: float, eps: float) -> None:
    """Adagrad written plainly with in-place numpy: the reference the shard is timed
    against."""
    np.multiply(grad, grad, out=scratch)
    accum += scratch
    np.sqrt(accum, out=scratch)
    scratch += np.float32(eps)
    np.divide(grad, scratch, out=scratch)
    scratch *= np.float32(lr)
    param -= scratch


def update_ratio(size: int, engine: str, threads: int, repeat: int = 15) -> float:
    """Time of the in-place numpy Adagrad over time of the shard's update, same arrays;
    the two are timed alternately (so both meet the same machine) and the best of
    `repeat` each is kept."""
    rng = np.random.default_rng(0)
    param = rng.standard_normal(size, dtype=np.float32)
    grad = rng.standard_normal(size, dtype=np.float32)
    accum, scratch = np.zeros(size, np.float32), np.empty(size, np.float32)
    rule = Adagrad()
    updater = Updater(rule, size, engine, threads)
    steps: dict[str, Callable[[], None]] = {
        "plain": lambda: numpy_adagrad(param, grad, accum, scratch, rule.lr, rule.eps),
        "ours": lambda: updater.apply(param, grad),
    }
    best = dict.fromkeys(steps, float("inf"))
    try:
        for step in steps.values():
            step()  # warm up: first touch, thread start
        for _ in range(repeat):
            for name, step in steps.items():
                start = time.perf_counter()
                step()
                best[name] = min(best[name], time.perf_counter() - start)
        return best["plain"] / best["ours"]
    finally:
        updater.close()


def baseline_main() -> None:
    """In a process of its own (one BLAS thread): plain SGD, one epoch, no shards."""
    config = json.loads(sys.stdin.read())
    arrays = open_arrays(config["data"])
    x, y = arrays["x"], arrays["y"]
    model = MLP(config["sizes"])
    params = model.init_params(np.random.default_rng(config["seed"]))
    grads: dict[str, np.ndarray] | None = None
    batch, lr = config["batch_size"], np.float32(config["lr"])
    order = np.random.default_rng(config["seed"] + 1).permutation(len(x))
    start = time.perf_counter()
    steps = len(x) // batch
    for step in range(steps):
        rows = np.sort(order[step * batch:(step + 1) * batch])
        _, grads = model.loss_and_grad(params, x[rows], y[rows], grads)
        for name, value in params.items():
            value -= lr * grads[name]
    seconds = time.perf_counter() - start
    accuracy = model.accuracy(params, arrays["x_test"], arrays["y_test"])
    print(json.dumps({"examples_per_s": steps * batch / seconds, "test_accuracy": accuracy}))


def run_baseline(spec: dict[str, Any], settings: Settings) -> dict[str, Any]:
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1",
           "MKL_NUM_THREADS": "1"}
    config = {"data": spec, "sizes": list(settings.sizes), "seed": settings.seed,
              "batch_size": settings.batch_size, "lr": settings.baseline_lr}
    out = subprocess.run(
        [sys.executable, "-c", "from asyncdb.bench.downpour import baseline_main; "
                               "baseline_main()"],
        input=json.dumps(config), capture_output=True, text=True, env=env, check=True)
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


async def _downpour(data: Any, s: Settings, replicas: int, full: bool = False
                    ) -> dict[str, Any]:
    """The run's final entry; with `full`, also its seconds and per-replica counts."""
    algorithm = Downpour(n_fetch=s.n_fetch, n_push=s.n_push, batch_size=s.batch_size)
    async with Cluster.local(shards=s.shards, replicas=replicas, colocate=s.colocate) as cluster:
        result = await cluster.train(
            MLP(s.sizes), data, algorithm=algorithm, optimizer=Adagrad(lr=s.adagrad_lr),
            epochs=1.0, seed=s.seed, eval_every=3600.0)
    if full:
        return {"final": result.final, "seconds": result.seconds,
                "replicas": result.replicas}
    return result.final


async def run(settings: Settings | None = None, repeat: int = 3) -> dict[str, Any]:
    """`repeat` rounds, each: baseline, one replica, two replicas, update timing.
    Scaling is taken within each round (same machine state); figures are medians."""
    s = settings or Settings()
    data = teacher(s.examples, s.features, s.sizes[-1], seed=s.seed)
    threads = default_threads()
    rounds: list[dict[str, Any]] = []
    with SharedArrays({"x": data.x_train, "y": data.y_train, "x_test": data.x_test,
                       "y_test": data.y_test}) as shared:
        for _ in range(repeat):
            baseline = run_baseline(shared.spec, s)
            one = await _downpour(data, s, 1)
            two = await _downpour(data, s, 2)
            rounds.append({
                "baseline_examples_per_s": baseline["examples_per_s"],
                "baseline_test_accuracy": baseline["test_accuracy"],
                "downpour1_examples_per_s": one["examples_per_s"],
                "downpour1_test_accuracy": one["test_accuracy"],
                "downpour2_examples_per_s": two["examples_per_s"],
                "downpour2_test_accuracy": two["test_accuracy"],
                "downpour2_staleness_mean": two["staleness_mean"],
                "scaling": two["examples_per_s"] / baseline["examples_per_s"],
                "accuracy_gap": baseline["test_accuracy"] - two["test_accuracy"],
                "update_ratio": update_ratio(s.update_params, "blocked", threads),
                "update_ratio_numexpr": update_ratio(s.update_params, "numexpr", threads),
            })
    result: dict[str, Any] = {
        key: round(statistics.median(r[key] for r in rounds), 4) for key in rounds[0]}
    for key in ("baseline_examples_per_s", "downpour1_examples_per_s",
                "downpour2_examples_per_s"):
        result[key] = round(result[key])
    result.update({
        "update_params": s.update_params, "update_threads": threads, "repeat": repeat,
        "settings": dict(s.__dict__),
        "samples": {key: [round(r[key], 4) for r in rounds] for key in rounds[0]},
    })
    return result
