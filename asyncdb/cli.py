"""The `asyncdb` command: train, predict, evaluate, serve, bench.

Every input error is one line on stderr (exit code 2 for bad arguments, 1 for the rest),
never a traceback; `-v` adds the logs.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

from .errors import AsyncDBError, ConfigError, RunError
from .loop import run
from .runs import save_partial


class Parser(argparse.ArgumentParser):
    """argparse, but an error is one line, not the usage text and a line."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _print_result(result: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(result))
        return
    for key, value in result.items():
        if key != "samples":
            print(f"{key:>28}  {value}")


def _bench(args: argparse.Namespace) -> int:
    if args.what == "transport":
        from .bench import transport

        result = run(transport.run(repeat=args.repeat or 9))
    elif args.what == "downpour":
        from .bench import downpour

        overrides = {k: v for k, v in {"examples": args.examples, "shards": args.shards,
                                       "n_fetch": args.n_fetch, "n_push": args.n_push,
                                       "colocate": args.colocate}.items()
                     if v is not None}
        settings = downpour.Settings(**overrides)
        if args.sizes:
            from .bench import sizes

            result = run(sizes.run(settings))
        else:
            result = run(downpour.run(settings, repeat=args.repeat or 3))
    elif args.what == "chaos":
        from .bench import chaos

        result = run(chaos.run(chaos.Settings(
            **({} if args.examples is None else {"examples": args.examples}))))
    elif args.what == "sandblaster":
        from .bench import sandblaster

        result = run(sandblaster.run(repeat=args.repeat or 3))
    elif args.what == "modelparallel":
        from .bench import modelparallel

        result = run(modelparallel.run(repeat=args.repeat or 3))
    else:
        raise SystemExit(f"unknown benchmark {args.what!r}")
    _print_result(result, args.json)
    return 0


def _train(args: argparse.Namespace) -> int:
    from .train import Console, load_data, train

    console = Console()
    data = load_data(args, console)
    try:
        _, code = run(train(args, data, console))
    except RunError as exc:  # the run could not go on: keep what it did
        if exc.history:
            path = save_partial(args.save, exc)
            print(f"asyncdb train: the history so far is in {path}", file=sys.stderr)
        raise
    return code


