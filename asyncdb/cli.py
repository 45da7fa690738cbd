"""The `asyncdb` command: train, serve, bench."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from typing import Any

from .loop import run


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

        result = run(transport.run(repeat=args.repeat or 5))
    elif args.what == "downpour":
        from .bench import downpour

        overrides = {k: v for k, v in {"examples": args.examples, "shards": args.shards,
                                       "n_fetch": args.n_fetch, "n_push": args.n_push,
                                       "colocate": args.colocate}.items()
                     if v is not None}
        result = run(downpour.run(downpour.Settings(**overrides), repeat=args.repeat or 3))
    else:
        raise SystemExit(f"unknown benchmark {args.what!r}")
    _print_result(result, args.json)
    return 0


def _train(args: argparse.Namespace) -> int:
    from .train import train

    run(train(args))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="asyncdb", description=__doc__)
    parser.add_argument("-v", "--verbose", action="count", default=0)
    sub = parser.add_subparsers(dest="command", required=True)
    from .train import add_arguments

    train = sub.add_parser("train", help="train with Downpour SGD (defaults work as they are)")
    add_arguments(train)
    train.set_defaults(func=_train)
    bench = sub.add_parser("bench", help="run a benchmark; prints figures (JSON with --json)")
    bench.add_argument("what", choices=["transport", "downpour"])
    bench.add_argument("--json", action="store_true", help="one JSON object on stdout")
    bench.add_argument("--repeat", type=int, default=None,
                       help="runs per figure, medians reported (transport 5, downpour 3)")
    bench.add_argument("--examples", type=int, help="downpour: training examples")
    bench.add_argument("--shards", type=int, help="downpour: parameter shards")
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
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
