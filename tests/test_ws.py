"""Websocket peers: authentication, hostile input, real `asyncdb serve` processes."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import secrets
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import numpy as np
import pytest
from aiohttp import web

import asyncdb
from asyncdb import codec
from asyncdb.serve import client_ssl
from asyncdb.transport import ws, wsauth
from asyncdb.transport.frame import HEADER, MAGIC, VERSION, FrameDecoder
from asyncdb.transport.wsauth import Opener, Sealer

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
    """A bare websocket past the handshake, and the sealer and opener of its messages."""
    session, sock = await raw_socket(url)
    _peer, (send_key, receive_key), _pulse = await ws._client_handshake(sock, SECRET, name)
    return session, sock, Sealer(send_key), Opener(receive_key)


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
    session, sock, sealer, _opener = await authenticated_raw(url, "hostile")
    healthy = await client_node(url, name="healthy")
    try:
        await sock.send_bytes(sealer.seal(payload))
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


class Counter(asyncdb.Actor):
    def __init__(self):
        self.count = 0

    async def receive(self, message):
        if message == "add":
            self.count += 1
        return self.count


def sealed(sealer, frame):
    """The websocket messages carrying `frame`, each with its tag."""
    return [sealer.seal(piece) for piece in frame.pieces(ws.PIECE_BYTES)]


async def test_every_frame_is_authenticated(server):
    """Frames injected, replayed or reordered on the path close the connection, and
    none of them is acted on."""
    node, url = server
    await node.spawn(Counter, name="counter")
    tell = codec.encode_message(codec.TELL, ["counter"], "add")
    ask = codec.encode_message(codec.ASK, ["counter", 1], "get")
    for attack in ("inject", "replay", "reorder"):
        session, sock, sealer, opener = await authenticated_raw(url, f"mallory-{attack}")
        try:
            (told,) = sealed(sealer, tell)
            await sock.send_bytes(told)
            for message in sealed(sealer, ask):  # a sealed ask is answered, sealed
                await sock.send_bytes(message)
            frames = []
            while len(frames) < 2:  # the node's hello, then the answer
                message = await asyncio.wait_for(sock.receive(), 5)
                frames += FrameDecoder().feed(opener.open(message.data))
            assert codec.decode_message(frames[1], node.ref)[1] >= 1
            if attack == "inject":  # a valid frame with a made-up tag
                await sock.send_bytes(b"".join(tell.pieces(1 << 20)) + bytes(16))
            elif attack == "replay":
                await sock.send_bytes(told)
            else:
                first, second = sealed(sealer, tell), sealed(sealer, tell)
                await sock.send_bytes(second[0])
                await sock.send_bytes(first[0])
            message = await asyncio.wait_for(sock.receive(), 5)
            assert message.type == aiohttp.WSMsgType.CLOSE
            assert sock.close_code == ws.CLOSE_AUTH
        finally:
            await session.close()
    assert node.actor("counter").count == 3  # one tell per connection, nothing more


async def raw_upgrade(url):
    """A TCP connection that has asked for a websocket, as an attacker would, with the
    server's challenge read; frames are then written by hand."""
    host, port = url.removeprefix("ws://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(f"GET {ws.PATH} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n"
                 f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                 "Sec-WebSocket-Version: 13\r\n\r\n".encode())
    await reader.readuntil(b"\r\n\r\n")
    opcode, challenge = await read_ws_frame(reader)
    assert opcode == 1 and b"challenge" in challenge
    return reader, writer


async def read_ws_frame(reader):
    first, second = await reader.readexactly(2)
    n = second & 0x7F
    if n == 126:
        (n,) = struct.unpack(">H", await reader.readexactly(2))
    elif n == 127:
        (n,) = struct.unpack(">Q", await reader.readexactly(8))
    return first & 0x0F, await reader.readexactly(n)


async def test_before_authentication_messages_are_small(server):
    """A text frame announced at 1 MiB is refused on its header: nothing is buffered
    for it (it used to be held, growing, until the handshake timed out)."""
    node, url = server
    reader, writer = await raw_upgrade(url)
    try:
        writer.write(bytes([0x81, 0x80 | 127]) + struct.pack(">Q", 1 << 20) + os.urandom(4)
                     + b"{" * 1000)
        opcode, payload = await asyncio.wait_for(read_ws_frame(reader), 5)
        assert opcode == 8 and struct.unpack(">H", payload[:2])[0] == ws.CLOSE_TOO_BIG
    finally:
        writer.close()
    assert node.peers() == []


