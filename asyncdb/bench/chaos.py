"""`asyncdb bench chaos`: Downpour through a schedule of faults, against a clean run.

One run trains the teacher task on `Cluster.local` (2 shards, 2 replicas): a clean run
with checkpoints at the default interval and a run with chaos of the same length (every
`fault_every` seconds one random replica or shard process gets kill -9 or SIGSTOP, in
turn, the next fault only once the last one is recovered). Detection is timed from the
signal to the failure event, recovery from detection to the actor serving again.

The checkpoint overhead comes from shorter runs without faults, in pairs (one without
periodic checkpoints, one at the default interval, their order alternating from pair
to pair so a drift of the shared machine's speed falls on both): the median over the
pairs of each pair's throughput lost. Each checkpoint's time to copy the shards' state
to the driver and to write it (encode, checksum, fsync) is reported too.
"""

from __future__ import annotations

import asyncio
import math
import os
import random
import signal
import statistics
import tempfile
import time
from dataclasses import dataclass
from typing import Any

from asyncdb.models import MLP

from ..cluster import Cluster
from ..datasets import Dataset, teacher
from ..downpour import Downpour
from ..optim import Adagrad
from ..runs import Run
from ..training import DEFAULT_CHECKPOINT_EVERY


@dataclass(frozen=True)
class Settings:
    examples: int = 60_000
    features: int = 128
    hidden: int = 256
    epochs: float = 40.0
    batch_size: int = 64
    unit_steps: int = 100
    faults: int = 10
    fault_every: float = 3.0
    liveness: float = 2.0  # SIGSTOP taken as frozen after this (the library default is 10 s)
    checkpoint_every: float = 1.0  # the chaos run's; the overhead is taken at the default
    overhead_epochs: float = 10.0  # each run of an overhead pair
    overhead_pairs: int = 3
    seed: int = 0


def _stats(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"median": None, "max": None}
    return {"median": round(statistics.median(values), 3), "max": round(max(values), 3)}


async def _train(settings: Settings, data: Dataset, *, chaos: bool, checkpoint_every: float,
                 directory: str, epochs: float | None = None) -> tuple[Run, dict[str, Any]]:
    model = MLP([settings.features, settings.hidden, settings.hidden, 10])
    algorithm = Downpour(batch_size=settings.batch_size, unit_steps=settings.unit_steps)
    report: dict[str, Any] = {"signals": []}
    async with Cluster.local(shards=2, replicas=2, liveness=settings.liveness) as cluster:
        training = asyncio.create_task(cluster.train(
            model, data, algorithm=algorithm, optimizer=Adagrad(lr=0.02),
            epochs=settings.epochs if epochs is None else epochs, eval_every=0.5,
            seed=settings.seed,
            checkpoint_dir=directory, checkpoint_every=checkpoint_every))
        if chaos:
            await _inject(cluster, training, settings, report)
        run = await training
    return run, report


async def _inject(cluster: Cluster, training: asyncio.Task[Run], settings: Settings,
                  report: dict[str, Any]) -> None:
    rng = random.Random(settings.seed)
    nodes = cluster.nodes
    assert nodes is not None
    for k in range(settings.faults):
        await asyncio.wait([training], timeout=settings.fault_every)
        if training.done():
            return
        recovery = cluster.recovery
        if recovery is None:
            return
        await recovery.settled()  # one fault at a time
        target = rng.choice(nodes.ids)
        sig = signal.SIGKILL if k % 2 == 0 else signal.SIGSTOP
        report["signals"].append({"time": time.perf_counter(), "node": target,
                                  "signal": sig.name, "epoch": recovery.events.started})
        os.kill(nodes.processes[target].pid, sig)
        failed = len([e for e in recovery.events.entries if e["event"] == "failure"])
        while len([e for e in recovery.events.entries if e["event"] == "failure"]) <= failed:
            await asyncio.wait([training], timeout=0.05)
            if training.done():
                return


def _detections(run: Run, report: dict[str, Any]) -> list[float]:
    failures = [e for e in run.events if e["event"] == "failure"]
    out = []
    for signal_, failure in zip(report["signals"], failures, strict=False):
        sent = signal_["time"] - signal_["epoch"]
        out.append(max(0.0, failure["time"] - sent))
    return out


