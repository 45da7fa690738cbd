"""Websocket peers: authentication, hostile input, real `asyncdb serve` processes."""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import numpy as np
import pytest

import asyncdb
from asyncdb.serve import client_ssl
from asyncdb.transport import ws
from asyncdb.transport.frame import HEADER, MAGIC, VERSION

SECRET = b"0123456789abcdef0123456789abcdef"


class Echo(asyncdb.Actor):
    async def receive(self, message):
        if isinstance(message, dict) and "sleep" in message:
            await asyncio.sleep(message["sleep"])
        return message


@pytest.fixture
async def server():
    """An in-process node serving websockets, as `asyncdb serve` does."""
    node = asyncdb.Node("server")
    await node.spawn(Echo, name="echo")

    async def on_channel(peer, channel):
        node.connect(peer, channel)

    runner = await ws.listen("127.0.0.1", 0, SECRET, node.id, on_channel,
                             max_frame_bytes=16 << 20)
    yield node, f"ws://127.0.0.1:{ws.bound_port(runner)}"
    await node.close()
    await runner.cleanup()


async def client_node(url, secret=SECRET, name="client"):
    node = asyncdb.Node(name, ask_timeout=10)
    channel = await ws.connect(url, secret, node.id)
    node.connect(channel.peer, channel)
    return node


async def test_authenticated_peers_talk(server):
    _node, url = server
    client = await client_node(url)
    try:
        echo = client.ref("server", "echo")
        assert await echo.ask({"x": [1, 2]}) == {"x": [1, 2]}
        big = np.random.default_rng(0).standard_normal(700_000)  # > one websocket piece
        np.testing.assert_array_equal(await echo.ask(big), big)
    finally:
        await client.close()


async def test_wrong_secret_is_refused_and_nothing_is_acted_on(server, caplog):
    node, url = server
    with pytest.raises(asyncdb.AuthenticationError):
        await ws.connect(url, b"not the secret, not at all......", "intruder")
    await asyncio.sleep(0.1)
    assert "intruder" not in node.peers()
    assert "failed the challenge" in caplog.text


async def raw_socket(url):
    session = aiohttp.ClientSession()
    sock = await session.ws_connect(url + ws.PATH)
    return session, sock


async def test_garbage_before_authentication_is_refused(server):
    node, url = server
    session, sock = await raw_socket(url)
    try:
        await sock.receive()  # the challenge
        await sock.send_bytes(b"\x00" * 100)
        message = await sock.receive()
        assert message.type == aiohttp.WSMsgType.CLOSE
        assert sock.close_code == ws.CLOSE_AUTH
    finally:
        await session.close()
    assert node.peers() == []


async def authenticated_raw(url, name):
    session, sock = await raw_socket(url)
    await ws._client_handshake(sock, SECRET, name)
    return session, sock


@pytest.mark.parametrize(
    ("payload", "code", "reason"),
    [
        (b"garbage that is not a frame at all", ws.CLOSE_INVALID, b"bad magic"),
        (HEADER.pack(MAGIC, VERSION, 1, 0, 0, 0, 1 << 40), ws.CLOSE_TOO_BIG, b"limit"),
        (HEADER.pack(MAGIC, VERSION, 1, 0, 0, 5, HEADER.size + 5) + b"{{{{{", None, None),
    ],
)
async def test_hostile_frames_close_that_connection_only(server, payload, code, reason):
    node, url = server
    session, sock = await authenticated_raw(url, "hostile")
    healthy = await client_node(url, name="healthy")
    try:
        await sock.send_bytes(payload)
        if code is not None:
            message = await asyncio.wait_for(sock.receive(), 5)
            while message.type == aiohttp.WSMsgType.BINARY:  # the node's hello
                message = await asyncio.wait_for(sock.receive(), 5)
            assert message.type == aiohttp.WSMsgType.CLOSE
            assert sock.close_code == code and reason in message.extra.encode()
        else:  # a well-formed frame with bad metadata is dropped and logged
            await asyncio.sleep(0.2)
            assert "hostile" in node.peers()
        assert await healthy.ref("server", "echo").ask("still serving") == "still serving"
    finally:
        await session.close()
        await healthy.close()


