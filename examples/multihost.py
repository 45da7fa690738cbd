"""Several hosts: two `asyncdb serve` nodes and a driver, here all on 127.0.0.1.

On real hosts, run on each one (same secret file everywhere, copied securely, readable
by its owner alone), naming the cluster's other nodes, which it may dial:

    asyncdb serve --listen 0.0.0.0:7070 --secret-file ~/.asyncdb-secret \
        --peers ws://host1:7070,ws://host2:7070

and on the driver's host:

    asyncdb train --peers ws://host1:7070,ws://host2:7070 --secret-file ~/.asyncdb-secret

This script does the same on one machine: it starts the two nodes as subprocesses on
two free loopback ports, trains through them from Python with `Cluster.connect`, and stops
them. Each replica's slice of the training data is streamed to it from the driver.
"""

from __future__ import annotations

import argparse
import secrets
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import asyncdb
from asyncdb.models import MLP


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_node(secret_file: Path, name: str, port: int,
               peers: list[str]) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "asyncdb", "serve", "--listen", f"127.0.0.1:{port}",
         "--secret-file", str(secret_file), "--name", name, "--peers", ",".join(peers)],
        stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()  # "asyncdb serve: node NAME listening on ws://HOST:PORT"
    if not line:
        raise RuntimeError(f"node {name} did not start")
    return proc, line.split()[-1]


async def train(urls: list[str], secret: bytes, epochs: float) -> asyncdb.Run:
    data = asyncdb.datasets.load("digits")
    async with asyncdb.Cluster.connect(urls, secret, shards=2, replicas=2) as cluster:
        print("connected to", cluster.peer_ids)
        return await cluster.train(MLP([64, 128, 10]), data,
                                   algorithm=asyncdb.Downpour(batch_size=32),
                                   optimizer=asyncdb.Adagrad(lr=0.05), epochs=epochs)


def main(epochs: float = 20) -> asyncdb.Run:
    secret = secrets.token_hex(32).encode()
    with tempfile.TemporaryDirectory() as tmp:
        secret_file = Path(tmp) / "secret"
        secret_file.write_bytes(secret)
        secret_file.chmod(0o600)
        ports = [free_port(), free_port()]
        urls = [f"ws://127.0.0.1:{port}" for port in ports]
        nodes = [start_node(secret_file, name, port, urls)
                 for name, port in zip(("host-a", "host-b"), ports, strict=True)]
        try:
            run = asyncdb.run(train([url for _proc, url in nodes], secret, epochs))
        finally:
            for proc, _url in nodes:
                proc.terminate()
                proc.wait()
                if proc.stdout is not None:
                    proc.stdout.close()
    final = run.final
    print(f"test accuracy {final['test_accuracy']:.4f}, {final['examples_per_s']:.0f} "
          f"examples/s over websockets, staleness {final['staleness_mean']:.2f}")
    return run


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=float, default=20)
    main(parser.parse_args().epochs)
