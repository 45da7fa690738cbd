"""asyncdb: DistBelief (Dean et al., NIPS 2012) as an asyncio actor framework.

The whole public API is named here.
"""

from __future__ import annotations

from .actor import Actor, ActorRef
from .errors import (
    ActorDead,
    ActorError,
    AsyncDBError,
    AuthenticationError,
    ChannelClosed,
    ConfigError,
    DecodeError,
    EncodeError,
    MessageTooLarge,
    RemoteTraceback,
    Timeout,
    UpdateRejected,
)
from .loop import run
from .node import Node
from .process import LocalNodes
from .registry import register_actor
from .supervisor import Policy, Supervisor

__version__ = "0.1.0"

__all__ = [
    "Actor",
    "ActorDead",
    "ActorError",
    "ActorRef",
    "AsyncDBError",
    "AuthenticationError",
    "ChannelClosed",
    "ConfigError",
    "DecodeError",
    "EncodeError",
    "LocalNodes",
    "MessageTooLarge",
    "Node",
    "Policy",
    "RemoteTraceback",
    "Supervisor",
    "Timeout",
    "UpdateRejected",
    "__version__",
    "register_actor",
    "run",
]
