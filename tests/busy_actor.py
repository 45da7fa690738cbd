"""An actor that keeps its node's event loop busy (a stand-in for a BLAS call of
seconds), for `asyncdb serve --import busy_actor` in the liveness tests."""

from __future__ import annotations

import time

import asyncdb
from asyncdb.registry import register_actor


@register_actor("tests.Busy")
class Busy(asyncdb.Actor):
    async def receive(self, message: float) -> float:
        time.sleep(message)  # noqa: ASYNC251 (the point: the loop is blocked, threads run)
        return message