@pytest.mark.parametrize("hello", [
    "[" * 2000 + "]" * 2000,  # nested past Python's recursion limit
    json.dumps({"asyncdb": 2, "node": "n" * 3000, "nonce": "0" * 64, "proof": "0" * 64}),
    json.dumps({"asyncdb": 2, "node": "x y", "nonce": "0" * 64, "proof": "0" * 64}),
])
async def test_bad_handshakes_get_a_clean_4401(server, caplog, hello):
    node, url = server
    session, sock = await raw_socket(url)
    try:
        await sock.receive()  # the challenge
        await sock.send_str(hello)
        message = await asyncio.wait_for(sock.receive(), 5)
        assert message.type == aiohttp.WSMsgType.CLOSE and sock.close_code == ws.CLOSE_AUTH
    finally:
        await session.close()
    assert node.peers() == []
    assert "refused" in caplog.text
    assert "Traceback" not in caplog.text and not any(r.exc_info for r in caplog.records)
    assert all(len(r.getMessage()) < 400 for r in caplog.records)


async def test_protocol_versions_must_match_on_both_sides(server, caplog):
    _node, url = server
    session, sock = await raw_socket(url)
    try:
        await sock.receive()
        await sock.send_str(json.dumps({"asyncdb": 1, "node": "old", "nonce": "0" * 64,
                                        "proof": "0" * 64}))
        message = await asyncio.wait_for(sock.receive(), 5)
        assert sock.close_code == ws.CLOSE_VERSION
        assert "protocol 2, the peer 1" in message.extra
    finally:
        await session.close()
    assert "protocol 2, the peer 1" in caplog.text

    async def old_server(request):  # a node of another version, as a client sees it
        sock = web.WebSocketResponse()
        await sock.prepare(request)
        await sock.send_str(json.dumps({"asyncdb": 3, "challenge": "c", "node": "future"}))
        closed.set_result(await sock.receive())
        return sock

    closed = asyncio.get_running_loop().create_future()
    app = web.Application()
    app.router.add_get(ws.PATH, old_server)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        with pytest.raises(asyncdb.VersionMismatch, match="protocol 2, the peer 3"):
            await ws.connect(f"ws://127.0.0.1:{ws.bound_port(runner)}", SECRET, "client")
        message = await asyncio.wait_for(closed, 5)
        assert message.data == ws.CLOSE_VERSION and "protocol 2" in message.extra
    finally:
        await runner.cleanup()


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


def secret_file(tmp: Path, secret: bytes = SECRET) -> Path:
    path = tmp / "secret"
    path.write_bytes(secret)
    path.chmod(0o600)
    return path


