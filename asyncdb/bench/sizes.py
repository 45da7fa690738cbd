"""`asyncdb bench downpour --sizes`: Downpour as the model grows, and Hogwild! beside it.

For 784-H-H-10 MLPs of about 1M, 10M and 50M parameters, a fixed number of SGD steps
each: the single-process baseline (plain SGD, one BLAS thread) against Downpour with two
replicas on `Cluster.local` (throughput, and the bytes fetched and pushed per second).
Adagrad's rate is the one tuned at the smallest width, scaled down by width above it; a
size whose run still diverges is recorded as such and the others go on.
At the smallest size also Hogwild! (Recht et al., NIPS 2011): two processes updating one
shared parameter vector in place without locks, plain SGD at the baseline's learning
rate, the same steps on the same task; accuracy is compared at that size only. That
size is short and noisy, so it runs `rounds` times (baseline, Downpour, Hogwild! in
turn) and its figures are medians.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from typing import Any

import numpy as np

from asyncdb.models import MLP

from ..data import SharedArrays, open_arrays
from ..datasets import teacher
from ..errors import TrainingDiverged
from .downpour import Settings, _downpour, run_baseline

# Hidden width H for about 1M, 10M and 50M parameters (784*H + H*H + 10*H + biases),
# and the SGD steps each size runs (in total, over all replicas): enough for each of
# the two replicas to fetch and push several times at n_fetch = n_push = 16.
SIZES = ((680, 480), (2790, 160), (6680, 128))


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


def adagrad_lr(hidden: int, base: Settings, tuned_width: int = SIZES[0][0]) -> float:
    """Adagrad's first steps move every weight by about `lr`, so a unit's input moves in
    proportion to its fan-in: `base.adagrad_lr` (tuned at `tuned_width`), scaled down
    in proportion to the width above it."""
    return base.adagrad_lr * min(1.0, tuned_width / hidden)


def _diverged(error: TrainingDiverged, batch: int) -> dict[str, Any]:
    """A size whose Downpour run diverged: where (as far as its history tells) and why."""
    seen = [int(entry.get("examples") or 0) for entry in error.history]
    return {"diverged": True, "diverged_at_step": seen[-1] // batch if seen else None,
            "diverged_reason": str(error)}


async def one_round(s: Settings, data: Any, spec: dict[str, Any], params: int,
                    hogwild: bool) -> dict[str, Any]:
    """Baseline, Downpour with two replicas and (with `hogwild`) Hogwild!, in turn."""
    baseline = run_baseline(spec, s)
    row: dict[str, Any] = {"baseline_examples_per_s": baseline["examples_per_s"],
                           "baseline_test_accuracy": baseline["test_accuracy"]}
    try:
        two = await _downpour(data, s, 2, full=True)
    except TrainingDiverged as exc:  # recorded for this size; the others still run
        row.update(_diverged(exc, s.batch_size))
    else:
        final, seconds, counts = two["final"], two["seconds"], two["replicas"]
        fetches = sum(int(c.get("fetches", 0)) for c in counts.values())
        pushes = sum(int(c.get("pushes", 0)) for c in counts.values())
        row.update({
            "diverged": False,
            "scaling": final["examples_per_s"] / baseline["examples_per_s"],
            "downpour2_examples_per_s": final["examples_per_s"],
            "downpour2_test_accuracy": final["test_accuracy"],
            "fetch_bytes_per_s": fetches * params * 4 / seconds,
            "push_bytes_per_s": pushes * params * 4 / seconds,
            "fetches": fetches, "pushes": pushes, "seconds": seconds,
        })
    if hogwild:
        wild = run_hogwild(spec, s)
        row["hogwild_examples_per_s"] = wild["examples_per_s"]
        row["hogwild_test_accuracy"] = wild["test_accuracy"]
    return row


def _rounded(key: str, value: float) -> float | int:
    if "accuracy" in key or key in ("scaling", "seconds"):
        return round(value, 4)
    return round(value)  # examples and bytes per second


def _median_row(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians of the rounds' figures (of the rounds that did not diverge, if any did
    not); a diverged round's record where every round diverged."""
    kept = [r for r in rounds if not r.get("diverged")] or rounds
    row = dict(kept[0])
    for key, value in kept[0].items():
        if isinstance(value, float) and all(isinstance(r.get(key), float) for r in kept):
            row[key] = statistics.median(r[key] for r in kept)
    for key, value in row.items():
        if isinstance(value, float):
            row[key] = _rounded(key, value)
    if len(rounds) > 1:
        row["rounds"] = len(rounds)
        row["diverged_rounds"] = sum(bool(r.get("diverged")) for r in rounds)
        row["samples"] = {key: [_rounded(key, r[key]) for r in kept] for key in
                          ("scaling", "downpour2_examples_per_s", "hogwild_examples_per_s")
                          if all(key in r for r in kept)}
    return row


