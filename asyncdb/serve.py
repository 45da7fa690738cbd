"""`asyncdb serve`: a node that drivers and other nodes reach over websockets.

Peers must prove they hold the shared secret before anything they send is read.
Actors are created here only from registered type names (the built-in shard and replica,
and those of modules named with --import), from plain-data configs.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import os
import signal
import socket
import ssl
import stat
from collections.abc import Callable
from pathlib import Path

from asyncdb.transport import ws
from asyncdb.transport.wsauth import check_name

from .errors import AuthenticationError, ConfigError
from .metrics import NodeFigures, registry, serve_metrics
from .node import Node
from .system import PeerPolicy

log = logging.getLogger("asyncdb.serve")


def read_secret(path: str | Path) -> bytes:
    """The shared secret from a file (surrounding whitespace ignored), which only its
    owner may read (as ssh insists for private keys)."""
    try:
        mode = os.stat(path).st_mode
        if mode & 0o077:
            raise ConfigError(f"the secret file {path} is open to group or others (mode "
                              f"{stat.S_IMODE(mode):04o}); make it private: chmod 600 {path}")
        secret = Path(path).read_bytes().strip()
    except OSError as exc:
        raise ConfigError(f"cannot read the secret file: {exc}") from exc
    if len(secret) < 16:
        raise ConfigError("the secret must be at least 16 bytes long")
    return secret


def parse_listen(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigError(f"--listen wants HOST:PORT, got {listen!r}")
    if not 0 <= int(port) <= 65535:
        raise ConfigError(f"--listen: port {port} is out of range (0 to 65535)")
    return host.strip("[]") or "0.0.0.0", int(port)


def server_ssl(cert: str | None, key: str | None) -> ssl.SSLContext | None:
    if cert is None and key is None:
        return None
    if cert is None or key is None:
        raise ConfigError("TLS needs both --cert and --key")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return context


def client_ssl(ca: str | None = None, insecure: bool = False) -> ssl.SSLContext | None:
    """For wss:// peers: verify against `ca` (or the system's), or not at all."""
    if ca is None and not insecure:
        return None
    context = ssl.create_default_context(cafile=ca)
    if insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


async def dial(node: Node, url: str, secret: bytes,
               ssl_context: ssl.SSLContext | None = None) -> str:
    """Connect `node` to the node serving at `url`; return that node's name."""
    channel = await ws.connect(url, secret, node.id, ssl_context=ssl_context)
    if channel.peer in node.peers():
        await channel.close()
        return channel.peer
    node.connect(channel.peer, channel)
    return channel.peer


async def serve(listen: str, secret: bytes, *, name: str | None = None,
                ssl_context: ssl.SSLContext | None = None,
                dial_ssl: ssl.SSLContext | None = None, imports: tuple[str, ...] = (),
                max_frame_bytes: int = 1 << 30, policy: PeerPolicy | None = None,
                max_pending: int = ws.DEFAULT_MAX_PENDING,
                auth_timeout: float = ws.AUTH_TIMEOUT, metrics: str | None = None,
                ready: Callable[[str, int], None] | None = None) -> None:
    """Run a node until SIGINT or SIGTERM (or until it is closed). `policy`: what
    its network peers may ask of it (`asyncdb.system`); `max_pending` connections may
    wait at most `auth_timeout` seconds to authenticate. With `metrics` (HOST:PORT,
    loopback unless a host is given), the figures of the shards and replicas on this
    node are served at /metrics there, apart from the authenticated listener."""
    for module in imports:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise ConfigError(f"--import {module}: {exc}") from exc
    host, port = parse_listen(listen)
    node_id = name or f"{socket.gethostname()}:{port}"
    try:
        check_name(node_id)
    except AuthenticationError as exc:
        raise ConfigError(f"--name: {exc}") from None
    node = Node(node_id, allow_import=False)
    node.policy = policy or PeerPolicy()
    node.dialer = lambda url: dial(node, url, secret, dial_ssl)

    async def on_channel(peer: str, channel: ws.WsChannel) -> None:
        if peer in node.peers() or peer == node.id:
            log.warning("refused a second connection from a node named %r", peer[:128])
            await channel.close()
            return
        log.info("node %s: %s connected", node.id, peer)
        node.connect(peer, channel)

    try:
        runner = await ws.listen(host, port, secret, node.id, on_channel,
                                 ssl_context=ssl_context, max_frame_bytes=max_frame_bytes,
                                 max_pending=max_pending, auth_timeout=auth_timeout)
    except OSError as exc:
        await node.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    bound = ws.bound_port(runner)
    scheme = "wss" if ssl_context else "ws"
    print(f"asyncdb serve: node {node.id} listening on {scheme}://{host}:{bound}", flush=True)
    exporter = None
    if metrics is not None:
        try:
            exporter, url = await serve_metrics(metrics, registry(NodeFigures(node)))
        except BaseException:
            await runner.cleanup()
            await node.close()
            raise
        print(f"asyncdb serve: metrics at {url}", flush=True)
    if ready is not None:
        ready(host, bound)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, lambda: node.background(node.close()))
    try:
        await node.wait_closed()
    finally:
        await node.close()
        await runner.cleanup()
        if exporter is not None:
            await exporter.cleanup()