class Serve:
    def __init__(self, tmp: Path, name: str, *extra: str, nofile: int | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.name = name
        python = [sys.executable, "-m", "asyncdb"]
        if nofile is not None:  # a low descriptor limit in the serve process alone
            python = [sys.executable, "-c", "import resource, sys; "
                      f"resource.setrlimit(resource.RLIMIT_NOFILE, ({nofile}, {nofile})); "
                      "from asyncdb.cli import main; sys.exit(main(sys.argv[1:]))"]
        self.proc = subprocess.Popen(
            [*python, "serve", "--listen", "127.0.0.1:0",
             "--secret-file", str(secret_file(tmp)), "--name", name, *extra],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=None if env is None else {**os.environ, **env})
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
        self.errors = self.proc.stderr.read() if self.proc.stderr else ""
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


@pytest.mark.slow
async def test_junk_connections_do_not_lock_peers_out(tmp_path):
    """300 connections that never finish their HTTP headers, against a serve node
    allowed 128 descriptors: a real peer still gets in, and the junk is dropped."""
    peer = Serve(tmp_path, "guarded", "--auth-timeout", "3", nofile=128)
    junk = []
    try:
        host, port = peer.url.removeprefix("ws://").rsplit(":", 1)
        for _ in range(300):
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(b"GET /asyncdb HTTP/1.1\r\nHost: x\r\n")  # never finished
            junk.append((reader, writer))
        async with asyncdb.Node("legit", ask_timeout=20) as node:
            channel = await asyncio.wait_for(ws.connect(peer.url, SECRET, node.id), 30)
            node.connect(channel.peer, channel)
            ping = await node.ref("guarded", "_system").ask({"op": "ping"})
            assert ping["node"] == "guarded"
        # Every junk connection is closed by the server: pushed out, or timed out.
        await asyncio.wait_for(asyncio.gather(*(r.read() for r, _w in junk)), 60)
        assert peer.proc.poll() is None
    finally:
        for _reader, writer in junk:
            writer.close()
        peer.stop()
    assert "dropped a connection" in peer.errors and "Too many open files" not in peer.errors


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
    short.chmod(0o600)
    out = subprocess.run([sys.executable, "-m", "asyncdb", "serve", "--listen", "127.0.0.1:0",
                          "--secret-file", str(short)], capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 1 and "at least 16 bytes" in out.stderr
    shared = secret_file(tmp_path)
    shared.chmod(0o640)  # readable by the group: refused, as ssh refuses such keys
    out = subprocess.run([sys.executable, "-m", "asyncdb", "serve", "--listen", "127.0.0.1:0",
                          "--secret-file", str(shared)], capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 1 and "chmod 600" in out.stderr and "0640" in out.stderr
    out = subprocess.run([sys.executable, "-m", "asyncdb", "serve", "--listen", "nope",
                          "--secret-file", str(short)], capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 1


def test_secret_is_not_guessable():
    assert wsauth.proof(SECRET, "client", "c", "n", "x") != wsauth.proof(
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


@pytest.fixture
def busy_peer(tmp_path):
    """An `asyncdb serve` process that can run `tests.Busy`, which blocks its loop."""
    peer = Serve(tmp_path, "busy", "--import", "busy_actor",
                 env={"PYTHONPATH": str(Path(__file__).parent)})
    yield peer
    peer.stop()


async def _busy_actor(node, peer):
    """A channel to `peer` with a half-second deadline, and a `tests.Busy` there."""
    channel = await ws.connect(peer.url, SECRET, node.id, heartbeat=0.5)
    node.connect(channel.peer, channel)
    return channel, await node.spawn("tests.Busy", node="busy")


async def test_a_peer_busy_past_the_deadline_is_not_taken_for_frozen(busy_peer):
    """Its event loop blocked for four deadlines: the pulse thread still answers, so
    the channel stays open and the answer comes."""
    async with asyncdb.Node("driver", ask_timeout=60) as node:
        channel, busy = await _busy_actor(node, busy_peer)
        assert await busy.ask(2.0) == 2.0
        assert not channel.closed and "busy" in node.peers()


async def test_a_frozen_peer_is_lost_after_the_deadline(busy_peer):
    async with asyncdb.Node("driver", ask_timeout=60) as node:
        _channel, busy = await _busy_actor(node, busy_peer)
        frozen = time.monotonic()
        os.kill(busy_peer.proc.pid, signal.SIGSTOP)
        try:
            with pytest.raises(asyncdb.ChannelClosed, match="nothing heard from busy"):
                await busy.ask(0.0)
            assert time.monotonic() - frozen >= 0.4  # the deadline, not before
        finally:
            os.kill(busy_peer.proc.pid, signal.SIGCONT)


@pytest.mark.parametrize("pulse", ["no UDP socket", "thread stopped"])
async def test_without_a_pulse_thread_the_loop_holds_the_deadline(busy_peer, monkeypatch,
                                                                  pulse):
    """No UDP socket to be had here, or a pulse thread that stopped: websocket traffic
    alone, judged on the loop, still finds a frozen peer."""
    from asyncdb.transport.pulse import Pulse

    stopped = Pulse("127.0.0.1")
    stopped.close()

    def acquire() -> Pulse:
        if pulse == "no UDP socket":
            raise OSError("no UDP here")
        return stopped

    monkeypatch.setattr(Pulse, "acquire", acquire)
    async with asyncdb.Node("driver", ask_timeout=60) as node:
        _channel, busy = await _busy_actor(node, busy_peer)
        os.kill(busy_peer.proc.pid, signal.SIGSTOP)
        try:
            with pytest.raises(asyncdb.ChannelClosed, match="nothing heard from busy"):
                await busy.ask(0.0)
        finally:
            os.kill(busy_peer.proc.pid, signal.SIGCONT)