async def test_peer_going_away_surfaces_as_channel_closed(server):
    node, url = server
    client = await client_node(url)
    try:
        pending = asyncio.create_task(client.ref("server", "echo").ask({"sleep": 30}))
        await asyncio.sleep(0.1)
        await node.close()
        start = time.monotonic()
        with pytest.raises(asyncdb.ChannelClosed):
            await asyncio.wait_for(pending, 5)
        assert time.monotonic() - start < 2
    finally:
        await client.close()


# -- real `asyncdb serve` processes -----------------------------------------------


class Serve:
    def __init__(self, tmp: Path, name: str, *extra: str) -> None:
        secret_file = tmp / "secret"
        secret_file.write_bytes(SECRET)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "asyncdb", "serve", "--listen", "127.0.0.1:0",
             "--secret-file", str(secret_file), "--name", name, *extra],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        match = re.search(r"(wss?)://127\.0\.0\.1:(\d+)", line)
        assert match, f"serve did not start: {line!r} {self.proc.stderr.read()}"
        self.url = f"{match.group(1)}://127.0.0.1:{match.group(2)}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


@pytest.fixture
def two_peers(tmp_path):
    # Each may dial the other (any port on this host: they bind port 0).
    peers = [Serve(tmp_path, name, "--peers", "127.0.0.1") for name in ("peer-a", "peer-b")]
    yield peers
    for peer in peers:
        peer.stop()


async def test_downpour_across_two_serve_processes(two_peers):
    data = asyncdb.datasets.load("digits")
    urls = [p.url for p in two_peers]
    async with asyncdb.Cluster.connect(urls, SECRET, shards=2, replicas=2) as cluster:
        assert sorted(cluster.peer_ids) == ["peer-a", "peer-b"]
        status = await cluster.node.ref("peer-a", "_system").ask({"op": "ping"})
        assert "peer-b" in status["peers"]  # the peers dialled each other
        run = await cluster.train(asyncdb.models.MLP([64, 64, 10]), data,
                                  algorithm=asyncdb.Downpour(batch_size=32),
                                  optimizer=asyncdb.Adagrad(lr=0.05), epochs=12)
    assert run.final["test_accuracy"] >= 0.93
    assert run.final["replicas"] == 2 and not run.lost


async def test_killing_a_peer_surfaces_promptly(two_peers):
    urls = [p.url for p in two_peers]
    async with asyncdb.Cluster.connect(urls, SECRET, heartbeat=1.0) as cluster:
        node = cluster.node
        victim, frozen = cluster.peer_ids
        ref = await node.spawn("asyncdb.ParameterShard", node=victim, config={
            "index": 0, "values": np.zeros(4, np.float32),
            "optimizer": asyncdb.SGD().to_config()})
        pending = asyncio.create_task(node.ref(victim, "_system").ask({"op": "ping"}))
        await pending
        os.kill(two_peers[0].proc.pid, signal.SIGKILL)
        start = time.monotonic()
        with pytest.raises(asyncdb.ChannelClosed):
            await ref.ask({"op": "fetch"}, timeout=10)
        assert time.monotonic() - start < 2
        # A peer that stops answering (frozen, not closed) is found by the heartbeat.
        os.kill(two_peers[1].proc.pid, signal.SIGSTOP)
        start = time.monotonic()
        with pytest.raises(asyncdb.ChannelClosed):
            await node.ref(frozen, "_system").ask({"op": "ping"}, timeout=20)
        assert time.monotonic() - start < 5


async def test_network_peers_create_only_registered_actor_types(two_peers):
    async with asyncdb.Cluster.connect([two_peers[0].url], SECRET) as cluster:
        with pytest.raises(asyncdb.ConfigError, match="unknown actor type"):
            await cluster.node.spawn("os:system", node=cluster.peer_ids[0])
        with pytest.raises(asyncdb.ConfigError, match="unknown actor type"):
            await cluster.node.spawn(Echo, node=cluster.peer_ids[0])


