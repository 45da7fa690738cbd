"""`asyncdb train`: Downpour SGD from the command line.

What the user sees goes through one small interface, `Console` (header, data
generation, one call per evaluation, warnings, stop notices, the result), so a richer
display can replace the plain one without touching the training code.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import math
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from asyncdb.models import MLP

from . import datasets, sandblaster_cli
from .cluster import Cluster
from .dashboard import Dashboard
from .downpour import Downpour
from .errors import ConfigError
from .optim import SGD, Adagrad, UpdateRule
from .progress import TrainingProgress
from .runs import Run, unique_dir

log = logging.getLogger("asyncdb.train")


def positive(kind: Callable[[str], float]) -> Callable[[str], Any]:
    """An argparse type: a finite number above zero."""
    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not math.isfinite(value) or value <= 0:
            raise argparse.ArgumentTypeError(f"must be above 0, got {text}")
        return value
    return parse


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"cannot be negative, got {text}")
    return value


def hidden_sizes(text: str) -> list[int]:
    """'256,128' -> [256, 128]; '' -> [] (no hidden layer)."""
    sizes = []
    for part in text.split(","):
        if not part.strip():
            continue
        try:
            size = int(part)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"layer sizes are comma-separated whole numbers, got {text!r}") from None
        if size < 1:
            raise argparse.ArgumentTypeError(f"a layer needs at least 1 unit, got {size}")
        sizes.append(size)
    return sizes


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    count, number = positive(int), positive(float)
    add("--data", default="digits", metavar="NAME|PATH",
        help=f"data set ({', '.join(datasets.names())}) or a .npz/.csv file (default digits)")
    add("--label", default="label", metavar="NAME", help="CSV label column (default label)")
    add("--examples", type=count, help="teacher data: training examples")
    add("--hidden", type=hidden_sizes, default=[128],
        help="hidden layer sizes, comma-separated ('' for none; default 128)")
    add("--replicas", type=count, default=2, help="model replicas (default 2)")
    add("--shards", type=count, default=2, help="parameter shards (default 2)")
    add("--inproc", action="store_true", help="all actors in this process")
    add("--peers", help="comma-separated ws:// or wss:// URLs of `asyncdb serve` nodes")
    add("--secret-file", type=Path, help="with --peers: the shared secret")
    add("--ca", help="with wss:// peers: CA bundle to verify them")
    add("--insecure", action="store_true", help="with wss:// peers: skip verification")
    add("--colocate", action="store_true", help="shards live in the replicas' processes")
    add("--epochs", type=number, default=20.0, help="passes over the training data")
    add("--batch-size", type=count, default=32)
    add("--optimizer", choices=["adagrad", "sgd"], default="adagrad")
    add("--lr", type=number, help="learning rate (adagrad 0.05, sgd 0.1)")
    add("--n-fetch", type=count, default=1, help="steps between parameter fetches")
    add("--n-push", type=count, default=1, help="steps between gradient pushes")
    add("--fetch-rate", type=number, help="fetches per second per replica")
    add("--push-rate", type=number, help="pushes per second per replica")
    add("--fetch-bytes-rate", type=number, help="fetched bytes per second per replica")
    add("--push-bytes-rate", type=number, help="pushed bytes per second per replica")
    add("--warm-start", type=non_negative_int, default=0, metavar="STEPS",
        help="steps replica 0 trains alone before the others join")
    add("--engine", choices=["blocked", "numexpr"], default="blocked",
        help="how shards apply updates")
    add("--seed", type=int, default=0)
    add("--eval-every", type=number, default=0.5, help="seconds between evaluations")
    add("--save", type=Path, metavar="DIR",
        help="the run directory (default runs/train-<time>-<pid>/)")
    add("--history", type=Path, metavar="FILE", help="an extra copy of the history (JSON)")
    # Fault tolerance: shard checkpoints, restarts of failed nodes, resuming a run.
    add("--checkpoint-dir", type=Path, metavar="DIR",
        help="write shard checkpoints here (and resume from them with --resume DIR)")
    add("--checkpoint-every", type=number, metavar="SECONDS",
        help="seconds between shard checkpoints (default 10)")
    add("--max-restarts", type=non_negative_int, default=10,
        help="failed nodes replaced per run before giving up (default 10)")
    add("--resume", type=Path, metavar="DIR",
        help="continue the run whose checkpoints are in DIR (same options otherwise)")
    add("--dashboard", nargs="?", const="127.0.0.1:0", metavar="HOST:PORT",
        help="serve a live dashboard while training (default 127.0.0.1, a free port)")
    # Model parallelism: each replica split across partitions (processes, or peers).
    add("--partitions", type=count, default=1,
        help="partitions per replica (default 1); needs --shards at least as many")
    sandblaster_cli.add_arguments(parser)  # --algorithm sandblaster and its options


class Console:
    """What `asyncdb train` shows: the header, the progress of the run (a tqdm bar on a
    terminal, one plain line per evaluation elsewhere: `TrainingProgress`), notices and
    warnings on stderr, the result."""

    def __init__(self, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> None:
        self.out, self.err = out, err
        self.bar: TrainingProgress | None = None

    def header(self, line: str, total_examples: int) -> None:
        print(line, file=self.out, flush=True)
        self.bar = TrainingProgress(total_examples, self.out)

    def generating(self, what: str) -> Callable[[float], None]:
        """A callback taking the fraction of `what` generated so far."""
        def report(done: float) -> None:
            if self.err.isatty():
                self.err.write(f"\rgenerating {what}: {done:6.1%}")
                if done >= 1.0:
                    self.err.write("\n")
            elif done == 0.0 or done >= 1.0:
                self.err.write(f"generating {what}: {done:.0%}\n")
            self.err.flush()
        return report

    def progress(self, entry: dict[str, Any]) -> None:
        if self.bar is not None:
            self.bar.update(entry)

    def write(self, text: str) -> None:
        """A line of output that leaves the bar intact."""
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, file=self.out, flush=True)

    def notice(self, text: str) -> None:
        if self.bar is not None and self.bar.tty:
            self.out.write("\n")  # below the bar's line
        print(text, file=self.err, flush=True)

    def warn(self, text: str) -> None:
        self.notice(f"warning: {text}")

    def result(self, text: str) -> None:
        if self.bar is not None:
            self.bar.close()
        print(text, file=self.out, flush=True)


class StopOnSignal:
    """The first SIGINT or SIGTERM ends the run early (the history so far is saved);
    a second one exits at once."""

    def __init__(self, cluster: Cluster, console: Console) -> None:
        self.cluster = cluster
        self.console = console
        self.signal: int | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None

    def __enter__(self) -> StopOnSignal:
        self._loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._loop.add_signal_handler(sig, self._received, sig)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._loop is not None
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._loop.remove_signal_handler(sig)
        for task in self._tasks:
            task.cancel()

    @property
    def exit_code(self) -> int:
        return 0 if self.signal is None else 128 + self.signal

    def _received(self, sig: int) -> None:
        if self.signal is not None:
            self.console.notice("asyncdb train: stopped at once")
            sys.stdout.flush()
            os._exit(self.exit_code)
        self.signal = sig
        name = "Ctrl-C" if sig == signal.SIGINT else signal.Signals(sig).name
        self.console.notice(f"asyncdb train: {name}: stopping the run and saving what it has "
                            f"({name} again to quit at once)")
        assert self._loop is not None
        task = self._loop.create_task(self._stop())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _stop(self) -> None:
        try:
            await self.cluster.stop_training()
        except Exception as exc:  # the run ends anyway; say why it was not sooner
            log.warning("could not stop the run early: %r", exc)


def _optimizer(args: argparse.Namespace) -> UpdateRule:
    if args.optimizer == "sgd":
        return SGD(lr=args.lr if args.lr is not None else 0.1)
    return Adagrad(lr=args.lr if args.lr is not None else 0.05)


def load_data(args: argparse.Namespace, console: Console) -> datasets.Dataset:
    """The data set the arguments name (before the event loop starts, so Ctrl-C while
    generating data simply ends the program)."""
    if args.data == "teacher":
        options: dict[str, Any] = {"progress": console.generating("the teacher data")}
        if args.examples is not None:
            options["n"] = args.examples
        return datasets.load("teacher", **options)
    if args.examples is not None:
        raise ConfigError("--examples applies to the teacher data only")
    if datasets.is_path(args.data):
        return datasets.load(args.data, label=args.label)
    return datasets.load(args.data)


def fault_options(args: argparse.Namespace) -> dict[str, Any]:
    """`Cluster.train`'s checkpoint and restart options from the command line."""
    return {"checkpoint_dir": args.checkpoint_dir, "checkpoint_every": args.checkpoint_every,
            "max_restarts": args.max_restarts, "resume": args.resume}


