"""asyncdb: DistBelief (Dean et al., NIPS 2012) as an asyncio actor framework.

The whole public API is named here.
"""

from __future__ import annotations

from . import datasets
from .actor import Actor, ActorRef
from .checkpoint import CheckpointStore
from .cluster import Cluster
from .coordinator import Coordinator
from .dashboard import Dashboard
from .downpour import Downpour, Replica
from .errors import (
    ActorDead,
    ActorError,
    AllReplicasLost,
    AsyncDBError,
    AuthenticationError,
    ChannelClosed,
    CheckpointError,
    ConfigError,
    DecodeError,
    EncodeError,
    MessageTooLarge,
    RecoveryFailed,
    RemoteTraceback,
    RunError,
    Timeout,
    TrainingDiverged,
    TrainingFailed,
    UpdateRejected,
    VersionMismatch,
)
from .loop import run
from .node import Node
from .optim import SGD, Adagrad, UpdateRule
from .params import ParameterLayout
from .process import LocalNodes
from .registry import register_actor
from .runs import Run, SavedModel, load
from .sandblaster import Sandblaster
from .shard import ParameterShard
from .shard_client import ShardCheckpoint, ShardClient
from .supervisor import Policy, Supervisor
from .transport import shared

__version__ = "0.1.0"

__all__ = [
    "SGD",
    "Actor",
    "ActorDead",
    "ActorError",
    "ActorRef",
    "Adagrad",
    "AllReplicasLost",
    "AsyncDBError",
    "AuthenticationError",
    "ChannelClosed",
    "CheckpointError",
    "CheckpointStore",
    "Cluster",
    "ConfigError",
    "Coordinator",
    "Dashboard",
    "DecodeError",
    "Downpour",
    "EncodeError",
    "LocalNodes",
    "MessageTooLarge",
    "Node",
    "ParameterLayout",
    "ParameterShard",
    "Policy",
    "RecoveryFailed",
    "RemoteTraceback",
    "Replica",
    "Run",
    "RunError",
    "Sandblaster",
    "SavedModel",
    "ShardCheckpoint",
    "ShardClient",
    "Supervisor",
    "Timeout",
    "TrainingDiverged",
    "TrainingFailed",
    "UpdateRejected",
    "UpdateRule",
    "VersionMismatch",
    "__version__",
    "datasets",
    "load",
    "register_actor",
    "run",
    "shared",
]
