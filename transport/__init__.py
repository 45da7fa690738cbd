"""Moving frames between nodes: the channel interface, the wire format, and the
in-process, shared-memory and websocket transports. Knows nothing of actors."""

from __future__ import annotations

from . import inproc, shared, shm, ws
from .base import Channel, open_pair, register_transport, transport_schemes
from .errors import (
    AsyncDBError,
    AuthenticationError,
    ChannelClosed,
    DecodeError,
    MessageTooLarge,
    VersionMismatch,
)
from .frame import Frame, FrameDecoder, OutFrame, encode_frame, parse_frame
from .inproc import InprocChannel
from .shm import ShmChannel, ShmEndpoint, create_link
from .ws import WsChannel

__all__ = [
    "AsyncDBError",
    "AuthenticationError",
    "Channel",
    "ChannelClosed",
    "DecodeError",
    "Frame",
    "FrameDecoder",
    "InprocChannel",
    "MessageTooLarge",
    "OutFrame",
    "ShmChannel",
    "ShmEndpoint",
    "VersionMismatch",
    "WsChannel",
    "create_link",
    "encode_frame",
    "inproc",
    "open_pair",
    "parse_frame",
    "register_transport",
    "shared",
    "shm",
    "transport_schemes",
    "ws",
]
