"""What happens when an actor's handler crashes or a node process dies.

Policies, per actor (`spawn(..., policy=...)`) or per node (`Node(supervisor=...)`):

- ``resume``: keep the actor and its state, go on with the next message (default);
- ``restart``: build a fresh actor from its class and config, then go on; more than
  `max_restarts` within `window_s` seconds turns into ``stop``;
- ``stop``: stop the actor; asks still in its mailbox get `ActorDead`;
- ``escalate``: stop the whole node; the failure surfaces to whoever runs it.

Every decision is logged with the actor, the error and the policy applied.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field
from enum import StrEnum

log = logging.getLogger("asyncdb.supervisor")


class Policy(StrEnum):
    RESUME = "resume"
    RESTART = "restart"
    STOP = "stop"
    ESCALATE = "escalate"


@dataclass
class Supervisor:
    policy: Policy = Policy.RESUME
    max_restarts: int = 3
    window_s: float = 60.0
    _restarts: dict[str, deque[float]] = field(default_factory=dict, repr=False)

    def on_actor_crash(self, actor: str, error: BaseException,
                       policy: Policy | None = None) -> Policy:
        """Decide what to do with `actor`, whose handler raised `error`; log it."""
        decision = Policy(policy or self.policy)
        if decision is Policy.RESTART:
            now = time.monotonic()
            recent = self._restarts.setdefault(actor, deque())
            while recent and now - recent[0] > self.window_s:
                recent.popleft()
            if len(recent) >= self.max_restarts:
                log.error("actor %s crashed %d times in %.0f s; stopping it: %r",
                          actor, len(recent) + 1, self.window_s, error)
                return Policy.STOP
            recent.append(now)
        log.warning("actor %s crashed: %r; policy: %s", actor, error, decision.value)
        return decision

    def on_node_exit(self, node: str, returncode: int | None, expected: bool) -> None:
        """Log a node process's end: quietly when it was asked to stop."""
        if expected:
            log.debug("node %s exited with code %s", node, returncode)
        else:
            log.error("node %s died unexpectedly (exit code %s); actors there are gone",
                      node, returncode)
