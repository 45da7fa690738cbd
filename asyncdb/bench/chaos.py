"""`asyncdb bench chaos`: Downpour through a schedule of faults, against a clean run.

Trains the teacher task on `Cluster.local` (2 shards, 2 replicas). The checkpoint
overhead comes from `overhead_rounds` pairs of shorter clean runs, one without periodic
checkpoints and one with them at the default interval, in alternating order (the
machine's drift hits both alike), after a discarded warm-up run: one minus the median
of the pairs' throughput ratios; `checkpoint_time_share` is the time one checkpoint
takes over the interval.
Then a clean run and a chaos run of `epochs` each, for the accuracy gap: in the chaos
run, every `fault_every` seconds one random replica or shard process gets kill -9 or
SIGSTOP (in turn), the next fault only once the last one is recovered. Detection is
timed from the signal to the failure event, recovery from detection to the actor
serving again. `examples_lost` counts the examples of steps whose push reached some
shards but not all (their unit goes on from the last push every shard applied, so
they are done again); `examples_kept` those of failed units' steps not done again.
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
    overhead_epochs: float = 12.0
    overhead_rounds: int = 3
    seed: int = 0


def _stats(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"median": None, "max": None}
    return {"median": round(statistics.median(values), 3), "max": round(max(values), 3)}


async def _train(settings: Settings, data: Dataset, *, chaos: bool,
                 checkpoint_every: float, directory: str,
                 epochs: float | None = None) -> tuple[Run, dict[str, Any]]:
    model = MLP([settings.features, settings.hidden, settings.hidden, 10])
    algorithm = Downpour(batch_size=settings.batch_size, unit_steps=settings.unit_steps)
    report: dict[str, Any] = {"signals": []}
    async with Cluster.local(shards=2, replicas=2, liveness=settings.liveness) as cluster:
        training = asyncio.create_task(cluster.train(
            model, data, algorithm=algorithm, optimizer=Adagrad(lr=0.02),
            epochs=epochs or settings.epochs, eval_every=0.5, seed=settings.seed,
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


def _detections(run: Run, report: dict[str, Any], kind: str | None = None) -> list[float]:
    """Seconds from each signal (of `kind` only, if given) to its failure event."""
    failures = [e for e in run.events if e["event"] == "failure"]
    out = []
    for signal_, failure in zip(report["signals"], failures, strict=False):
        if kind is None or signal_["signal"] == kind:
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


async def overhead(settings: Settings, data: Dataset) -> dict[str, Any]:
    """Paired clean runs without and with checkpoints at the default interval."""
    unit_examples = settings.unit_steps * settings.batch_size
    ratios: list[float] = []
    taken: list[float] = []
    copies: list[float] = []  # shards' state to the driver
    writes: list[float] = []  # encoding, checksum, fsync (in a thread)
    with tempfile.TemporaryDirectory() as directory:  # a first run pays for warming up
        await _train(settings, data, chaos=False, directory=directory,
                     epochs=settings.overhead_epochs / 4, checkpoint_every=math.inf)
    for i in range(settings.overhead_rounds):
        pair: dict[bool, float] = {}
        for checkpoints in ((False, True) if i % 2 == 0 else (True, False)):
            with tempfile.TemporaryDirectory() as directory:
                run, _ = await _train(
                    settings, data, chaos=False, directory=directory,
                    epochs=settings.overhead_epochs,
                    checkpoint_every=DEFAULT_CHECKPOINT_EVERY if checkpoints else math.inf)
            pair[checkpoints] = _throughput(run, unit_examples)
            if checkpoints and run.checkpoints and run.checkpoints["taken"]:
                taken.append(run.checkpoints["seconds"] / run.checkpoints["taken"])
                rounds = [e for e in run.events if e["event"] == "checkpoint"]
                copies += [e["copy_seconds"] for e in rounds]
                writes += [e["write_seconds"] for e in rounds]
        ratios.append(pair[True] / pair[False])
    return {"checkpoint_overhead": round(1 - statistics.median(ratios), 4),
            "checkpoint_overhead_samples": [round(1 - r, 4) for r in ratios],
            "checkpoint_seconds_each": round(statistics.median(taken), 4) if taken else None,
            "checkpoint_time_share": (round(statistics.median(taken) / DEFAULT_CHECKPOINT_EVERY,
                                            5) if taken else None),
            "checkpoint_copy_seconds": _stats(copies),
            "checkpoint_write_seconds": _stats(writes),
            "checkpoint_every_default": DEFAULT_CHECKPOINT_EVERY}


async def run(settings: Settings | None = None) -> dict[str, Any]:
    settings = settings or Settings()
    data = teacher(n=settings.examples, features=settings.features, test=5000,
                   seed=settings.seed)
    costs = await overhead(settings, data)
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
        # a death the kernel reports (pidfd) against a freeze the deadline finds
        "detection_seconds_kill": _stats(_detections(chaos, report, "SIGKILL")),
        "detection_seconds_stop": _stats(_detections(chaos, report, "SIGSTOP")),
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
        **costs,
        "liveness_seconds": settings.liveness,
    }
