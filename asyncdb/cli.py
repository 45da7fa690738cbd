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

        result = run(transport.run(repeat=args.repeat))
    else:
        raise SystemExit(f"unknown benchmark {args.what!r}")
    _print_result(result, args.json)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="asyncdb", description=__doc__)
    parser.add_argument("-v", "--verbose", action="count", default=0)
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("bench", help="run a benchmark; prints figures (JSON with --json)")
    bench.add_argument("what", choices=["transport"])
    bench.add_argument("--json", action="store_true", help="one JSON object on stdout")
    bench.add_argument("--repeat", type=int, default=5, help="runs per figure (median)")
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
