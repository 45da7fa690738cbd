"""Flow control per target actor between two nodes.

A node may have `window` messages in flight to one actor on a peer node (tells and
asks alike; the peer's system actor is exempt). The receiving node counts the messages
its actor takes from the mailbox and grants them back in batches of `window // 4` with
a CREDIT frame. A sender without credit waits, so `tell` waits for room in that one
actor's mailbox while the link itself keeps flowing: replies, credits and messages to
every other actor never queue behind a full mailbox.
"""

from __future__ import annotations

import asyncio

from .errors import ChannelClosed

Key = tuple[str, str]  # (node, actor name)


class Credits:
    """Both sides of the window: credit left per (peer, actor) for sending, and
    messages taken but not yet granted back per (peer, actor) for receiving."""

    def __init__(self, window: int) -> None:
        self.window = window
        self.batch = max(1, window // 4)
        self._left: dict[Key, int] = {}
        self._waiters: dict[Key, asyncio.Future[None]] = {}
        self._owed: dict[Key, int] = {}

    def try_take(self, peer: str, name: str) -> bool:
        """Use one credit to send to actor `name` on `peer`, if there is one."""
        key = (peer, name)
        left = self._left.get(key, self.window)
        if left <= 0:
            return False
        self._left[key] = left - 1
        return True

    async def take(self, peer: str, name: str) -> None:
        """Use one credit, waiting for a grant while the window is used up;
        ChannelClosed if the peer goes away meanwhile."""
        key = (peer, name)
        left = self._left.get(key, self.window)
        while left <= 0:
            waiter = self._waiters.get(key)
            if waiter is None or waiter.done():
                waiter = self._waiters[key] = asyncio.get_running_loop().create_future()
            await waiter
            left = self._left.get(key, self.window)
        self._left[key] = left - 1

    def grant(self, peer: str, name: str, count: int) -> None:
        """`peer` says actor `name` took `count` more messages."""
        key = (peer, name)
        self._left[key] = min(self.window, self._left.get(key, self.window) + count)
        waiter = self._waiters.pop(key, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def consumed(self, peer: str, name: str) -> int:
        """Actor `name` took a message `peer` sent; the count to grant back now, or 0."""
        key = (peer, name)
        owed = self._owed.get(key, 0) + 1
        if owed >= self.batch:
            self._owed[key] = 0
            return owed
        self._owed[key] = owed
        return 0

    def forget(self, peer: str) -> None:
        """The channel to `peer` closed: its windows start afresh, waiting senders fail."""
        for table in (self._left, self._owed):
            for key in [k for k in table if k[0] == peer]:
                del table[key]
        for key in [k for k in self._waiters if k[0] == peer]:
            waiter = self._waiters.pop(key)
            if not waiter.done():
                waiter.set_exception(ChannelClosed(f"node {peer} is gone"))
