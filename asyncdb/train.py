"""`asyncdb train`: Downpour SGD from the command line, with a progress bar."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from asyncdb.models import MLP

from . import datasets, sandblaster_cli
from .cluster import Cluster, Run
from .dashboard import Dashboard
from .downpour import Downpour
from .errors import ConfigError
from .optim import SGD, Adagrad, UpdateRule
from .progress import TrainingProgress


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--data", default="digits", choices=datasets.names(), help="data set (default digits)")
    add("--examples", type=int, help="teacher data: training examples")
    add("--hidden", default="128", help="hidden layer sizes, comma-separated ('' for none)")
    add("--replicas", type=int, default=2, help="model replicas (default 2)")
    add("--shards", type=int, default=2, help="parameter shards (default 2)")
    add("--inproc", action="store_true", help="all actors in this process")
    add("--peers", help="comma-separated ws:// or wss:// URLs of `asyncdb serve` nodes")
    add("--secret-file", type=Path, help="with --peers: the shared secret")
    add("--ca", help="with wss:// peers: CA bundle to verify them")
    add("--insecure", action="store_true", help="with wss:// peers: skip verification")
    add("--colocate", action="store_true", help="shards live in the replicas' processes")
    add("--epochs", type=float, default=20.0, help="passes over the training data")
    add("--batch-size", type=int, default=32)
    add("--optimizer", choices=["adagrad", "sgd"], default="adagrad")
    add("--lr", type=float, help="learning rate (adagrad 0.05, sgd 0.1)")
    add("--n-fetch", type=int, default=1, help="steps between parameter fetches")
    add("--n-push", type=int, default=1, help="steps between gradient pushes")
    add("--fetch-rate", type=float, help="fetches per second per replica")
    add("--push-rate", type=float, help="pushes per second per replica")
    add("--fetch-bytes-rate", type=float, help="fetched bytes per second per replica")
    add("--push-bytes-rate", type=float, help="pushed bytes per second per replica")
    add("--warm-start", type=int, default=0, metavar="STEPS",
        help="steps replica 0 trains alone before the others join")
    add("--engine", choices=["blocked", "numexpr"], default="blocked",
        help="how shards apply updates")
    add("--seed", type=int, default=0)
    add("--eval-every", type=float, default=0.5, help="seconds between evaluations")
    add("--history", type=Path, help="where to write the run's history "
                                     "(default runs/train-<time>.json)")
    add("--dashboard", nargs="?", const="127.0.0.1:0", metavar="HOST:PORT",
        help="serve a live dashboard while training (default 127.0.0.1, a free port)")
    # Model parallelism: each replica split across partitions (processes, or peers).
    add("--partitions", type=int, default=1,
        help="partitions per replica (default 1); needs --shards at least as many")
    sandblaster_cli.add_arguments(parser)  # --algorithm sandblaster and its options


def _optimizer(args: argparse.Namespace) -> UpdateRule:
    if args.optimizer == "sgd":
        return SGD(lr=args.lr if args.lr is not None else 0.1)
    return Adagrad(lr=args.lr if args.lr is not None else 0.05)


async def train(args: argparse.Namespace) -> Run:
    options: dict[str, int] = {} if args.examples is None else {"n": args.examples}
    data = datasets.load(args.data, **options)
    hidden = [int(h) for h in str(args.hidden).split(",") if h.strip()]
    model = MLP([data.n_features, *hidden, data.n_classes])
    algorithm = Downpour(
        n_fetch=args.n_fetch, n_push=args.n_push, batch_size=args.batch_size,
        fetch_rate=args.fetch_rate, push_rate=args.push_rate,
        fetch_bytes_rate=args.fetch_bytes_rate, push_bytes_rate=args.push_bytes_rate,
        warm_start_steps=args.warm_start)
    optimizer = _optimizer(args)
    if args.peers:
        from .serve import client_ssl, read_secret

        if args.secret_file is None:
            raise ConfigError("--peers needs --secret-file")
        urls = [u.strip() for u in args.peers.split(",") if u.strip()]
        cluster = Cluster.connect(urls, read_secret(args.secret_file), shards=args.shards,
                                  replicas=args.replicas, partitions=args.partitions,
                                  ssl_context=client_ssl(args.ca, args.insecure))
        where = f"on {len(urls)} peers"
    elif args.inproc:
        cluster = Cluster.inproc(args.shards, args.replicas, partitions=args.partitions)
        where = "in this process"
    else:
        cluster = Cluster.local(args.shards, args.replicas, colocate=args.colocate,
                                partitions=args.partitions)
        where = "in node processes on this host"
    if args.algorithm == "sandblaster":
        if args.dashboard is not None:
            raise ConfigError("--dashboard shows Downpour runs; Sandblaster prints each "
                              "iteration instead")
        return await sandblaster_cli.train(args, data, hidden, cluster, where)
    split = f" of {args.partitions} partitions" if args.partitions > 1 else ""
    print(f"asyncdb train: {model} on {data}, {args.replicas} replicas{split} and {args.shards} "
          f"shards {where}, Downpour(n_fetch={args.n_fetch}, n_push={args.n_push}, "
          f"batch {args.batch_size}), {optimizer}, {args.epochs:g} epochs")
    bar = TrainingProgress(int(args.epochs * len(data.x_train)))
    dashboard = Dashboard(cluster, title=f"asyncdb train: {model} on {data.name}")
    async with dashboard:
        if args.dashboard is not None:  # before the cluster starts: a bad address fails fast
            bar.write(f"dashboard: {await dashboard.start(args.dashboard)}")
        async with cluster:
            run = await cluster.train(model, data, algorithm=algorithm, optimizer=optimizer,
                                      epochs=args.epochs, seed=args.seed,
                                      eval_every=args.eval_every, engine=args.engine,
                                      on_progress=dashboard.chain(bar.update))
            bar.close()  # before the nodes stop, so its clock shows training time
        dashboard.finish()
    final = run.final
    print(f"done in {run.seconds:.2f} s: test accuracy {final['test_accuracy']:.4f}, "
          f"loss {final['loss']:.4f}, {final['examples_per_s']:.0f} examples/s, "
          f"{final['updates']} shard updates, staleness mean {final['staleness_mean']:.2f} "
          f"max {final['staleness_max']}"
          + (f", lost replicas {run.lost}" if run.lost else ""))
    path = args.history or Path("runs") / f"train-{time.strftime('%Y%m%d-%H%M%S')}.json"
    print(f"history: {run.save(path)}")
    return run
