"""`asyncdb train --algorithm sandblaster`: the options and the run, beside Downpour's."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from asyncdb.models import MLP

from .cluster import Cluster
from .datasets import Dataset
from .runs import Run
from .sandblaster import Sandblaster


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("Sandblaster L-BFGS (--algorithm sandblaster)")
    add = group.add_argument
    add("--algorithm", choices=["downpour", "sandblaster"], default="downpour",
        help="Downpour SGD (default) or Sandblaster L-BFGS")
    add("--lbfgs-memory", type=int, default=10, help="L-BFGS history pairs (default 10)")
    add("--portion-size", type=int, default=256, help="rows per work portion (default 256)")
    add("--iterations", type=int, default=100, help="L-BFGS iterations (default 100)")
    add("--gtol", type=float, default=1e-5, help="stop at this gradient norm")
    add("--ftol", type=float, default=0.0, help="stop at this relative loss decrease")
    add("--max-seconds", type=float, help="stop after this long")
    add("--backup-tasks", action=argparse.BooleanOptionalAction, default=True,
        help="copy outstanding portions to idle replicas (default on)")
    add("--l2", type=float, default=1e-4, help="L2 penalty on the weights (default 1e-4)")


def print_iteration(entry: dict[str, Any], out: TextIO = sys.stdout) -> None:
    step = "   -    " if entry["step"] is None else f"{entry['step']:.2e}"
    accuracy = entry.get("test_accuracy")
    shown = "   -  " if accuracy is None else f"{accuracy:.4f}"
    out.write(f"iteration {entry['iteration']:4d}  loss {entry['loss']:.6f}  "
              f"|g| {entry['grad_norm']:.2e}  step {step}  "
              f"evaluations {entry['line_search_losses']}+{entry['line_search_gradients']}  "
              f"test acc {shown}\n")
    out.flush()


async def train(args: argparse.Namespace, data: Dataset, hidden: list[int],
                cluster: Cluster, where: str) -> Run:
    model = MLP([data.n_features, *hidden, data.n_classes], l2=args.l2)
    algorithm = Sandblaster(memory=args.lbfgs_memory, portion_size=args.portion_size,
                            iterations=args.iterations, gtol=args.gtol, ftol=args.ftol,
                            max_seconds=args.max_seconds, backup_tasks=args.backup_tasks)
    split = f" of {args.partitions} partitions" if args.partitions > 1 else ""
    print(f"asyncdb train: {model} on {data}, {args.replicas} replicas{split} and {args.shards} "
          f"shards {where}, Sandblaster L-BFGS (memory {args.lbfgs_memory}, portions of "
          f"{args.portion_size} rows, up to {args.iterations} iterations)")
    async with cluster:
        run = await cluster.train(model, data, algorithm=algorithm, epochs=None,
                                  seed=args.seed, on_progress=print_iteration,
                                  checkpoint_dir=args.checkpoint_dir,
                                  checkpoint_every=args.checkpoint_every,
                                  max_restarts=args.max_restarts, resume=args.resume)
    final = run.final
    print(f"done in {run.seconds:.2f} s ({final['stop']}): test accuracy "
          f"{final['test_accuracy']:.4f}, loss {final['loss']:.6f}, "
          f"{final['iteration']} iterations, portions per replica "
          f"{final['portions_per_replica']}, backups {final['backups_used']} used of "
          f"{final['backups_issued']}, coordinator "
          f"{final['coordinator_bytes_per_iteration']:.0f} bytes/iteration"
          + (f", lost replicas {run.lost}" if run.lost else ""))
    path = args.history or Path("runs") / f"train-{time.strftime('%Y%m%d-%H%M%S')}.json"
    print(f"history: {run.save(path)}")
    return run
