"""Entry point of a node process spawned by `LocalNodes`: `python -m asyncdb.nodeproc`,
with its JSON config on stdin and its link descriptors inherited."""

from __future__ import annotations

import ctypes
import importlib
import json
import logging
import os
import signal
import sys
from typing import Any

PR_SET_PDEATHSIG = 1


def _die_with_parent(parent_pid: int) -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass  # not Linux: the driver's link closing still ends this process
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


async def serve(config: dict[str, Any]) -> int:
    import asyncio
    import socket

    from asyncdb.node import Node
    from asyncdb.process import child_config_links, receive_link
    from asyncdb.transport.shm import ShmChannel

    node = Node(config["node_id"], allow_import=True)
    parent = config["parent"]

    def on_lost(peer: str, error: BaseException) -> None:
        if peer == parent and not node.closed:
            node.background(node.close())

    node.on_peer_lost(on_lost)
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, lambda: node.background(node.close()))
    for peer, end in child_config_links(config):
        node.connect(peer, ShmChannel(end), trusted=True)  # the driver and siblings
    control = socket.socket(fileno=int(config["control_fd"]))
    control.setblocking(False)

    def on_link() -> None:  # a node restarted elsewhere: link to its new process
        try:
            link = receive_link(control)
        except (OSError, ValueError, KeyError) as exc:
            logging.getLogger("asyncdb.nodeproc").error("bad link from the driver: %r", exc)
            return
        if link is None:
            loop.remove_reader(control.fileno())
            return
        node.connect(link[0], ShmChannel(link[1]), trusted=True)

    loop.add_reader(control.fileno(), on_link)
    try:
        await node.wait_closed()
    finally:
        loop.remove_reader(control.fileno())
        control.close()
    return 1 if node.failure is not None else 0


def main() -> None:
    config = json.loads(sys.stdin.buffer.read())
    _die_with_parent(int(config["parent_pid"]))
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.path[:] = list(config.get("sys_path") or sys.path)
    logging.basicConfig(
        level=int(config.get("log_level", logging.WARNING)),
        format=f"%(asctime)s %(levelname)s [{config['node_id']}] %(name)s: %(message)s")
    from asyncdb.loop import run
    from asyncdb.registry import set_main_path

    set_main_path(config.get("main"))
    for module in config.get("imports", []):
        importlib.import_module(module)
    sys.exit(run(serve(config)))


if __name__ == "__main__":
    main()
