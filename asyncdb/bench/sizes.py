"""`asyncdb bench downpour --sizes`: Downpour as the model grows, and Hogwild! beside it.

For 784-H-H-10 MLPs of about 1M, 10M and 50M parameters, a fixed number of SGD steps
each: the single-process baseline (plain SGD, one BLAS thread) against Downpour with two
replicas on `Cluster.local` (throughput, and the bytes fetched and pushed per second).
At the smallest size also Hogwild! (Recht et al., NIPS 2011): two processes updating one
shared parameter vector in place without locks, plain SGD at the baseline's learning
rate, the same steps on the same task; accuracy is compared at that size only.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from typing import Any

import numpy as np

from asyncdb.models import MLP

from ..data import SharedArrays, open_arrays
from ..datasets import teacher
from .downpour import Settings, _downpour, run_baseline

# Hidden width H for about 1M, 10M and 50M parameters (784*H + H*H + 10*H + biases),
# and the SGD steps each size runs (in total, over all replicas).
SIZES = ((680, 480), (2790, 96), (6680, 32))


def mlp_sizes(hidden: int) -> tuple[int, ...]:
    return (784, hidden, hidden, 10)


def hogwild_main() -> None:
    """One Hogwild! worker (its own process, one BLAS thread): plain SGD on its share of
    the rows, written straight into the shared parameter vector, no locks."""
    config = json.loads(sys.stdin.read())
    arrays = open_arrays(config["data"])
    x, y = arrays["x"], arrays["y"]
    model = MLP(config["sizes"])
    flat = np.memmap(config["params"], np.float32, "r+")
    params, offset = {}, 0
    for name, shape in model.param_shapes().items():
        count = int(np.prod(shape))
        params[name] = flat[offset : offset + count].reshape(shape)
        offset += count
    worker, workers, batch = config["worker"], config["workers"], config["batch_size"]
    lr = np.float32(config["lr"])
    order = np.random.default_rng(config["seed"] + 1).permutation(len(x))[worker::workers]
    grads: dict[str, np.ndarray] | None = None
    steps = len(order) // batch
    start = time.perf_counter()
    for step in range(steps):
        rows = np.sort(order[step * batch : (step + 1) * batch])
        _, grads = model.loss_and_grad(params, x[rows], y[rows], grads)
        for name, value in params.items():
            value -= lr * grads[name]
    print(json.dumps({"start": start, "end": time.perf_counter(), "examples": steps * batch}))


def run_hogwild(spec: dict[str, Any], s: Settings, workers: int = 2) -> dict[str, Any]:
    """`workers` Hogwild! processes over one memfd parameter vector: examples/s over the
    span from the first start to the last end, and the test accuracy reached."""
    model = MLP(s.sizes)
    initial = model.init_params(np.random.default_rng(s.seed))
    flat = np.concatenate([initial[name].ravel() for name in model.param_shapes()])
    fd = os.memfd_create("asyncdb-hogwild", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, flat.nbytes)
        with open(fd, "wb", closefd=False) as f:
            f.write(flat.data)
        env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1",
               "MKL_NUM_THREADS": "1"}
        code = "from asyncdb.bench.sizes import hogwild_main; hogwild_main()"
        procs = []
        for worker in range(workers):
            config = {"data": spec, "sizes": list(s.sizes), "seed": s.seed, "worker": worker,
                      "workers": workers, "batch_size": s.batch_size, "lr": s.baseline_lr,
                      "params": f"/proc/{os.getpid()}/fd/{fd}"}
            proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, text=True, env=env)
            assert proc.stdin is not None
            proc.stdin.write(json.dumps(config))
            proc.stdin.close()
            procs.append(proc)
        reports = []
        try:
            for proc in procs:
                assert proc.stdout is not None
                with proc.stdout:
                    out = proc.stdout.read()
                if proc.wait() != 0:
                    raise RuntimeError(f"a Hogwild! worker exited with code {proc.returncode}")
                reports.append(json.loads(out.strip().splitlines()[-1]))
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        trained = np.fromfile(f"/proc/{os.getpid()}/fd/{fd}", np.float32)
    finally:
        os.close(fd)
    params, offset = {}, 0
    for name, shape in model.param_shapes().items():
        count = int(np.prod(shape))
        params[name] = trained[offset : offset + count].reshape(shape)
        offset += count
    arrays = open_arrays(spec)
    span = max(r["end"] for r in reports) - min(r["start"] for r in reports)
    return {"examples_per_s": sum(r["examples"] for r in reports) / span,
            "test_accuracy": model.accuracy(params, arrays["x_test"], arrays["y_test"])}


async def one_size(hidden: int, steps: int, base: Settings, hogwild: bool
                   ) -> dict[str, Any]:
    s = replace(base, sizes=mlp_sizes(hidden), examples=steps * base.batch_size)
    data = teacher(s.examples, s.features, s.sizes[-1], seed=s.seed)
    params = sum(int(np.prod(shape)) for shape in MLP(s.sizes).param_shapes().values())
    arrays = {"x": data.x_train, "y": data.y_train, "x_test": data.x_test,
              "y_test": data.y_test}
    with SharedArrays(arrays) as shared:
        baseline = run_baseline(shared.spec, s)
        two = await _downpour(data, s, 2, full=True)
        wild = run_hogwild(shared.spec, s) if hogwild else None
    final, seconds = two["final"], two["seconds"]
    counts = two["replicas"]
    fetches = sum(int(c.get("fetches", 0)) for c in counts.values())
    pushes = sum(int(c.get("pushes", 0)) for c in counts.values())
    row: dict[str, Any] = {
        "params": params, "hidden": hidden, "steps": steps,
        "scaling": round(final["examples_per_s"] / baseline["examples_per_s"], 3),
        "baseline_examples_per_s": round(baseline["examples_per_s"]),
        "downpour2_examples_per_s": round(final["examples_per_s"]),
        "fetch_bytes_per_s": round(fetches * params * 4 / seconds),
        "push_bytes_per_s": round(pushes * params * 4 / seconds),
        "baseline_test_accuracy": round(baseline["test_accuracy"], 4),
        "downpour2_test_accuracy": round(final["test_accuracy"], 4),
    }
    if wild is not None:
        row["hogwild_examples_per_s"] = round(wild["examples_per_s"])
        row["hogwild_test_accuracy"] = round(wild["test_accuracy"], 4)
    return row


async def run(base: Settings | None = None,
              sizes: tuple[tuple[int, int], ...] = SIZES) -> dict[str, Any]:
    base = base or Settings()
    rows = [await one_size(hidden, steps, base, hogwild=i == 0)
            for i, (hidden, steps) in enumerate(sizes)]
    smallest = rows[0]
    return {
        "sizes": rows,
        "hogwild_examples_per_s": smallest.get("hogwild_examples_per_s"),
        "hogwild_test_accuracy": smallest.get("hogwild_test_accuracy"),
        "downpour2_examples_per_s": smallest["downpour2_examples_per_s"],
        "downpour2_test_accuracy": smallest["downpour2_test_accuracy"],
        "settings": {"batch_size": base.batch_size, "n_fetch": base.n_fetch,
                     "n_push": base.n_push, "shards": base.shards,
                     "colocate": base.colocate, "baseline_lr": base.baseline_lr,
                     "adagrad_lr": base.adagrad_lr},
    }