def _cluster(args: argparse.Namespace) -> tuple[Cluster, str]:
    if args.peers:
        from .serve import client_ssl, read_secret

        urls = [u.strip() for u in args.peers.split(",") if u.strip()]
        for url in urls:
            if not url.startswith(("ws://", "wss://")):
                raise ConfigError(f"--peers: {url!r} must start with ws:// or wss://")
        if args.secret_file is None:
            raise ConfigError("--peers needs --secret-file")
        cluster = Cluster.connect(urls, read_secret(args.secret_file), shards=args.shards,
                                  replicas=args.replicas, partitions=args.partitions,
                                  ssl_context=client_ssl(args.ca, args.insecure))
        return cluster, f"on {len(urls)} peers"
    if args.inproc:
        return (Cluster.inproc(args.shards, args.replicas, partitions=args.partitions),
                "in this process")
    return (Cluster.local(args.shards, args.replicas, colocate=args.colocate,
                          partitions=args.partitions), "in node processes on this host")


def rate_limits(algorithm: Downpour, param_bytes: int) -> tuple[str, float | None]:
    """The limits in force, in words, and the most pushes per second per replica they
    allow (None without a push limit)."""
    parts, ceiling = [], None
    for what, ops, nbytes in (("fetch", algorithm.fetch_rate, algorithm.fetch_bytes_rate),
                              ("push", algorithm.push_rate, algorithm.push_bytes_rate)):
        limits = []
        most = math.inf
        if ops is not None:
            limits.append(f"{ops:g}/s")
            most = ops
        if nbytes is not None:
            limits.append(f"{nbytes:g} B/s")
            most = min(most, nbytes / param_bytes)
        if limits:
            parts.append(f"{what} <= {' and '.join(limits)}")
            if what == "push":
                ceiling = most
    words = ("rate limits per replica: " + ", ".join(parts)) if parts else "no rate limits"
    return words, ceiling


