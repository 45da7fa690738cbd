"""A node: one event loop hosting actors, holding channels to other nodes, routing.

Routing is the whole job: a ref on this node goes to that actor's mailbox, a ref on
another node goes into the channel to that node as a frame. Asks wait on a future
keyed by an id; the reply, an error, a timeout or the loss of the channel settles it.

Every placement gives the same semantics. Same-node messages and replies make the wire
format's round trip (what cannot travel between processes fails here too, and arrays
arrive as private copies, so no actor's live array escapes it); a sender waits while
the target's mailbox is full, on this node or, by per-actor credits
(`asyncdb.credits`), on another, and a reader never stops for one actor's mailbox.
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
from asyncdb.transport.frame import DEFAULT_MAX_FRAME_BYTES, Frame

from . import codec
from .actor import MAILBOX_HIGH, Actor, ActorRef, Cell, Reply
from .credits import Credits
from .errors import (
    ActorDead,
    ActorError,
    AsyncDBError,
    ChannelClosed,
    ConfigError,
    DecodeError,
    EncodeError,
    MessageTooLarge,
    Timeout,
    error_from_remote,
)
from .registry import resolve, type_name
from .supervisor import Policy, Supervisor
from .system import SYSTEM, PeerPolicy, Request, SystemActor

log = logging.getLogger("asyncdb.node")

PeerLost = Callable[[str, BaseException], None]


class Node:
    """Hosts actors in the running event loop. Create it inside a coroutine.

    `allow_import`: whether `module:qualname` actor types may be imported when a
    trusted peer asks to spawn one (`asyncdb serve` nodes never import). `policy`: what
    network peers may ask for (see `asyncdb.system`). `max_frame_bytes`: the largest
    message or reply a same-node send accepts, as a channel's limit does between nodes.
    """

    def __init__(self, node_id: str = "local", *, supervisor: Supervisor | None = None,
                 ask_timeout: float | None = 60.0, allow_import: bool = True,
                 max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> None:
        self.id = node_id
        self.max_frame_bytes = max_frame_bytes
        self.credits = Credits(MAILBOX_HIGH)
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
        self._trusted: set[str] = set()  # peers this host spawned (shm links)
        self.policy = PeerPolicy()
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
                       "policy": None if policy is None else str(policy)}
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

    def own(self, owner: str, name: str) -> None:
        """Record that peer `owner` spawned actor `name`: it stops when `owner`'s
        channel is lost."""
        self._owned.setdefault(owner, []).append(name)

    def owned_by(self, owner: str) -> list[str]:
        return list(self._owned.get(owner, ()))

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
            body = self._local_copy(codec.TELL, [ref.name], message)
            (await self._local_cell(ref.name)).put(body, None)
            return
        frame = codec.encode_message(codec.TELL, [ref.name], message)
        channel = self._channel(ref.node_id)
        if ref.name != SYSTEM and not self.credits.try_take(ref.node_id, ref.name):
            await self.credits.take(ref.node_id, ref.name)
        await channel.send(frame)

    async def _local_cell(self, name: str, deadline: float | None = None) -> Cell:
        """The cell of actor `name` here, once its mailbox has room."""
        cell = self._cells.get(name)
        if cell is None:
            raise ActorDead(f"no actor {name!r} on node {self.id}")
        if cell.full:
            await _before(deadline, cell.room(), name, self.id)
        return cell

    def _local_copy(self, kind: int, header: list[Any], body: Any) -> Any:
        return codec.local_copy(kind, header, body, self.max_frame_bytes, self.ref)

    async def deliver_ask(self, ref: ActorRef, message: Any, timeout: float | None,
                          borrow: bool = False) -> Any:
        if timeout is not None and timeout < 0:
            timeout = self.ask_timeout
        future: asyncio.Future[Any] = self.loop.create_future()
        deadline = None if timeout is None else self.loop.time() + timeout
        ask_id = 0
        if ref.node_id == self.id:
            body = self._local_copy(codec.ASK, [ref.name, 0], message)
            cell = await self._local_cell(ref.name, deadline)
            cell.put(body, future)
        else:
            ask_id = next(self._ids)
            frame = codec.encode_message(codec.ASK, [ref.name, ask_id], message)
            channel = self._channel(ref.node_id)
            if ref.name != SYSTEM and not self.credits.try_take(ref.node_id, ref.name):
                await _before(deadline, self.credits.take(ref.node_id, ref.name),
                              ref.name, ref.node_id)
            self._pending[ask_id] = (future, ref.node_id, borrow)
        handle = None if deadline is None else self.loop.call_at(
            deadline, _expire, future, ref, timeout)
        try:
            if ask_id:
                await channel.send(frame)
                channel.expect()  # the reply: a transport may watch for it
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
        """Send `result` to the asker; a result that cannot travel (EncodeError) or is
        over the frame limit (MessageTooLarge) reaches the asker as that error."""
        if reply is None:
            return
        try:
            if isinstance(reply, asyncio.Future):
                if not reply.done():
                    reply.set_result(self._local_copy(codec.REPLY, [0], result))
                return
            peer, ask_id = reply
            await self._send_quietly(peer, codec.encode_message(codec.REPLY, [ask_id], result))
        except (EncodeError, MessageTooLarge) as exc:
            log.warning("node %s: the answer of %s cannot be sent: %s", self.id, actor, exc)
            await self.answer_error(reply, exc, actor)

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

    def connect(self, peer: str, channel: Channel, info: Any = None, *,
                trusted: bool = False) -> None:
        """Route refs on node `peer` through `channel`, and say hello on it (with this
        process's pid and host unless `info` says otherwise). `trusted`: the peer is a
        process this host spawned (see `asyncdb.system`)."""
        if peer in self._channels:
            raise ConfigError(f"node {self.id} already has a channel to {peer}")
        self._channels[peer] = channel
        if trusted:
            self._trusted.add(peer)
        self._hello.setdefault(peer, self.loop.create_future())
        self._readers[peer] = self.loop.create_task(self._read(peer, channel),
                                                    name=f"read:{self.id}<-{peer}")
        if info is None:
            info = {"pid": os.getpid(), "host": socket.gethostname()}
        frame = codec.encode_message(codec.HELLO, [self.id], info)
        self.background(self._send_quietly(peer, frame))

    def consumed(self, peer: str, actor: str) -> None:
        """Actor `actor` took (or dropped) a message from `peer`: grant the credit back,
        in batches."""
        count = self.credits.consumed(peer, actor)
        if count:
            frame = codec.encode_message(codec.CREDIT, [actor], count)
            self.background(self._send_quietly(peer, frame))

    async def wait_peer(self, peer: str, timeout: float | None = None) -> Any:
        """Wait for `peer`'s hello on its channel; return the info it sent."""
        future = self._hello.setdefault(peer, self.loop.create_future())
        return await asyncio.wait_for(asyncio.shield(future), timeout)

    def trusts(self, peer: str) -> bool:
        return peer in self._trusted and peer in self._channels

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
            await channel.pump(lambda item: self._handle(peer, item))
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
        self._trusted.discard(peer)
        self.peer_info.pop(peer, None)
        hello = self._hello.pop(peer, None)
        if hello is not None and not hello.done():
            hello.set_exception(ChannelClosed(f"node {peer} closed before saying hello"))
            hello.exception()  # retrieved here: nobody may be waiting
        self.credits.forget(peer)
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

    def _handle(self, peer: str, item: Frame | DecodeError) -> Coroutine[Any, Any, None] | None:
        """One arriving frame (or the error a malformed one raised), from the channel."""
        try:
            if isinstance(item, DecodeError):
                raise item
            return self._dispatch(peer, item)
        except DecodeError as exc:
            log.warning("node %s: rejected a malformed frame from %s: %s", self.id, peer, exc)
            return None

    def _dispatch(self, peer: str, frame: Frame) -> Coroutine[Any, Any, None] | None:
        """Route one frame; return the rare follow-up that must be awaited (an error
        answer), else None. Never waits for a mailbox: the sender's credit did."""
        meta = codec.decode_message(frame, self.ref)
        kind = frame.kind
        if kind == codec.TELL or kind == codec.ASK:
            name = meta[0]
            reply: Reply = None
            if kind == codec.ASK:
                if not isinstance(meta[1], int):
                    raise DecodeError("ask id must be an integer")
                reply = (peer, meta[1])
            origin = peer if name != SYSTEM else None  # whose credit it used
            cell = self._cells.get(name) if isinstance(name, str) else None
            if cell is None or not cell.alive or cell.stopping:
                if origin is not None and isinstance(name, str):
                    self.consumed(peer, name)
                dead = ActorDead(f"no actor {name!r} on node {self.id}")
                if reply is None:
                    log.warning("node %s: tell from %s dropped: %s", self.id, peer, dead)
                return self.answer_error(reply, dead, str(name))
            body = meta[-1]
            if frame.borrowed and not cell.actor.borrow_arrays:
                body = codec.own_arrays(body)
            if name == SYSTEM:  # the system actor judges requests by where they came from
                body = Request(peer, body)
            cell.put(body, reply, origin)
        elif kind == codec.CREDIT:
            name, count = meta
            if (not isinstance(name, str) or not isinstance(count, int)
                    or isinstance(count, bool) or count <= 0):
                raise DecodeError(f"malformed credit {meta!r}")
            self.credits.grant(peer, name, count)
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


async def _before(deadline: float | None, wait: Coroutine[Any, Any, None], name: str,
                  node: str) -> None:
    """Await `wait` (room in a mailbox, a credit) until `deadline` at the latest."""
    try:
        async with asyncio.timeout_at(deadline):
            await wait
    except TimeoutError:
        raise Timeout(f"no room for a message to {name}@{node} before the deadline") from None


def _expire(future: asyncio.Future[Any], ref: ActorRef, timeout: float | None) -> None:
    if not future.done():
        future.set_exception(Timeout(f"no answer from {ref.name}@{ref.node_id} "
                                     f"within {timeout or 0:g} s"))
