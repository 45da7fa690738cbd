"""Every error asyncdb raises on purpose, rooted at `AsyncDBError`.

Transport errors (`ChannelClosed`, `DecodeError`, `MessageTooLarge`,
`AuthenticationError`, `VersionMismatch`) are defined in `asyncdb.transport` and
re-exported here.
"""

from __future__ import annotations

from typing import Any

from asyncdb.transport.errors import (
    AsyncDBError,
    AuthenticationError,
    ChannelClosed,
    DecodeError,
    MessageTooLarge,
    VersionMismatch,
)

__all__ = [
    "ActorDead",
    "ActorError",
    "AllReplicasLost",
    "AsyncDBError",
    "AuthenticationError",
    "ChannelClosed",
    "CheckpointError",
    "ConfigError",
    "DecodeError",
    "EncodeError",
    "MessageTooLarge",
    "RecoveryFailed",
    "RemoteTraceback",
    "RunError",
    "Timeout",
    "TrainingDiverged",
    "TrainingFailed",
    "UpdateRejected",
    "VersionMismatch",
    "error_from_remote",
]


class ActorDead(AsyncDBError):
    """Raised to an ask or tell whose target actor does not exist (never spawned, or
    stopped); also to asks still in the mailbox of an actor that stops."""


class Timeout(AsyncDBError, TimeoutError):
    """Raised by `ask` when no reply came within its timeout."""


class ActorError(AsyncDBError):
    """Raised by `ask` when the handler raised an exception that is not an asyncdb
    error. `remote_type` and `remote_message` describe the original; its traceback is
    chained as the cause (the original exception itself, when it ran in this process)."""

    def __init__(self, message: str, remote_type: str = "", remote_message: str = "",
                 actor: str = "") -> None:
        super().__init__(message)
        self.remote_type = remote_type
        self.remote_message = remote_message
        self.actor = actor


class RemoteTraceback(Exception):
    """The traceback text of an exception raised in another process; the cause of the
    error the asker sees."""


class EncodeError(AsyncDBError, TypeError):
    """Raised when a message holds something that cannot be sent: messages are plain
    data (None, bool, int, float, str, list, tuple, dict with str keys), numpy arrays,
    bytes and ActorRefs."""


class UpdateRejected(AsyncDBError, ValueError):
    """Raised to a push whose gradient has the wrong shape or dtype, or holds NaN or
    Inf; the shard's parameters are left as they were."""


class RunError(AsyncDBError):
    """A run that could not go on; `history` holds its entries so far (evaluations,
    or Sandblaster's iterations), which `asyncdb train` saves before it exits."""

    def __init__(self, message: str, history: list[dict[str, Any]] | None = None) -> None:
        super().__init__(message)
        self.history = list(history or [])


class TrainingDiverged(RunError):
    """Raised by `Cluster.train` when a run diverges: the replicas' loss turns NaN or
    Inf or grows past a hundred times its first value, or a shard refuses a push whose
    update would overflow. `history` holds the run's evaluations so far."""


class ConfigError(AsyncDBError, ValueError):
    """Raised for a configuration that cannot work: an unknown actor type, an invalid
    option, a layout that does not match the model."""


class RecoveryFailed(RunError):
    """Raised to a run whose failed shard cannot be brought back (restarts used up,
    no node left to put it on, no usable checkpoint): the run stops with its history."""


class CheckpointError(AsyncDBError):
    """Raised when a checkpoint cannot be written or read back: a file that is missing,
    truncated or fails its checksum (an older checkpoint is used where there is one)."""


def _typed_errors() -> dict[str, type[AsyncDBError]]:
    found: dict[str, type[AsyncDBError]] = {}
    pending: list[type[AsyncDBError]] = [AsyncDBError]
    while pending:
        cls = pending.pop()
        found[cls.__name__] = cls
        pending.extend(cls.__subclasses__())
    return found


def error_from_remote(info: dict[str, str]) -> AsyncDBError:
    """Rebuild the error a remote handler raised: the same asyncdb error type where
    there is one, else `ActorError`; the remote traceback is chained as its cause."""
    type_name = str(info.get("type", "Exception"))
    message = str(info.get("message", ""))
    actor = str(info.get("actor", ""))
    cls = _typed_errors().get(type_name)
    if cls is not None and cls is not ActorError:
        try:
            error: AsyncDBError = cls(message)
        except TypeError:
            error = ActorError(f"{actor}: {type_name}: {message}", type_name, message, actor)
    else:
        error = ActorError(f"{actor}: {type_name}: {message}", type_name, message, actor)
    trace = info.get("traceback")
    if trace:
        error.__cause__ = RemoteTraceback(trace)
    return error


class TrainingFailed(RunError):
    """Raised by `Cluster.train` when a run cannot go on: every replica was lost, or
    the shards refused the run's state."""


class AllReplicasLost(TrainingFailed):
    """Raised to a Downpour run when every replica was lost, none could be re-created,
    and work was left."""
