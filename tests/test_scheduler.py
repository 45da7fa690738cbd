"""Handing units to replicas: which error ends a run that cannot go on."""

from __future__ import annotations

import asyncdb
from asyncdb.errors import ChannelClosed, RecoveryFailed
from asyncdb.placement import InProcess
from asyncdb.recovery import Events, Recovery, RestartPolicy
from asyncdb.scheduler import UnitScheduler
from asyncdb.workqueue import WorkQueue


class Gone(asyncdb.Actor):
    """A replica whose node is gone: every unit fails as a lost channel does."""

    async def receive(self, message):
        raise ChannelClosed("node replica-node is gone")


async def never(node: str, generation: int):
    raise AssertionError("no restarts are allowed")


async def test_a_shard_that_cannot_come_back_is_the_error_not_the_lost_replicas():
    """The replica's node is reported first and given up on (no restarts left), the
    shard's node after it: the run ends with RecoveryFailed, naming the shard, not
    AllReplicasLost, whatever order the failures were handled in."""
    async with asyncdb.Node("driver") as node:
        replica = await node.spawn(Gone)
        events = Events()
        recovery = Recovery(InProcess(), events, RestartPolicy(max_restarts=0))
        recovery.track("replica", 0, "replica-node", replica, never)
        recovery.track("shard", 0, "shard-node", replica, never)
        recovery.failed("replica-node", "died")
        await events.wait("abandoned", role="replica", index=0)
        recovery.failed("shard-node", "died")  # its recovery is under way, not done
        scheduler = UnitScheduler([replica], events, recovery=recovery,
                                  shard_nodes=lambda: ["shard-node"])
        try:
            await scheduler.drain(WorkQueue([0]), [0], lambda unit, index: {"unit": unit},
                                  lambda unit, index, result: None)
        except RecoveryFailed as exc:
            assert "shard cannot be lost" in str(exc)
        else:
            raise AssertionError("the run went on")
        finally:
            await recovery.close()