async def test_a_peer_cannot_read_a_file_on_a_serve_host(tmp_path):
    """The attack: a Replica whose data spec names a file here, its shards a fake one on
    the attacker's node, so that the file's bytes would come back as gradients."""
    canary = tmp_path / "canary"
    canary.write_bytes(bytes(range(256)) * 4)
    peer = Serve(tmp_path, "victim")
    try:
        async with asyncdb.Node("attacker", ask_timeout=20) as node:
            channel = await ws.connect(peer.url, SECRET, node.id)
            node.connect(channel.peer, channel)
            fake = await node.spawn(Echo, name="fake-shard")
            model = asyncdb.models.MLP([256, 1, 2])
            spec = {"kind": "shared", "arrays": {
                "x": {"path": str(canary), "dtype": "|u1", "shape": [4, 256]},
                "y": {"path": str(canary), "dtype": "|u1", "shape": [4]}}}
            config = {"index": 0, "model": model.to_config(), "shards": [fake],
                      "bounds": [[0, model.num_params()]], "data": spec,
                      "algorithm": asyncdb.Downpour(batch_size=4).to_config()}
            with pytest.raises(asyncdb.ConfigError, match="inline"):
                await node.spawn("asyncdb.Replica", node="victim", config=config)
            system = node.ref("victim", "_system")
            assert (await system.ask({"op": "ping"}))["actors"] == []
            with pytest.raises(asyncdb.ConfigError, match="shutdown"):
                await system.ask({"op": "shutdown"})
            with pytest.raises(asyncdb.ConfigError, match="peers its operator listed"):
                await system.ask({"op": "dial", "url": "ws://127.0.0.1:22"})
            assert (await system.ask({"op": "ping"}))["node"] == "victim"
        assert peer.proc.poll() is None
    finally:
        peer.stop()


def make_certificate(tmp: Path) -> tuple[Path, Path]:
    cert, key = tmp / "cert.pem", tmp / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return cert, key


async def test_tls_peers(tmp_path):
    cert, key = make_certificate(tmp_path)
    peer = Serve(tmp_path, "tls-peer", "--cert", str(cert), "--key", str(key))
    try:
        assert peer.url.startswith("wss://")
        async with asyncdb.Cluster.connect([peer.url], SECRET,
                                           ssl_context=client_ssl(str(cert))) as cluster:
            assert cluster.peer_ids == ["tls-peer"]
        with pytest.raises(asyncdb.ChannelClosed, match="certificate"):
            async with asyncdb.Cluster.connect([peer.url], SECRET):
                pass
    finally:
        peer.stop()


def test_serve_refuses_bad_settings(tmp_path):
    short = tmp_path / "short"
    short.write_bytes(b"tiny")
    out = subprocess.run([sys.executable, "-m", "asyncdb", "serve", "--listen", "127.0.0.1:0",
                          "--secret-file", str(short)], capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 1 and "at least 16 bytes" in out.stderr
    out = subprocess.run([sys.executable, "-m", "asyncdb", "serve", "--listen", "nope",
                          "--secret-file", str(short)], capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 1


def test_secret_is_not_guessable():
    assert ws._proof(SECRET, "client", "c", "n", "x") != ws._proof(
        secrets.token_bytes(32), "client", "c", "n", "x")


async def test_actors_of_a_vanished_driver_are_stopped(two_peers):
    url = two_peers[0].url
    async with asyncdb.Cluster.connect([url], SECRET) as first:
        peer = first.peer_ids[0]
        await first.node.spawn("asyncdb.ParameterShard", node=peer, name="orphan", config={
            "index": 0, "values": np.zeros(4, np.float32),
            "optimizer": asyncdb.SGD().to_config()})
        system = first.node.ref(peer, "_system")
        assert "orphan" in (await system.ask({"op": "ping"}))["actors"]
    # The first driver is gone without stopping its actor; a second one looks.
    async with asyncdb.Cluster.connect([url], SECRET) as second:
        system = second.node.ref(second.peer_ids[0], "_system")
        deadline = time.monotonic() + 5
        while "orphan" in (await system.ask({"op": "ping"}))["actors"]:
            assert time.monotonic() < deadline, "the vanished driver's actor still runs"
            await asyncio.sleep(0.05)
