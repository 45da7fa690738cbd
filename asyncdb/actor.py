"""Actors: a coroutine with a mailbox, handling one message at a time.

The whole loop is `Cell.run`: take the next message, await the handler, answer the
asker, and on a crash answer with the error and let the supervisor decide.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

from .errors import ActorDead
from .supervisor import Policy

if TYPE_CHECKING:
    from .node import Node

log = logging.getLogger("asyncdb.actor")

# Who waits for the answer: nobody (tell), a local future, or (peer node, ask id).
Reply = None | asyncio.Future[Any] | tuple[str, int]

# Same-node senders wait while an actor has this many messages queued; each peer node
# may have this many in flight to one actor (its credit window, granted back in
# batches as the actor takes them), so a full mailbox never stalls a whole link.
MAILBOX_HIGH = 4096


class Actor:
    """Base class of every actor. Override `receive`; its return value answers `ask`.

    `self.node` and `self.ref` are set before `on_start` runs.

    `borrow_arrays`: set it to True in an actor that never keeps a received array (or a
    view of one) after its handler returns. Large arrays from another process then
    arrive as views into the shared-memory ring, with no copy; an actor that broke the
    promise would stall the link it came from, never corrupt data. Others get copies.
    """

    node: Node
    ref: ActorRef
    borrow_arrays: ClassVar[bool] = False

    async def on_start(self) -> None:
        """Runs once before the first message (and again after a restart)."""

    async def on_stop(self) -> None:
        """Runs once after the last message, whatever the reason for stopping."""

    async def receive(self, message: Any) -> Any:
        raise NotImplementedError(f"{type(self).__name__} does not handle messages")


class ActorRef:
    """The address of an actor, on this node or another. Refs say nothing about the
    transport that carries them, travel inside messages, and compare by address."""

    __slots__ = ("_node", "name", "node_id")

    def __init__(self, node: Node, node_id: str, name: str) -> None:
        self._node = node
        self.node_id = node_id
        self.name = name

    async def tell(self, message: Any) -> None:
        """Send without waiting for an answer. Returns once the message is handed to
        the target's mailbox or its node's channel (waiting while that is full)."""
        await self._node.deliver_tell(self, message)

    async def ask(self, message: Any, timeout: float | None = -1.0,
                  borrow: bool = False) -> Any:
        """Send and await the answer. Raises `Timeout` after `timeout` seconds (default:
        the node's `ask_timeout`; None waits for ever), `ActorDead` if the actor is
        gone, `ChannelClosed` if its node is, and the handler's error, typed, if it
        raised.

        `borrow=True`: large arrays in the answer may be views into the shared-memory
        ring, saving a copy; copy what you need and drop them soon (as `borrow_arrays`
        on actors)."""
        return await self._node.deliver_ask(self, message, timeout, borrow)

    def __asyncdb_ref__(self) -> list[str]:
        return [self.node_id, self.name]

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, ActorRef) and other.node_id == self.node_id
                and other.name == self.name)

    def __hash__(self) -> int:
        return hash((self.node_id, self.name))

    def __repr__(self) -> str:
        return f"<ActorRef {self.name}@{self.node_id}>"


class Cell:
    """The runtime side of one actor: its mailbox and the task that drains it."""

    def __init__(self, node: Node, name: str, factory: Callable[[], Actor],
                 policy: Policy | None) -> None:
        self.node = node
        self.name = name
        self.factory = factory
        self.policy = policy
        self.ref = ActorRef(node, node.id, name)
        self.actor = self._build()
        # (message, who waits for the answer, the peer node whose credit it used)
        self.mailbox: deque[tuple[Any, Reply, str | None]] = deque()
        self.alive = True
        self.stopping = False
        self.processed = 0
        self._waiter: asyncio.Future[None] | None = None
        self._room: asyncio.Future[None] | None = None
        self.started: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.task = asyncio.get_running_loop().create_task(self.run(), name=f"actor:{name}")

    def _build(self) -> Actor:
        actor = self.factory()
        actor.node = self.node
        actor.ref = self.ref
        return actor

    def put(self, message: Any, reply: Reply, origin: str | None = None) -> None:
        if not self.alive or self.stopping:
            raise ActorDead(f"actor {self.name} on node {self.node.id} is stopped")
        self.mailbox.append((message, reply, origin))
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    @property
    def full(self) -> bool:
        return len(self.mailbox) >= MAILBOX_HIGH

    async def room(self) -> None:
        """Wait until the mailbox has drained below its high-water mark (at once for
        the actor itself, which would otherwise wait on its own mailbox)."""
        while self.alive and not self.stopping and self.full:
            if asyncio.current_task() is self.task:
                return
            room = self._room
            if room is None or room.done():
                room = self._room = asyncio.get_running_loop().create_future()
            await room

    def stop(self) -> None:
        self.stopping = True
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def run(self) -> None:
        node, loop = self.node, asyncio.get_running_loop()
        running = False
        try:
            try:
                await self.actor.on_start()
            except Exception as exc:
                self.started.set_exception(exc)
                raise
            self.started.set_result(None)
            running = True
            while not self.stopping:
                if not self.mailbox:
                    self._waiter = loop.create_future()
                    await self._waiter
                    self._waiter = None
                    continue
                message, reply, origin = self.mailbox.popleft()
                if origin is not None:
                    node.consumed(origin, self.name)
                room = self._room
                if room is not None and len(self.mailbox) < MAILBOX_HIGH // 2:
                    self._room = None
                    if not room.done():
                        room.set_result(None)
                try:
                    result = await self.actor.receive(message)
                except Exception as exc:
                    self.processed += 1
                    await node.answer_error(reply, exc, self.name)
                    if not await self._supervise(exc):
                        break
                else:
                    self.processed += 1
                    if reply is not None:
                        await node.answer(reply, result, self.name)
                    result = None
                message = None  # drop in-place arrays before waiting for the next one
        except Exception as exc:
            where = "failed" if running else "failed to start"
            log.error("actor %s %s: %r", self.name, where, exc)
        finally:
            await self._finish()

    async def _supervise(self, exc: Exception) -> bool:
        """Apply the supervisor's decision; False when the actor must stop."""
        decision = self.node.supervisor.on_actor_crash(self.name, exc, self.policy)
        if decision is Policy.RESUME:
            return True
        if decision is Policy.RESTART:
            try:
                await self.actor.on_stop()
                self.actor = self._build()
                await self.actor.on_start()
                return True
            except Exception as restart_error:
                log.error("actor %s could not restart: %r", self.name, restart_error)
                return False
        if decision is Policy.ESCALATE:
            self.node.escalate(self.name, exc)
        return False

    async def _finish(self) -> None:
        self.alive = False
        if not self.started.done():
            self.started.set_exception(ActorDead(f"actor {self.name} stopped before starting"))
        try:
            await self.actor.on_stop()
        except Exception as exc:
            log.error("actor %s: on_stop raised %r", self.name, exc)
        dead = ActorDead(f"actor {self.name} on node {self.node.id} stopped")
        while self.mailbox:
            _message, reply, origin = self.mailbox.popleft()
            if origin is not None:
                self.node.consumed(origin, self.name)
            if reply is not None:
                await self.node.answer_error(reply, dead, self.name)
        if self._room is not None and not self._room.done():
            self._room.set_result(None)
        self.node.forget(self)
