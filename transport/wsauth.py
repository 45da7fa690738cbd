"""The websocket handshake and the authentication of every message after it.

Handshake (JSON text messages, each at most `HANDSHAKE_BYTES`):

    server -> client   {"asyncdb": PROTOCOL, "challenge": C, "node": S}
    client -> server   {"asyncdb": PROTOCOL, "node": N, "nonce": R, "proof": P_client}
    server -> client   {"proof": P_server}

P_role = HMAC-SHA256(secret, "asyncdb-v<PROTOCOL>|role|C|R|name"). Either side that
sees another protocol version closes with `CLOSE_VERSION` and says which it speaks.

After it, every binary websocket message is `payload || tag`, where tag is
HMAC-SHA256, cut to 16 bytes, of the message's sequence number in its direction (u64,
from 0) and its payload, keyed per direction with a session key derived from the
secret, both nonces and both node names. (SHA-256 rather than BLAKE2b: OpenSSL's runs
on the CPU's SHA extensions, several times faster than hashlib's BLAKE2b here.) A
message injected, replayed, reordered or dropped on the
path fails its tag and closes the connection. TLS (wss://) adds confidentiality.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from typing import Any

from .errors import AuthenticationError, VersionMismatch

PROTOCOL = 2
HANDSHAKE_BYTES = 4096  # largest message before authentication
TAG_BYTES = 16
_NAME = re.compile(r"[\x21-\x7e]{1,128}")  # printable ASCII, no spaces
_HEX = re.compile(r"[0-9a-f]{64}")


def short(text: object, limit: int = 80) -> str:
    """`text` cut to `limit` characters, for logging what a peer sent."""
    s = str(text)
    return s if len(s) <= limit else f"{s[:limit]}... ({len(s)} chars)"


def check_name(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise AuthenticationError(f"node name {short(name)!r} is not 1 to 128 printable "
                                  "characters without spaces")
    return name


def proof(secret: bytes, role: str, challenge: str, nonce: str, node: str) -> str:
    text = f"asyncdb-v{PROTOCOL}|{role}|{challenge}|{nonce}|{node}".encode()
    return hmac.new(secret, text, hashlib.sha256).hexdigest()


def session_keys(secret: bytes, challenge: str, nonce: str, server: str,
                 client: str) -> tuple[bytes, bytes]:
    """(client-to-server key, server-to-client key) of one connection."""
    text = f"asyncdb-v{PROTOCOL}|session|{challenge}|{nonce}|{server}|{client}".encode()
    session = hmac.new(secret, text, hashlib.sha256).digest()
    return (hmac.new(session, b"client->server", hashlib.sha256).digest(),
            hmac.new(session, b"server->client", hashlib.sha256).digest())


def parse(text: Any, *names: str, version: bool = False) -> list[str]:
    """The named fields of one handshake message, each a string of at most 256
    characters; AuthenticationError for anything else (deep nesting included), and
    VersionMismatch when `version` is asked for and differs."""
    try:
        if not isinstance(text, str) or len(text) > HANDSHAKE_BYTES:
            raise TypeError
        data = json.loads(text)
        if not isinstance(data, dict):
            raise TypeError
    except (TypeError, ValueError, RecursionError):
        raise AuthenticationError(f"expected a handshake message with {names}") from None
    if version and data.get("asyncdb") != PROTOCOL:
        raise VersionMismatch(f"this side speaks asyncdb protocol {PROTOCOL}, the peer "
                              f"{short(data.get('asyncdb', 'an older one'), 20)}")
    fields = [data.get(name) for name in names]
    if not all(isinstance(f, str) and len(f) <= 256 for f in fields):
        raise AuthenticationError(f"expected a handshake message with {names}")
    return fields  # type: ignore[return-value]


def port_field(text: Any, name: str) -> int | None:
    """An optional port number (a decimal string) in a handshake message that `parse`
    has already accepted; None when absent or not a port (peers without it still
    connect)."""
    try:
        value = json.loads(text).get(name)
    except (TypeError, ValueError, AttributeError, RecursionError):
        return None
    if isinstance(value, str) and value.isdigit() and 0 < int(value) < 65536:
        return int(value)
    return None


def check_nonce(nonce: str) -> str:
    if not _HEX.fullmatch(nonce):
        raise AuthenticationError("a handshake nonce is 64 hex digits")
    return nonce


class Sealer:
    """Tags the messages one side sends, in order."""

    def __init__(self, key: bytes) -> None:
        self._base = hmac.new(key, digestmod=hashlib.sha256)  # keyed once, copied per use
        self.seq = 0

    def tag(self, payload: bytes | memoryview) -> bytes:
        h = self._base.copy()
        h.update(self.seq.to_bytes(8, "little"))
        h.update(payload)
        self.seq += 1
        return h.digest()[:TAG_BYTES]

    def seal(self, payload: bytes | memoryview) -> bytes:
        return b"".join((payload, self.tag(payload)))


class Opener(Sealer):
    """Checks the messages one side receives, in order."""

    def open(self, message: bytes) -> memoryview:
        """The payload of `message`; AuthenticationError if its tag is wrong."""
        view = memoryview(message)
        if len(view) < TAG_BYTES:
            raise AuthenticationError("message too short to carry its tag")
        payload = view[:-TAG_BYTES]
        if not hmac.compare_digest(self.tag(payload), view[-TAG_BYTES:]):
            raise AuthenticationError(f"message {self.seq - 1} failed authentication "
                                      "(injected, replayed or reordered on the path)")
        return payload