async def one_size(hidden: int, steps: int, base: Settings, hogwild: bool,
                   rounds: int = 1, tuned_width: int = SIZES[0][0]) -> dict[str, Any]:
    s = replace(base, sizes=mlp_sizes(hidden), examples=steps * base.batch_size,
                adagrad_lr=adagrad_lr(hidden, base, tuned_width))
    data = teacher(s.examples, s.features, s.sizes[-1], seed=s.seed)
    params = sum(int(np.prod(shape)) for shape in MLP(s.sizes).param_shapes().values())
    arrays = {"x": data.x_train, "y": data.y_train, "x_test": data.x_test,
              "y_test": data.y_test}
    with SharedArrays(arrays) as shared:
        results = [await one_round(s, data, shared.spec, params, hogwild)
                   for _ in range(rounds)]
    return {"params": params, "hidden": hidden, "steps": steps,
            "adagrad_lr": round(s.adagrad_lr, 6), **_median_row(results)}


def targets(rows: list[dict[str, Any]]) -> dict[str, bool]:
    """The issue's targets: scaling >= 1.6 at every size; at the smallest, Downpour at
    least as fast as Hogwild! and as accurate (to within half a point)."""
    first = rows[0]
    wild = first.get("hogwild_examples_per_s")
    fast = wild is not None and first.get("downpour2_examples_per_s", 0) >= wild
    accurate = wild is not None and (first.get("downpour2_test_accuracy", 0.0)
                                     >= first["hogwild_test_accuracy"] - 0.005)
    return {"scaling_at_least_1_6": all((r.get("scaling") or 0.0) >= 1.6 for r in rows),
            "downpour_at_least_hogwild": fast and accurate}


async def run(base: Settings | None = None, sizes: tuple[tuple[int, int], ...] = SIZES,
              rounds: int = 5) -> dict[str, Any]:
    """Every size in turn; the smallest (with Hogwild!) `rounds` times."""
    base = base or Settings()
    rows = [await one_size(hidden, steps, base, hogwild=i == 0,
                           rounds=rounds if i == 0 else 1, tuned_width=sizes[0][0])
            for i, (hidden, steps) in enumerate(sizes)]
    smallest = rows[0]
    return {
        "sizes": rows,
        "hogwild_examples_per_s": smallest.get("hogwild_examples_per_s"),
        "hogwild_test_accuracy": smallest.get("hogwild_test_accuracy"),
        "downpour2_examples_per_s": smallest.get("downpour2_examples_per_s"),
        "downpour2_test_accuracy": smallest.get("downpour2_test_accuracy"),
        "targets_met": targets(rows),
        "settings": {"batch_size": base.batch_size, "n_fetch": base.n_fetch,
                     "n_push": base.n_push, "shards": base.shards,
                     "colocate": base.colocate, "baseline_lr": base.baseline_lr,
                     "adagrad_lr": base.adagrad_lr, "adagrad_lr_width": sizes[0][0],
                     "rounds_at_smallest": rounds},
    }
