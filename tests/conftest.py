from __future__ import annotations

import os
import threading

import pytest

import asyncdb


def _shm_entries() -> set[str]:
    return set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()


def _children() -> set[int]:
    me, found = os.getpid(), set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat.rpartition(")")[2].split()
        if int(fields[1]) == me and fields[0] != "Z":
            found.add(int(entry))
    return found


@pytest.fixture(autouse=True, scope="session")
def private_cache(tmp_path_factory):
    """Generated data sets are cached in a directory of the test session's own."""
    os.environ["ASYNCDB_CACHE"] = str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(autouse=True)
def nothing_left_behind():
    """Every test leaves /dev/shm as it found it, no child process running and no
    pulse thread (it stops with the last websocket channel)."""
    shm_before = _shm_entries()
    yield
    assert _shm_entries() - shm_before == set(), "shared-memory segment left in /dev/shm"
    assert _children() == set(), "child process outlived its test"
    pulses = [t for t in threading.enumerate() if t.name == "asyncdb-pulse"]
    assert not pulses, "a pulse thread outlived its websocket channels"


@pytest.fixture
async def cluster():
    """A driver node and two node processes on this host, linked by 1 MiB rings."""
    async with asyncdb.Node("driver", ask_timeout=20) as node, \
            asyncdb.LocalNodes(node, 2, ring_bytes=1 << 20) as nodes:
        yield node, nodes


@pytest.fixture
def three_peers(tmp_path):
    """Three `asyncdb serve` processes on 127.0.0.1 that accept each other."""
    from test_ws import Serve

    peers = [Serve(tmp_path, name, "--peers", "127.0.0.1")
             for name in ("peer-a", "peer-b", "peer-c")]
    yield peers
    for peer in peers:
        peer.stop()
