"""The websocket handshake's parsing and the per-message tags (no sockets here; the
same over real sockets in test_ws.py)."""

from __future__ import annotations

import json

import pytest

import asyncdb
from asyncdb.transport import wsauth
from asyncdb.transport.wsauth import Opener, Sealer

KEYS = wsauth.session_keys(b"s" * 32, "c" * 64, "n" * 64, "server", "client")


def test_sealed_messages_open_in_order_only():
    sealer, opener = Sealer(KEYS[0]), Opener(KEYS[0])
    first, second = sealer.seal(b"first"), sealer.seal(memoryview(b"second"))
    assert bytes(opener.open(first)) == b"first"
    with pytest.raises(asyncdb.AuthenticationError, match="replayed"):
        opener.open(first)  # replayed
    opener = Opener(KEYS[0])
    with pytest.raises(asyncdb.AuthenticationError):
        opener.open(second)  # reordered: message 1 where 0 was due


def test_tampered_or_foreign_messages_fail():
    sealed = Sealer(KEYS[0]).seal(b"payload")
    tampered = bytearray(sealed)
    tampered[0] ^= 1
    with pytest.raises(asyncdb.AuthenticationError):
        Opener(KEYS[0]).open(bytes(tampered))
    with pytest.raises(asyncdb.AuthenticationError):
        Opener(KEYS[1]).open(sealed)  # the other direction's key: no reflection
    other = wsauth.session_keys(b"s" * 32, "d" * 64, "n" * 64, "server", "client")
    with pytest.raises(asyncdb.AuthenticationError):
        Opener(other[0]).open(sealed)  # another session
    with pytest.raises(asyncdb.AuthenticationError, match="too short"):
        Opener(KEYS[0]).open(b"tiny")


def test_handshake_parsing_is_strict_and_safe():
    with pytest.raises(asyncdb.AuthenticationError):
        wsauth.parse("[" * 2000 + "]" * 2000, "node")  # RecursionError inside json
    with pytest.raises(asyncdb.AuthenticationError):
        wsauth.parse(json.dumps({"node": ["x"]}), "node")
    with pytest.raises(asyncdb.AuthenticationError):
        wsauth.parse(json.dumps({"node": "x" * 300}), "node")
    with pytest.raises(asyncdb.VersionMismatch, match="protocol 2, the peer 1"):
        wsauth.parse(json.dumps({"asyncdb": 1, "node": "x"}), "node", version=True)
    message = json.dumps({"asyncdb": wsauth.PROTOCOL, "node": "x"})
    assert wsauth.parse(message, "node", version=True) == ["x"]


def test_names_are_checked_and_logged_short():
    with pytest.raises(asyncdb.AuthenticationError) as info:
        wsauth.check_name("n" * (4 << 20))
    assert len(str(info.value)) < 200
    with pytest.raises(asyncdb.AuthenticationError):
        wsauth.check_name("has a space")
    assert wsauth.check_name("driver-host-1234") == "driver-host-1234"
    assert wsauth.short("x" * 1000, 10) == "xxxxxxxxxx... (1000 chars)"
