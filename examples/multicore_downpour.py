"""Downpour SGD on every core of this machine, from Python.

    python examples/multicore_downpour.py [--replicas N] [--epochs E]

Shards and replicas run in node processes on this host, linked by shared-memory
rings; the training data is shared between them, one copy in memory.
"""

from __future__ import annotations

import argparse
import os

import asyncdb
from asyncdb.models import MLP


async def main(replicas: int, shards: int, epochs: float) -> asyncdb.Run:
    data = asyncdb.datasets.load("digits")
    model = MLP([data.n_features, 128, data.n_classes])
    async with asyncdb.Cluster.local(shards=shards, replicas=replicas) as cluster:
        run = await cluster.train(
            model, data,
            algorithm=asyncdb.Downpour(n_fetch=1, n_push=1, batch_size=32),
            optimizer=asyncdb.Adagrad(lr=0.05), epochs=epochs,
            on_progress=lambda e: print(f"{e['time']:6.2f} s  loss {e['loss']:.4f}  "
                                        f"validation accuracy {e['val_accuracy']:.4f}"))
    final = run.final
    print(f"{replicas} replicas: test accuracy {final['test_accuracy']:.4f}, "
          f"{final['examples_per_s']:.0f} examples/s, staleness {final['staleness_mean']:.2f}")
    return run


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--replicas", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    parser.add_argument("--shards", type=int, default=1)
    parser.add_argument("--epochs", type=float, default=20)
    args = parser.parse_args()
    asyncdb.run(main(args.replicas, args.shards, args.epochs))