def _check_rates(console: Console, run: Run, ceiling: float | None,
                 algorithm: Downpour) -> None:
    names = ("fetch_rate", "push_rate", "fetch_bytes_rate", "push_bytes_rate")
    if all(getattr(algorithm, name) is None for name in names):
        return  # no limits: updates are as many as pushes
    steps = sum(int(r.get("steps", 0)) for r in run.replicas.values())
    updates = int(run.final["updates"]) / max(1, len(run.shards))
    if steps and updates < 0.25 * steps / algorithm.n_push:
        console.warn(f"the rate limits let through {updates:.0f} updates per shard in "
                     f"{run.seconds:.1f} s ({updates / max(run.seconds, 1e-9):.2f} updates/s) "
                     f"for {steps} steps: the model barely trained")


async def train(args: argparse.Namespace, data: datasets.Dataset,
                console: Console | None = None) -> tuple[Run, int]:
    """Train as the arguments say; return the run and the exit code (128 + signal
    number when a signal stopped it early)."""
    console = console or Console()
    model = MLP([data.n_features, *args.hidden, data.n_classes])
    algorithm = Downpour(
        n_fetch=args.n_fetch, n_push=args.n_push, batch_size=args.batch_size,
        fetch_rate=args.fetch_rate, push_rate=args.push_rate,
        fetch_bytes_rate=args.fetch_bytes_rate, push_bytes_rate=args.push_bytes_rate,
        warm_start_steps=args.warm_start)
    optimizer = _optimizer(args)
    cluster, where = _cluster(args)
    if args.algorithm == "sandblaster":
        if args.dashboard is not None:
            raise ConfigError("--dashboard shows Downpour runs; Sandblaster prints each "
                              "iteration instead")
        return await sandblaster_cli.train(args, data, args.hidden, cluster, where), 0
    limits, ceiling = rate_limits(algorithm, 4 * model.num_params())
    split = f" of {args.partitions} partitions" if args.partitions > 1 else ""
    console.header(
        f"asyncdb train: {model} on {data}, {args.replicas} replicas{split} and {args.shards} "
        f"shards {where}, Downpour(n_fetch={args.n_fetch}, n_push={args.n_push}, "
        f"batch {args.batch_size}), {optimizer}, {args.epochs:g} epochs, {limits}",
        int(args.epochs * len(data.x_train)))
    if ceiling is not None and ceiling < 1.0:
        console.warn(f"the push limits allow at most {ceiling:.3g} updates/s per replica "
                     f"(pushes of {4 * model.num_params():,} bytes): the run will make "
                     "almost no updates")
    dashboard = Dashboard(cluster, title=f"asyncdb train: {model} on {data.name}")
    with StopOnSignal(cluster, console) as stopper:
        async with dashboard:
            if args.dashboard is not None:  # before the cluster starts: a bad address fails
                console.write(f"dashboard: {await dashboard.start(args.dashboard)}")
            async with cluster:
                run = await cluster.train(model, data, algorithm=algorithm,
                                          optimizer=optimizer, epochs=args.epochs,
                                          seed=args.seed, eval_every=args.eval_every,
                                          engine=args.engine,
                                          on_progress=dashboard.chain(console.progress),
                                          **fault_options(args))
            dashboard.finish()
        run.config["command"] = {k: v for k, v in vars(args).items() if k != "func"}
        _report(console, run, args)
        _check_rates(console, run, ceiling, algorithm)
    return run, stopper.exit_code


def _report(console: Console, run: Run, args: argparse.Namespace) -> None:
    final = run.final
    stopped = "stopped early after" if run.stopped else "done in"
    console.result(
        f"{stopped} {run.seconds:.2f} s: test accuracy {final['test_accuracy']:.4f}, "
        f"loss {final['loss'] if final['loss'] is None else round(final['loss'], 4)}, "
        f"{final['examples_per_s']:.0f} examples/s, {final['updates']} shard updates, "
        f"staleness mean {final['staleness_mean']:.2f} max {final['staleness_max']}"
        + (f", lost replicas {run.lost}" if run.lost else ""))
    directory = args.save if args.save is not None else unique_dir("runs")
    console.result(f"run saved in {run.save(directory)}/")
    if args.history is not None:
        console.result(f"history: {run.save_history(args.history)}")
    with contextlib.suppress(Exception):
        sys.stdout.flush()
