"""The root of every asyncdb error, and the errors the transport layer raises.

The root lives here, in the lowest layer, so that `asyncdb.transport` needs nothing
from the layers above it; `asyncdb.errors` re-exports these names beside its own.
"""

from __future__ import annotations


class AsyncDBError(Exception):
    """Root of every error asyncdb raises on purpose."""


class ChannelClosed(AsyncDBError, ConnectionError):
    """Raised by a channel's send or receive, and by every ask waiting on it, once the
    channel is closed: by either side, or because the peer process died or vanished."""


class DecodeError(AsyncDBError, ValueError):
    """Raised by the frame decoder and the message codec on malformed input: a bad
    header, an impossible length, an unknown dtype, metadata that is not valid JSON.
    The connection that sent it may be closed; the node keeps running."""


class MessageTooLarge(DecodeError):
    """Raised when a frame is longer than the limit the receiving side allows."""


class AuthenticationError(AsyncDBError, PermissionError):
    """Raised when a peer fails the shared-secret challenge, or when this side does."""


class VersionMismatch(AuthenticationError):
    """Raised when a peer speaks another version of the asyncdb wire protocol; both
    sides say which versions they speak."""