def _predict(args: argparse.Namespace) -> int:
    from .datasets import read_features
    from .runs import load

    saved = load(args.model)
    classes = saved.predict(read_features(args.data, args.label or saved.label))
    if args.output is None:
        np.savetxt(sys.stdout, classes, fmt="%d")
    else:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        np.savetxt(args.output, classes, fmt="%d", header="label", comments="")
        print(f"{len(classes)} predictions written to {args.output}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from .datasets.files import read_arrays
    from .runs import load

    saved = load(args.model)
    arrays = read_arrays(args.data, args.label or saved.label)
    result = saved.evaluate(arrays["x"], arrays["y"])
    print(f"{args.data}: {result['rows']} rows, loss {result['loss']:.4f}, "
          f"accuracy {result['accuracy']:.4f}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from .serve import client_ssl, read_secret, serve, server_ssl
    from .system import PeerPolicy

    for flag in ("max_params", "max_data_bytes", "max_actors", "max_frame_bytes",
                 "max_pending", "auth_timeout"):
        if getattr(args, flag) < 1:
            raise ConfigError(f"--{flag.replace('_', '-')} must be at least 1")
    peers = tuple(u.strip() for u in (args.peers or "").split(",") if u.strip())
    policy = PeerPolicy(max_params=args.max_params, max_data_bytes=args.max_data_bytes,
                        max_actors=args.max_actors, allow_shutdown=args.allow_remote_shutdown,
                        dial=peers)
    run(serve(args.listen, read_secret(args.secret_file), name=args.name,
              ssl_context=server_ssl(args.cert, args.key),
              dial_ssl=client_ssl(args.ca, args.insecure), imports=tuple(args.imports),
              max_frame_bytes=args.max_frame_bytes, policy=policy,
              max_pending=args.max_pending, auth_timeout=args.auth_timeout,
              metrics=args.metrics))
    return 0


def _add_saved_model_commands(sub: Any) -> None:
    predict = sub.add_parser("predict", help="predict the class of each row with a saved run")
    evaluate = sub.add_parser("evaluate", help="loss and accuracy of a saved run on data")
    for command in (predict, evaluate):
        command.add_argument("--model", required=True, type=Path, metavar="DIR",
                             help="a run directory (asyncdb train --save DIR)")
        command.add_argument("--data", required=True, type=Path, metavar="FILE",
                             help=".npz (key x, and y to evaluate) or .csv with a header")
        command.add_argument("--label", metavar="NAME",
                             help="CSV label column (default: the one the run trained on)")
    predict.add_argument("-o", "--output", type=Path, metavar="FILE",
                         help="write a CSV with one label per row (default: stdout)")
    predict.set_defaults(func=_predict)
    evaluate.set_defaults(func=_evaluate)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="asyncdb", description=__doc__)
    parser.add_argument("-v", "--verbose", action="count", default=0)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    from .train import add_arguments

    train = sub.add_parser("train", help="train with Downpour SGD (defaults work as they are)")
    add_arguments(train)
    train.set_defaults(func=_train)
    _add_saved_model_commands(sub)
    serve = sub.add_parser("serve", help="run a node that other hosts' drivers can use")
    serve.add_argument("--listen", required=True, metavar="HOST:PORT")
    serve.add_argument("--secret-file", required=True, type=Path,
                       help="file holding the secret shared by every node and driver")
    serve.add_argument("--name", help="this node's name (default HOSTNAME:PORT)")
    serve.add_argument("--cert", help="TLS certificate (PEM): serve wss://")
    serve.add_argument("--key", help="TLS private key (PEM)")
    serve.add_argument("--ca", help="CA bundle to verify wss:// peers this node dials")
    serve.add_argument("--insecure", action="store_true",
                       help="do not verify wss:// peers' certificates")
    serve.add_argument("--import", dest="imports", action="append", default=[],
                       metavar="MODULE", help="import a module that registers actor types")
    serve.add_argument("--max-frame-bytes", type=int, default=1 << 30,
                       help="largest frame a peer may send (default 1 GiB)")
    serve.add_argument("--peers", metavar="URLS",
                       help="comma-separated URLs (ws://host:port, or a bare host for any "
                            "port) of the other nodes of this cluster: the only ones this "
                            "node dials when a driver asks it to (default: none)")
    serve.add_argument("--max-params", type=int, default=1 << 26,
                       help="largest model or shard slice, in parameters, a peer may ask "
                            "for (default 2**26, about 1 GiB of replica buffers)")
    serve.add_argument("--max-data-bytes", type=int, default=1 << 30,
                       help="largest data a peer may send with one actor, or make it "
                            "allocate for batches (default 1 GiB)")
    serve.add_argument("--max-actors", type=int, default=64,
                       help="most actors one connection may own at once (default 64)")
    serve.add_argument("--max-pending", type=int, default=64,
                       help="most connections waiting to authenticate; a newcomer drops "
                            "the oldest (default 64)")
    serve.add_argument("--auth-timeout", type=float, default=10.0,
                       help="seconds a connection has to send its HTTP headers and "
                            "authenticate (default 10)")
    serve.add_argument("--allow-remote-shutdown", action="store_true",
                       help="let authenticated peers shut this node down (default: only "
                            "SIGINT or SIGTERM here)")
    serve.add_argument("--metrics", metavar="HOST:PORT",
                       help="serve Prometheus metrics at http://HOST:PORT/metrics "
                            "(loopback unless HOST is given; off by default)")
    serve.set_defaults(func=_serve)
    from . import plot

    plotting = sub.add_parser("plot", help="draw accuracy and loss curves of saved runs")
    plot.add_arguments(plotting)
    plotting.set_defaults(func=plot.main)
    bench = sub.add_parser("bench", help="run a benchmark; prints figures (JSON with --json)")
    bench.add_argument("what", choices=["transport", "downpour", "modelparallel",
                                        "sandblaster", "chaos"])
    bench.add_argument("--json", action="store_true", help="one JSON object on stdout")
    bench.add_argument("--repeat", type=int, default=None,
                       help="runs per figure, medians reported (transport 9, downpour 3, "
                            "modelparallel 3, sandblaster 3)")
    bench.add_argument("--examples", type=int, help="downpour: training examples")
    bench.add_argument("--shards", type=int, help="downpour: parameter shards")
    bench.add_argument("--sizes", action="store_true",
                       help="downpour: 2 replicas against one process for MLPs of about "
                            "1M, 10M and 50M parameters, Hogwild! at the smallest")
    bench.add_argument("--n-fetch", type=int, help="downpour: steps between fetches")
    bench.add_argument("--n-push", type=int, help="downpour: steps between pushes")
    bench.add_argument("--colocate", action=argparse.BooleanOptionalAction, default=None,
                       help="downpour: shards live in the replicas' processes")
    bench.set_defaults(func=_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.WARNING - 10 * args.verbose
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        code: int = args.func(args)
    except AsyncDBError as exc:
        print(f"asyncdb {args.command}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # files and sockets the user named
        print(f"asyncdb {args.command}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
