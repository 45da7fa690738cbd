"""A driver run as its own process by test_process.py: starts two node processes,
prints their pids, then waits to be interrupted or killed."""

import asyncio
import sys

import asyncdb


async def main() -> None:
    async with asyncdb.Node("driver") as node, asyncdb.LocalNodes(node, 2) as nodes:
        print(" ".join(str(nodes.processes[i].pid) for i in nodes.ids), flush=True)
        await asyncio.sleep(60)


if __name__ == "__main__":
    try:
        asyncdb.run(main())
    except KeyboardInterrupt:
        sys.exit(130)
