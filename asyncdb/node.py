"""A node: one event loop hosting actors, holding channels to other nodes, routing.

Routing is the whole job: a ref on this node goes to that actor's mailbox, a ref on
another node goes into the channel to that node as a frame. Asks wait on a future
keyed by an id; the reply, an error, a timeout or the loss of the channel settles it.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import socket
import traceback
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from asyncdb.transport.base import Channel
from asyncdb.transport.frame import Frame

from . import codec
from .actor import MAILBOX_HIGH, Actor, ActorRef, Cell, Reply
from .errors import (
    ActorDead,
    ActorError,
    AsyncDBError,
    ChannelClosed,
    ConfigError,
    DecodeError,
    EncodeError,
    Timeout,
    error_from_remote,
)
from .registry import register_actor, resolve, type_name
from .supervisor import Policy, Supervisor

log = logging.getLogger("asyncdb.node")

SYSTEM = "_system"
PeerLost = Callable[[str, BaseException], None]


class Node:
    """Hosts actors in the running event loop. Create it inside a coroutine.

    `allow_import`: whether `module:qualname` actor types may be imported when a peer
    asks to spawn one (true for processes this host spawned, false for network peers).
    """

    def __init__(self, node_id: str = "local", *, supervisor: Supervisor | None = None,
                 ask_timeout: float | None = 60.0, allow_import: bool = True) -> None:
        self.id = node_id
        self.supervisor = supervisor or Supervisor()
        self.ask_timeout = ask_timeout
        self.allow_import = allow_import
        self.loop = asyncio.get_running_loop()
        self.failure: BaseException | None = None
        self.peer_info: dict[str, Any] = {}
        self._cells: dict[str, Cell] = {}
        self._channels: dict[str, Channel] = {}
        self._readers: dict[str, asyncio.Task[None]] = {}
        self._hello: dict[str, asyncio.Future[Any]] = {}
        self._pending: dict[int, tuple[asyncio.Future[Any], str, bool]] = {}
        self._ids = itertools.count(1)
        self._names = itertools.count(1)
        self._peer_lost: list[PeerLost] = []
        self._owned: dict[str, list[str]] = {}  # peer -> actors it spawned here
        self._closed = asyncio.Event()
        self._closing = False
        self._background: set[asyncio.Task[Any]] = set()
        # How this node opens a channel to a node at a URL (set by `asyncdb serve`).
        self.dialer: Callable[[str], Awaitable[str]] | None = None
        self._spawn_cell(SYSTEM, SystemActor, None)

    # -- actors -----------------------------------------------------------------

    async def spawn(self, actor_type: type[Actor] | str, *, name: str | None = None,
                    node: str | None = None, config: dict[str, Any] | None = None,
                    policy: Policy | str | None = None) -> ActorRef:
        """Start an actor, here or on node `node`, built as `actor_type(**config)`.
        Returns once its `on_start` has finished; its errors are raised here."""
        if node is not None and node != self.id:
            tname = actor_type if isinstance(actor_type, str) else type_name(actor_type)
            request = {"op": "spawn", "type": tname, "name": name, "config": config or {},
                       "policy": None if policy is None else str(policy), "owner": self.id}
            ref: ActorRef = await self.ref(node, SYSTEM).ask(request)
            return ref
        cls = resolve(actor_type, self.allow_import) if isinstance(actor_type, str) else actor_type
        if name is None:
            name = f"{cls.__name__.lower()}-{next(self._names)}"
        if name in self._cells:
            raise ConfigError(f"an actor named {name!r} already runs on node {self.id}")
        kwargs = dict(config or {})
        cell = self._spawn_cell(name, lambda: cls(**kwargs),
                                None if policy is None else Policy(policy))
        await cell.started
        return cell.ref

    def _spawn_cell(self, name: str, factory: Callable[[], Actor],
                    policy: Policy | None) -> Cell:
        if self._closing:
            raise ActorDead(f"node {self.id} is closing")
        cell = Cell(self, name, factory, policy)
        self._cells[name] = cell
        return cell

    def ref(self, node_id: str, name: str) -> ActorRef:
        return ActorRef(self, node_id, name)

    def actors(self) -> list[str]:
        return [name for name in self._cells if name != SYSTEM]

    def actor(self, name: str) -> Actor:
        """The local actor object itself (for embedding and tests)."""
        try:
            return self._cells[name].actor
        except KeyError:
            raise ActorDead(f"no actor {name!r} on node {self.id}") from None

    async def stop_actor(self, name: str) -> None:
        cell = self._cells.get(name)
        if cell is None:
            return
        cell.stop()
        await asyncio.shield(cell.task)

    def forget(self, cell: Cell) -> None:
        if self._cells.get(cell.name) is cell:
            del self._cells[cell.name]
            for names in self._owned.values():
                if cell.name in names:
                    names.remove(cell.name)

    def escalate(self, actor: str, error: BaseException) -> None:
        log.error("node %s stops: actor %s escalated %r", self.id, actor, error)
        if self.failure is None:
            self.failure = error
        self.background(self.close())

    def background(self, coro: Any) -> asyncio.Task[Any]:
        """Run `coro` as a task this node keeps a reference to until it ends."""
        task = self.loop.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    # -- sending ----------------------------------------------------------------

    async def deliver_tell(self, ref: ActorRef, message: Any) -> None:
        if ref.node_id == self.id:
            cell = self._cells.get(ref.name)
            if cell is None:
                raise ActorDead(f"no actor {ref.name!r} on node {self.id}")
            cell.put(message, None)
            return
        await self._channel(ref.node_id).send(
            codec.encode_message(codec.TELL, [ref.name], message))

    async def deliver_ask(self, ref: ActorRef, message: Any, timeout: float | None,
                          borrow: bool = False) -> Any:
        if timeout is not None and timeout < 0:
            timeout = self.ask_timeout
        future: asyncio.Future[Any] = self.loop.create_future()
        ask_id = 0
        if ref.node_id == self.id:
            cell = self._cells.get(ref.name)
            if cell is None:
                raise ActorDead(f"no actor {ref.name!r} on node {self.id}")
            cell.put(message, future)
        else:
            channel = self._channel(ref.node_id)
            ask_id = next(self._ids)
            frame = codec.encode_message(codec.ASK, [ref.name, ask_id], message)
            self._pending[ask_id] = (future, ref.node_id, borrow)
        handle = None if timeout is None else self.loop.call_later(
            timeout, _expire, future, ref, timeout)
        try:
            if ask_id:
                await channel.send(frame)
            return await future
        finally:
            if handle is not None:
                handle.cancel()
            if ask_id:
                self._pending.pop(ask_id, None)

    def _channel(self, node_id: str) -> Channel:
        channel = self._channels.get(node_id)
        if channel is None or channel.closed:
            raise ChannelClosed(f"node {self.id} has no open channel to node {node_id}")
        return channel

    # -- answering --------------------------------------------------------------

    async def answer(self, reply: Reply, result: Any, actor: str) -> None:
        if isinstance(reply, asyncio.Future):
            if not reply.done():
                reply.set_result(result)
            return
        if reply is None:
            return
        peer, ask_id = reply
        try:
            frame = codec.encode_message(codec.REPLY, [ask_id], result)
        except EncodeError as exc:
            await self.answer_error(reply, exc, actor)
            return
        await self._send_quietly(peer, frame)

    async def answer_error(self, reply: Reply, error: BaseException, actor: str) -> None:
        if reply is None:
            return
        if isinstance(reply, asyncio.Future):
            if reply.done():
                return
            if isinstance(error, AsyncDBError):
                reply.set_exception(error)
            else:
                wrapped = ActorError(f"{actor}: {type(error).__name__}: {error}",
                                     type(error).__name__, str(error), actor)
                wrapped.__cause__ = error
                reply.set_exception(wrapped)
            return
        peer, ask_id = reply
        info = {"type": type(error).__name__, "message": str(error), "actor": actor,
                "traceback": "".join(traceback.format_exception(error))}
        await self._send_quietly(peer, codec.encode_message(codec.FAIL, [ask_id], info))

    async def _send_quietly(self, peer: str, frame: Any) -> None:
        channel = self._channels.get(peer)
        if channel is None:
            log.debug("node %s: answer to vanished node %s dropped", self.id, peer)
            return
        try:
            await channel.send(frame)
        except ChannelClosed:
            log.debug("node %s: answer to closed node %s dropped", self.id, peer)

    # -- channels ---------------------------------------------------------------

    def connect(self, peer: str, channel: Channel, info: Any = None) -> None:
        """Route refs on node `peer` through `channel`, and say hello on it (with this
        process's pid and host unless `info` says otherwise)."""
        if peer in self._channels:
            raise ConfigError(f"node {self.id} already has a channel to {peer}")
        self._channels[peer] = channel
        self._hello.setdefault(peer, self.loop.create_future())
        self._readers[peer] = self.loop.create_task(self._read(peer, channel),
                                                    name=f"read:{self.id}<-{peer}")
        if info is None:
            info = {"pid": os.getpid(), "host": socket.gethostname()}
        frame = codec.encode_message(codec.HELLO, [self.id], info)
        self.background(self._send_quietly(peer, frame))

    async def wait_peer(self, peer: str, timeout: float | None = None) -> Any:
        """Wait for `peer`'s hello on its channel; return the info it sent."""
        future = self._hello.setdefault(peer, self.loop.create_future())
        return await asyncio.wait_for(asyncio.shield(future), timeout)

    def peers(self) -> list[str]:
        return [p for p, ch in self._channels.items() if not ch.closed]

    def on_peer_lost(self, callback: PeerLost) -> None:
        """Call `callback(peer, error)` when the channel to a peer closes."""
        self._peer_lost.append(callback)

    async def disconnect(self, peer: str) -> None:
        channel = self._channels.get(peer)
        if channel is not None:
            await channel.close()
        reader = self._readers.get(peer)
        if reader is not None:
            await asyncio.gather(reader, return_exceptions=True)

    async def _read(self, peer: str, channel: Channel) -> None:
        error: BaseException = ChannelClosed(f"channel from node {peer} closed")
        try:
            while True:
                try:
                    frame = await channel.receive()
                    later = self._dispatch(peer, frame)
                    del frame  # in-place arrays free their ring space once handled
                    if later is not None:
                        await later
                except DecodeError as exc:
                    log.warning("node %s: rejected a malformed frame from %s: %s",
                                self.id, peer, exc)
        except ChannelClosed as exc:
            error = exc
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("node %s: reader for %s failed", self.id, peer)
            error = ChannelClosed(f"reader for node {peer} failed: {exc!r}")
        finally:
            self._lost(peer, channel, error)

    def _lost(self, peer: str, channel: Channel, error: BaseException) -> None:
        if self._channels.get(peer) is not channel:
            return
        del self._channels[peer]
        self._readers.pop(peer, None)
        hello = self._hello.pop(peer, None)
        if hello is not None and not hello.done():
            hello.set_exception(ChannelClosed(f"node {peer} closed before saying hello"))
            hello.exception()  # retrieved here: nobody may be waiting
        for ask_id, (future, target, _borrow) in list(self._pending.items()):
            if target == peer and not future.done():
                del self._pending[ask_id]
                future.set_exception(ChannelClosed(f"node {peer} is gone: {error}"))
        self.background(channel.close())  # releases its resources even if the peer left
        if not self._closing:
            log.info("node %s: channel to %s closed (%s)", self.id, peer, error)
            orphans = [name for name in self._owned.pop(peer, []) if name in self._cells]
            if orphans:
                log.warning("node %s: stopping %d actors that %s created: %s", self.id,
                            len(orphans), peer, ", ".join(orphans))
                for name in orphans:
                    self.background(self.stop_actor(name))
        for callback in self._peer_lost:
            try:
                callback(peer, error)
            except Exception:
                log.exception("node %s: peer-lost callback failed", self.id)

    def _dispatch(self, peer: str, frame: Frame) -> Coroutine[Any, Any, None] | None:
        """Route one frame; return the rare follow-up that must be awaited (an error
        answer, or waiting for room in a full mailbox), else None."""
        meta = codec.decode_message(frame, self.ref)
        kind = frame.kind
        if kind == codec.TELL or kind == codec.ASK:
            name = meta[0]
            reply: Reply = None
            if kind == codec.ASK:
                if not isinstance(meta[1], int):
                    raise DecodeError("ask id must be an integer")
                reply = (peer, meta[1])
            cell = self._cells.get(name) if isinstance(name, str) else None
            if cell is None or not cell.alive or cell.stopping:
                dead = ActorDead(f"no actor {name!r} on node {self.id}")
                if reply is None:
                    log.warning("node %s: tell from %s dropped: %s", self.id, peer, dead)
                return self.answer_error(reply, dead, str(name))
            body = meta[-1]
            if frame.borrowed and not cell.actor.borrow_arrays:
                body = codec.own_arrays(body)
            cell.put(body, reply)
            if len(cell.mailbox) >= MAILBOX_HIGH:
                return cell.room()
        elif kind == codec.REPLY or kind == codec.FAIL:
            entry = self._pending.pop(meta[0], None) if isinstance(meta[0], int) else None
            if entry is None:
                return None  # the asker timed out or went away
            future, _peer, borrow = entry
            if future.done():
                return None
            if kind == codec.REPLY:
                own = frame.borrowed and not borrow
                future.set_result(codec.own_arrays(meta[1]) if own else meta[1])
            elif isinstance(meta[1], dict):
                future.set_exception(error_from_remote(meta[1]))
            else:
                future.set_exception(DecodeError("malformed error reply"))
        elif kind == codec.HELLO:
            self.peer_info[peer] = meta[1]
            hello = self._hello.setdefault(peer, self.loop.create_future())
            if not hello.done():
                hello.set_result(meta[1])
        return None

    # -- lifetime ---------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    async def wait_closed(self) -> None:
        await self._closed.wait()

    async def close(self, timeout: float = 5.0) -> None:
        """Stop every actor (each finishes its current message), close every channel,
        and fail every ask still waiting."""
        if self._closing:
            await self._closed.wait()
            return
        self._closing = True
        cells = list(self._cells.values())
        for cell in cells:
            cell.stop()
        tasks = [cell.task for cell in cells if cell.task is not asyncio.current_task()]
        if tasks:
            _done, late = await asyncio.wait(tasks, timeout=timeout)
            for task in late:
                task.cancel()
            if late:
                await asyncio.wait(late, timeout=1.0)
        for channel in list(self._channels.values()):
            await channel.close()
        readers = list(self._readers.values())
        for reader in readers:
            reader.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
        for future, _peer, _borrow in self._pending.values():
            if not future.done():
                future.set_exception(ChannelClosed(f"node {self.id} closed"))
        self._pending.clear()
        self._closed.set()

    async def __aenter__(self) -> Node:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"<Node {self.id} actors={len(self._cells) - 1} peers={self.peers()}>"


def _expire(future: asyncio.Future[Any], ref: ActorRef, timeout: float) -> None:
    if not future.done():
        future.set_exception(Timeout(f"no answer from {ref.name}@{ref.node_id} "
                                     f"within {timeout:g} s"))


@register_actor("asyncdb.System")
class SystemActor(Actor):
    """Every node's own actor: spawns and stops actors at a peer's request."""

    async def receive(self, message: Any) -> Any:
        if not isinstance(message, dict):
            raise ConfigError(f"system actor got {type(message).__name__}, expected a dict")
        op = message.get("op")
        node = self.node
        if op == "spawn":
            config = message.get("config") or {}
            if not isinstance(config, dict):
                raise ConfigError("spawn config must be a dict")
            ref = await node.spawn(str(message["type"]), name=message.get("name"),
                                   config=config, policy=message.get("policy"))
            owner = message.get("owner")
            if isinstance(owner, str) and owner != node.id:
                node._owned.setdefault(owner, []).append(ref.name)
            return ref
        if op == "stop":
            await node.stop_actor(str(message["name"]))
            return None
        if op == "ping":
            return {"node": node.id, "actors": node.actors(), "peers": node.peers()}
        if op == "dial":
            if node.dialer is None:
                raise ConfigError(f"node {node.id} cannot dial other nodes")
            return await node.dialer(str(message["url"]))
        if op == "shutdown":
            node.loop.call_soon(lambda: node.background(node.close()))
            return None
        raise ConfigError(f"system actor: unknown op {op!r}")
