"""Every node's own actor, `_system`: it spawns, stops and reports actors at a peer's
request, and decides what each peer may ask for.

Who may do what:

- this node itself (its own code) and **trusted peers** (node processes this host
  spawned, linked by shared-memory rings) may do everything: spawn any actor type,
  importing its module if need be, hand it data in this host's shared memory, stop
  any actor, shut the node down;
- **network peers** (websockets, authenticated by the shared secret) may spawn only
  registered actor types that admit network spawns, within this node's
  `PeerPolicy` limits, with data that travels inside the message (never a path on
  this host); stop only the actors they spawned themselves; ask the node to dial only
  the URLs its operator listed (with this node's own secret); shut it down only if
  its operator allowed that. Every actor a network peer spawns is owned by that
  peer's connection and stopped when the connection is lost.

The peer a request came from is the channel it arrived on, never a field of the
message.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import numpy as np

from .actor import Actor, ActorRef
from .data import from_network
from .errors import AsyncDBError, ConfigError
from .registry import register_actor, resolve

if TYPE_CHECKING:
    from .node import Node

log = logging.getLogger("asyncdb.system")

SYSTEM = "_system"


@dataclass(frozen=True)
class PeerPolicy:
    """What network peers may ask of this node.

    `max_params`: elements of a model or parameter slice an actor may be made for;
    `max_data_bytes`: bytes of arrays (and buffers an actor would allocate for them)
    in one spawn; `max_actors`: actors one connection may own at once;
    `allow_shutdown`: whether a peer may shut the node down; `dial`: the peer URLs
    (`ws://host:port`, or a bare host for any port on it) this node connects to when
    a peer asks it to.
    """

    max_params: int = 1 << 26
    max_data_bytes: int = 1 << 30
    max_actors: int = 64
    allow_shutdown: bool = False
    dial: tuple[str, ...] = field(default=())

    def may_dial(self, url: str) -> bool:
        target = _address(url)
        if target is None:
            return False
        for allowed in self.dial:
            entry = (_address(allowed) if "//" in allowed
                     else _address(f"ws://{allowed}", default_port=False))
            if entry is not None and entry[0] == target[0] and entry[1] in (None, target[1]):
                return True
        return False


def _address(url: str, default_port: bool = True) -> tuple[str, int | None] | None:
    """(host, port) of a ws:// or wss:// URL; port None for a bare host when
    `default_port` is false."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        return None
    if port is None and default_port:
        port = 80 if parts.scheme == "ws" else 443
    return parts.hostname.lower(), port


@dataclass(frozen=True)
class Request:
    """A message to `_system` as it arrived from peer `origin` (made by the node that
    routed it; it never crosses the wire)."""

    origin: str
    body: Any


def array_bytes(obj: Any, depth: int = 0) -> int:
    """Bytes of every array (and bytes object) inside plain data."""
    if depth > 64:
        raise ConfigError("config nests too deeply")
    if isinstance(obj, np.ndarray):
        return int(obj.nbytes)
    if isinstance(obj, bytes | bytearray):
        return len(obj)
    if isinstance(obj, dict):
        return sum(array_bytes(v, depth + 1) for v in obj.values())
    if isinstance(obj, list | tuple):
        return sum(array_bytes(v, depth + 1) for v in obj)
    return 0


def admit(cls: type[Actor], config: dict[str, Any], policy: PeerPolicy) -> None:
    """Check a network peer's spawn of `cls` before anything is allocated: the
    type's own `admit(config, policy)` if it has one, and the data limit for all."""
    if not getattr(cls, "network_spawn", True):
        raise ConfigError(f"{cls.__name__} cannot be spawned by a network peer")
    check = getattr(cls, "admit", None)
    if check is not None:
        check(config, policy)
    size = array_bytes(config)
    if size > policy.max_data_bytes:
        raise ConfigError(f"spawn config carries {size} bytes of arrays, over this "
                          f"node's limit of {policy.max_data_bytes}")


@register_actor("asyncdb.System")
class SystemActor(Actor):
    """Every node's own actor: spawns and stops actors at a peer's request."""

    network_spawn = False

    async def receive(self, message: Any) -> Any:
        origin, body = ((message.origin, message.body) if isinstance(message, Request)
                        else (None, message))
        if not isinstance(body, dict):
            raise ConfigError(f"system actor got {type(body).__name__}, expected a dict")
        node = self.node
        trusted = origin is None or node.trusts(origin)
        op = body.get("op")
        if op == "spawn":
            return await self.spawn(body, origin, trusted)
        if op == "stop":
            name = str(body.get("name"))
            if not trusted and name not in node.owned_by(str(origin)):
                raise ConfigError(f"node {node.id}: {origin} may stop only actors it "
                                  f"spawned; {name!r} is not one of them")
            await node.stop_actor(name)
            return None
        if op == "ping":
            return {"node": node.id, "actors": node.actors(), "peers": node.peers()}
        if op == "dial":
            return await self.dial(str(body.get("url")), origin, trusted)
        if op == "shutdown":
            if not trusted and not node.policy.allow_shutdown:
                log.warning("node %s: refused a shutdown request from %s", node.id, origin)
                raise ConfigError(f"node {node.id} does not take shutdown requests from "
                                  "network peers (its operator stops it)")
            log.info("node %s: shutting down at the request of %s", node.id,
                     origin or "this node")
            node.loop.call_soon(lambda: node.background(node.close()))
            return None
        raise ConfigError(f"system actor: unknown op {op!r}")

    async def spawn(self, body: dict[str, Any], origin: str | None,
                    trusted: bool) -> ActorRef:
        node = self.node
        config = body.get("config") or {}
        if not isinstance(config, dict):
            raise ConfigError("spawn config must be a dict")
        name, policy = body.get("name"), body.get("policy")
        if name is not None and not isinstance(name, str):
            raise ConfigError("an actor name must be a string")
        cls = resolve(str(body.get("type")), node.allow_import and trusted)
        if trusted:
            ref = await node.spawn(cls, name=name, config=config, policy=policy)
        else:
            owned = len(node.owned_by(str(origin)))
            if owned >= node.policy.max_actors:
                raise ConfigError(f"node {node.id}: {origin} already owns {owned} actors, "
                                  f"the most one connection may have here")
            admit(cls, config, node.policy)
            with from_network():  # the actor, for its whole life, may name no path
                ref = await node.spawn(cls, name=name, config=config, policy=policy)
        if origin is not None:
            node.own(origin, ref.name)
        return ref

    async def dial(self, url: str, origin: str | None, trusted: bool) -> str:
        node = self.node
        if node.dialer is None:
            raise ConfigError(f"node {node.id} cannot dial other nodes")
        if not trusted and not node.policy.may_dial(url):
            log.warning("node %s: refused to dial %.200s for %s", node.id, url, origin)
            raise ConfigError(f"node {node.id} dials only the peers its operator listed "
                              f"(asyncdb serve --peers); {url[:200]!r} is not one of them")
        return await node.dialer(url)


async def actor_alive(node: Node, ref: ActorRef, timeout: float = 10.0) -> bool:
    """Whether the actor `ref` still runs, asked of its node's system actor (False if
    that node is gone or does not answer)."""
    if ref.node_id == node.id:
        return ref.name in node.actors()
    if ref.node_id not in node.peers():
        return False
    try:
        info = await node.ref(ref.node_id, SYSTEM).ask({"op": "ping"}, timeout=timeout)
    except AsyncDBError:
        return False
    return isinstance(info, dict) and ref.name in info.get("actors", [])