def _hangs(run: Run, deadline: float) -> int:
    times = [0.0] + [h["time"] for h in run.history]
    examples = [0] + [h["examples"] for h in run.history]
    hangs, last = 0, 0.0
    for t, e, e_before in zip(times[1:], examples[1:], examples[:-1], strict=True):
        if e > e_before:
            if t - last > 3 * deadline:
                hangs += 1
            last = t
    return hangs


def _throughput(run: Run, unit_examples: int) -> float:
    """Examples per second of training, from the units the run did."""
    return run.units.get("done", 0) * unit_examples / max(run.seconds, 1e-9)


async def _overhead(settings: Settings, data: Dataset) -> dict[str, Any]:
    """Throughput lost to checkpoints at the default interval: paired runs without
    faults, alternating which of the pair goes first; the median over the pairs."""
    unit_examples = settings.unit_steps * settings.batch_size
    losses: list[float] = []
    bare_seconds: list[float] = []
    with_seconds: list[float] = []
    copies: list[float] = []
    writes: list[float] = []
    for pair in range(settings.overhead_pairs):
        order = [math.inf, DEFAULT_CHECKPOINT_EVERY]
        if pair % 2:
            order.reverse()
        throughput: dict[float, float] = {}
        for every in order:
            with tempfile.TemporaryDirectory() as directory:
                run_, _ = await _train(settings, data, chaos=False, checkpoint_every=every,
                                       directory=directory, epochs=settings.overhead_epochs)
            throughput[every] = _throughput(run_, unit_examples)
            (bare_seconds if math.isinf(every) else with_seconds).append(run_.seconds)
            if not math.isinf(every):
                taken = [e for e in run_.events if e["event"] == "checkpoint"]
                copies += [e["copy_seconds"] for e in taken]
                writes += [e["write_seconds"] for e in taken]
        losses.append(1 - throughput[DEFAULT_CHECKPOINT_EVERY] / throughput[math.inf])
    return {"checkpoint_overhead": round(statistics.median(losses), 4),
            "checkpoint_overhead_pairs": [round(v, 4) for v in losses],
            "overhead_seconds": {"without": [round(v, 2) for v in bare_seconds],
                                 "with": [round(v, 2) for v in with_seconds]},
            "checkpoint_copy_seconds": _stats(copies),
            "checkpoint_write_seconds": _stats(writes)}


async def run(settings: Settings | None = None) -> dict[str, Any]:
    settings = settings or Settings()
    data = teacher(n=settings.examples, features=settings.features, test=5000,
                   seed=settings.seed)
    overhead = await _overhead(settings, data)
    with tempfile.TemporaryDirectory() as b, tempfile.TemporaryDirectory() as c:
        clean, _ = await _train(settings, data, chaos=False,
                                checkpoint_every=DEFAULT_CHECKPOINT_EVERY, directory=b)
        chaos, report = await _train(settings, data, chaos=True,
                                     checkpoint_every=settings.checkpoint_every, directory=c)
    recovered = [e for e in chaos.events if e["event"] == "recovered"]
    restarts = [e for e in chaos.events if e["event"] in ("failure",)]
    recovery_seconds = [e["seconds"] for e in chaos.events if e["event"] == "serving"]
    restored = [e for e in chaos.events if e["event"] == "restored"]
    unit_examples = settings.unit_steps * settings.batch_size
    return {
        "faults": len(report["signals"]),
        "failures_detected": len(restarts),
        "recovered_actors": len(recovered),
        "clean_test_accuracy": clean.final["test_accuracy"],
        "chaos_test_accuracy": chaos.final["test_accuracy"],
        "accuracy_gap": round(clean.final["test_accuracy"] - chaos.final["test_accuracy"], 4),
        "detection_seconds": _stats(_detections(chaos, report)),
        "recovery_seconds": _stats(recovery_seconds),
        "examples_planned": chaos.units.get("planned", 0) * unit_examples,
        "units_done": chaos.units.get("done"),
        "units_planned": chaos.units.get("planned"),
        "units_reassigned": chaos.units.get("reassigned"),
        "examples_lost": chaos.units.get("examples_lost", 0),
        "examples_kept": chaos.units.get("examples_kept", 0),
        "updates_lost": sum(int(e.get("updates_lost", 0)) for e in restored),
        "hangs": _hangs(chaos, settings.liveness),
        "seconds": {"clean": round(clean.seconds, 2), "chaos": round(chaos.seconds, 2)},
        **overhead,
        "checkpoint_every_default": DEFAULT_CHECKPOINT_EVERY,
        "liveness_seconds": settings.liveness,
    }
