"""Websocket channels on aiohttp, for nodes on other hosts.

The frames are the same as on every transport; a frame travels as consecutive binary
websocket messages of at most `PIECE_BYTES` (large arrays as zero-copy slices), and the
receiver's `FrameDecoder` puts them back together. Compression is off.

Before any frame, both sides prove they hold the shared secret, and after it every
message carries a keyed tag with its sequence number (`transport.wsauth`). A peer that
fails is disconnected (close code 4401; 4426 for another protocol version) and nothing
it sent is acted on. Before authentication a server holds little for anyone: messages
of at most `HANDSHAKE_BYTES`, `auth_timeout` seconds from accepting the connection to
authenticating it, at most `max_pending` such connections (a newcomer pushes the
oldest out), and what it logs of them cut short. A frame over the size limit closes
that connection with code 1009, a malformed one with 1007, each with the reason.

Liveness: a peer from which nothing came for `heartbeat` seconds (the deadline) is
lost, and the channel closes with the reason. What counts is any websocket message
(each side pings five times a deadline) and, off the event loop, the pulse thread's
UDP pings (`transport.pulse`), whose ports the two sides name in the handshake: a
peer busy in one long call still answers those, a frozen or vanished one does not.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import ssl
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.http_websocket import WebSocketReader

from . import wsauth
from .base import Channel, register_transport
from .errors import (
    AuthenticationError,
    ChannelClosed,
    DecodeError,
    MessageTooLarge,
    VersionMismatch,
)
from .frame import DEFAULT_MAX_FRAME_BYTES, Frame, FrameDecoder, OutFrame
from .pool import BufferPool
from .pulse import PINGS_PER_DEADLINE, Pulse, Watch, pulse_keys
from .wsauth import Opener, Sealer, short
from .wsgate import Gate

log = logging.getLogger("asyncdb.transport.ws")

PIECE_BYTES = 4 << 20
MAX_MESSAGE_BYTES = PIECE_BYTES + (64 << 10)
DEFAULT_HEARTBEAT = 10.0  # seconds of silence after which a peer is lost
AUTH_TIMEOUT = 10.0
DEFAULT_MAX_PENDING = 64
CLOSE_WAIT = 1.0  # how long a close waits for the peer's close frame
PATH = "/asyncdb"
CLOSE_AUTH = 4401
CLOSE_VERSION = 4426
CLOSE_TOO_BIG = 1009
CLOSE_INVALID = 1007

Socket = web.WebSocketResponse | aiohttp.ClientWebSocketResponse
Keys = tuple[bytes, bytes]  # (key of what this side sends, key of what it receives)


class WsChannel(Channel):
    """One end of an authenticated websocket; `peer` is the other side's node name."""

    scheme = "ws"

    def __init__(self, ws: Socket, peer: str, keys: Keys,
                 max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
                 on_close: Callable[[], Awaitable[None]] | None = None, *,
                 heartbeat: float | None = DEFAULT_HEARTBEAT,
                 pulse: Pulse | None = None,
                 pulse_address: tuple[str, int] | None = None) -> None:
        self.ws = ws
        self.peer = peer
        self.max_frame_bytes = max_frame_bytes
        self._sealer = Sealer(keys[0])
        self._opener = Opener(keys[1])
        self._decoder = FrameDecoder(max_frame_bytes, BufferPool())
        self._inbox: deque[Frame] = deque()
        self._send_lock = asyncio.Lock()
        self._closed = False
        self._reason = ""
        self._on_close = on_close
        self._loop = asyncio.get_running_loop()
        self._done = self._loop.create_future()
        self._pulse: Pulse | None = None
        self._watch: Watch | None = None  # when the peer was last heard from
        self._tasks: set[asyncio.Task[None]] = set()
        if heartbeat is not None:
            self._watch_liveness(keys, heartbeat, pulse, pulse_address)
        elif pulse is not None:
            pulse.release()

    @property
    def closed(self) -> bool:
        return self._closed or self.ws.closed

    # -- liveness -----------------------------------------------------------------

    def _watch_liveness(self, keys: Keys, deadline: float, pulse: Pulse | None,
                        address: tuple[str, int] | None) -> None:
        """Hand the channel to `pulse` (this channel's reference to it, released on
        close), which pings `address` if the peer named one; keep websocket pings
        going. Without a pulse thread, the loop holds websocket traffic to the deadline."""
        self._watch = Watch(self.peer, pulse_keys(keys[0], keys[1]), address, deadline,
                            self._silent_from_thread)
        if pulse is not None:
            self._pulse = pulse
            pulse.watch(self._watch)
        self._spawn(self._keep_alive(self._watch))

    def _spawn(self, coro: Any) -> None:
        task = self._loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _keep_alive(self, watch: Watch) -> None:
        """A websocket ping now and then: traffic that keeps an idle channel alive
        where UDP pulses do not get through. Without a running pulse thread, this loop
        is the judge: silence past the deadline closes the channel."""
        deadline = watch.deadline
        while not self.closed:
            await asyncio.sleep(deadline / PINGS_PER_DEADLINE)
            silent = time.monotonic() - watch.heard
            if silent > deadline and (self._pulse is None or not self._pulse.running):
                self._on_silent(f"nothing heard from {self.peer} for {silent:.1f} s "
                                f"(deadline {deadline:g} s)")
                return
            try:
                await self.ws.ping()
            except (ConnectionError, RuntimeError):
                return  # closing: the reader says why

    def _silent_from_thread(self, reason: str) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nothing to tell
            self._loop.call_soon_threadsafe(self._on_silent, reason)

    def _on_silent(self, reason: str) -> None:
        if self._closed:
            return
        log.warning("websocket to %s: %s; closing it", short(self.peer), reason)
        self._spawn(self._drop(reason))

    async def _drop(self, reason: str) -> None:
        await self._finish(f"({reason})")  # first: a pending receive raises with this
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.ws.close(code=1001, message=b"peer silent"),
                                   CLOSE_WAIT)

    def _heard(self) -> None:
        if self._watch is not None:
            self._watch.touch()

    async def wait_closed(self) -> None:
        await asyncio.shield(self._done)

    async def send(self, frame: OutFrame) -> None:
        if self.closed:
            raise ChannelClosed(f"websocket to {self.peer} is closed {self._reason}".rstrip())
        if frame.nbytes > self.max_frame_bytes:
            raise MessageTooLarge(f"frame of {frame.nbytes} bytes is over the "
                             f"{self.max_frame_bytes}-byte limit of this channel")
        try:
            async with self._send_lock:  # the pieces of one frame must not interleave
                for piece in frame.pieces(PIECE_BYTES):
                    await self.ws.send_bytes(self._sealer.seal(piece))
        except (ConnectionError, RuntimeError) as exc:
            await self._finish(f"({exc})")
            raise ChannelClosed(f"websocket to {self.peer} broke: {exc}") from exc

    async def receive(self) -> Frame:
        while not self._inbox:
            if self._closed:
                raise ChannelClosed(f"websocket to {self.peer} is closed {self._reason}".rstrip())
            message = await self.ws.receive()
            self._heard()
            if message.type == aiohttp.WSMsgType.BINARY:
                await self._take(message.data)
            elif message.type == aiohttp.WSMsgType.PING:
                with contextlib.suppress(ConnectionError, RuntimeError):
                    await self.ws.pong(message.data)
            elif message.type == aiohttp.WSMsgType.PONG:
                pass
            elif message.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING,
                                  aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                extra = message.extra if message.type != aiohttp.WSMsgType.ERROR else message.data
                await self._finish(f"(code {self.ws.close_code}: {extra or 'peer closed'})")
            else:
                await self._close(CLOSE_INVALID, "only binary frames are accepted")
                raise ChannelClosed(f"{self.peer} sent a {message.type.name} message")
        return self._inbox.popleft()

    async def _take(self, data: bytes) -> None:
        try:
            self._inbox.extend(self._decoder.feed(self._opener.open(data)))
        except (DecodeError, AuthenticationError) as exc:
            code = (CLOSE_AUTH if isinstance(exc, AuthenticationError) else
                    CLOSE_TOO_BIG if isinstance(exc, MessageTooLarge) else CLOSE_INVALID)
            log.warning("closing websocket from %s: %s", short(self.peer), exc)
            await self._close(code, str(exc))
            raise ChannelClosed(f"closed the websocket from {self.peer}: {exc}") from exc

    async def close(self) -> None:
        await self._close(1000, "bye")

    async def _close(self, code: int, reason: str) -> None:
        if not self.ws.closed:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.ws.close(code=code, message=reason.encode()[:120]),
                                       CLOSE_WAIT)
        await self._finish(f"({reason})")

    async def _finish(self, reason: str) -> None:
        if self._closed:
            return
        self._closed = True
        self._reason = reason
        if self._pulse is not None and self._watch is not None:
            self._pulse.forget(self._watch)
            self._pulse.release()
            self._pulse = None
        for task in self._tasks:
            if task is not asyncio.current_task():
                task.cancel()
        if not self._done.done():
            self._done.set_result(None)  # first: the server's handler ends on this
        if self._on_close is not None:
            with contextlib.suppress(Exception):
                await self._on_close()


async def _text(ws: Socket, timeout: float) -> str:
    message = await ws.receive(timeout=timeout)
    if message.type != aiohttp.WSMsgType.TEXT:
        raise AuthenticationError(f"the peer sent no handshake message ({message.type.name}"
                                  f"{': ' + short(message.extra, 60) if message.extra else ''})")
    return str(message.data)


async def _server_handshake(ws: web.WebSocketResponse, secret: bytes,
                            node: str) -> tuple[str, str, str, int | None]:
    """Challenge the client and check its answer; (peer, challenge, nonce, the
    client's pulse port if it named one)."""
    challenge = secrets.token_hex(32)
    await ws.send_str(json.dumps({"asyncdb": wsauth.PROTOCOL, "challenge": challenge,
                                  "node": node}))
    hello = await _text(ws, AUTH_TIMEOUT)
    peer, nonce, proof = wsauth.parse(hello, "node", "nonce", "proof", version=True)
    wsauth.check_name(peer)
    wsauth.check_nonce(nonce)
    expected = wsauth.proof(secret, "client", challenge, nonce, peer)
    if not secrets.compare_digest(proof, expected):
        raise AuthenticationError(f"peer calling itself {short(peer)!r} failed the challenge")
    return peer, challenge, nonce, wsauth.port_field(hello, "pulse")


async def _client_handshake(ws: aiohttp.ClientWebSocketResponse, secret: bytes,
                            node: str, pulse: int | None = None
                            ) -> tuple[str, Keys, int | None]:
    """Answer the server's challenge (naming our pulse port) and check its proof;
    (peer, keys, the server's pulse port if it named one)."""
    try:
        challenge, peer = wsauth.parse(await _text(ws, AUTH_TIMEOUT), "challenge", "node",
                                       version=True)
    except VersionMismatch as exc:
        await ws.close(code=CLOSE_VERSION, message=str(exc).encode()[:120])
        raise
    wsauth.check_name(peer)
    nonce = secrets.token_hex(32)
    hello = {"asyncdb": wsauth.PROTOCOL, "node": node, "nonce": nonce,
             "proof": wsauth.proof(secret, "client", challenge, nonce, node)}
    if pulse is not None:
        hello["pulse"] = str(pulse)
    await ws.send_str(json.dumps(hello))
    message = await ws.receive(timeout=AUTH_TIMEOUT)
    if message.type != aiohttp.WSMsgType.TEXT:
        if ws.close_code == CLOSE_VERSION:
            raise VersionMismatch(f"server {peer!r} refused us: {message.extra}")
        raise AuthenticationError(f"server {peer!r} refused us (wrong secret?)")
    (proof,) = wsauth.parse(message.data, "proof")
    if not secrets.compare_digest(proof, wsauth.proof(secret, "server", challenge, nonce,
                                                      peer)):
        raise AuthenticationError(f"server {peer!r} failed the challenge")
    to_server, to_client = wsauth.session_keys(secret, challenge, nonce, peer, node)
    return peer, (to_server, to_client), wsauth.port_field(message.data, "pulse")


async def connect(url: str, secret: bytes, node: str, *,
                  ssl_context: ssl.SSLContext | None = None,
                  heartbeat: float | None = DEFAULT_HEARTBEAT,
                  max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> WsChannel:
    """Open an authenticated channel to the node serving at `url` (ws:// or wss://);
    `heartbeat`: its liveness deadline in seconds (None: none)."""
    if not url.rstrip("/").endswith(PATH):
        url = url.rstrip("/") + PATH
    pulse = _acquire_pulse(heartbeat)
    session = aiohttp.ClientSession()
    try:
        ws = await session.ws_connect(url, heartbeat=None, compress=0,
                                      max_msg_size=MAX_MESSAGE_BYTES,
                                      ssl=ssl_context if ssl_context is not None else True,
                                      autoping=False)
        try:
            peer, keys, peer_pulse = await asyncio.wait_for(
                _client_handshake(ws, secret, node, None if pulse is None else pulse.port),
                AUTH_TIMEOUT)
        except (AuthenticationError, TimeoutError) as exc:
            await ws.close()
            if isinstance(exc, AuthenticationError):
                raise
            raise AuthenticationError(f"no handshake from {url} in {AUTH_TIMEOUT:g} s") from exc
        return WsChannel(ws, peer, keys, max_frame_bytes, on_close=session.close,
                         heartbeat=heartbeat, pulse=pulse,
                         pulse_address=_address(ws, peer_pulse))
    except BaseException as exc:
        await session.close()
        if pulse is not None:
            pulse.release()
        if isinstance(exc, aiohttp.ClientError | OSError) and not isinstance(
                exc, AuthenticationError):
            raise ChannelClosed(f"cannot connect to {url}: {exc}") from exc
        raise


def _acquire_pulse(heartbeat: float | None) -> Pulse | None:
    """This process's pulse thread, for a channel with a deadline (None: no deadline,
    or no UDP socket to be had, which leaves websocket traffic alone to judge)."""
    if heartbeat is None:
        return None
    try:
        return Pulse.acquire()
    except OSError as exc:
        log.warning("no pulse thread (%s): liveness rests on websocket traffic", exc)
        return None


def _address(ws: Socket, port: int | None) -> tuple[str, int] | None:
    """Where the peer's pulse thread listens: its side of this connection, that port."""
    peername = ws.get_extra_info("peername")
    if port is None or not peername:
        return None
    return str(peername[0]), port


Accept = Callable[[str, WsChannel], Awaitable[None]]


def _lift_message_limit(ws: web.WebSocketResponse, request: web.BaseRequest,
                        limit: int) -> None:
    """Give an authenticated connection the full message size: a new websocket parser
    on the same queue, set while the client waits for our proof (nothing in flight).
    aiohttp fixes the limit when the response is prepared, so this reaches into it;
    tests/test_ws.py checks both limits."""
    queue = ws._reader
    assert queue is not None  # set by prepare()
    parser = WebSocketReader(queue, limit, compress=False, decode_text=True)
    ws._parser = parser
    request.protocol._payload_parser = parser


def make_server(secret: bytes, node: str, on_channel: Accept, *,
                heartbeat: float | None = DEFAULT_HEARTBEAT,
                max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
                auth_timeout: float = AUTH_TIMEOUT,
                max_pending: int = DEFAULT_MAX_PENDING) -> Gate:
    """An aiohttp server accepting authenticated peers at PATH; `on_channel(peer,
    channel)` is called for each and the connection lives until the channel closes."""

    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        if request.path != PATH or request.method != "GET":
            return web.Response(status=404)
        ws = web.WebSocketResponse(heartbeat=None, autoping=False, compress=False,
                                   max_msg_size=wsauth.HANDSHAKE_BYTES)
        await ws.prepare(request)
        try:
            peer, challenge, nonce, peer_pulse = await asyncio.wait_for(
                _server_handshake(ws, secret, node), auth_timeout)
        except (AuthenticationError, TimeoutError, asyncio.CancelledError) as exc:
            code = CLOSE_VERSION if isinstance(exc, VersionMismatch) else CLOSE_AUTH
            gate.throttled.warning("refused %s: %s", request.remote,
                              short(exc, 200) if str(exc) else "no answer to the challenge")
            with contextlib.suppress(Exception):
                reason = str(exc) if code == CLOSE_VERSION else "authentication failed"
                await ws.close(code=code, message=reason.encode()[:120])
            return ws
        to_server, to_client = wsauth.session_keys(secret, challenge, nonce, node, peer)
        _lift_message_limit(ws, request, MAX_MESSAGE_BYTES)
        gate.admit(request.protocol)
        answer = {"proof": wsauth.proof(secret, "server", challenge, nonce, node)}
        pulse = _acquire_pulse(heartbeat)
        if pulse is not None:
            answer["pulse"] = str(pulse.port)
        try:
            await ws.send_str(json.dumps(answer))
        except BaseException:
            if pulse is not None:
                pulse.release()
            raise
        channel = WsChannel(ws, peer, (to_client, to_server), max_frame_bytes,  # send, receive
                            heartbeat=heartbeat, pulse=pulse,
                            pulse_address=_address(ws, peer_pulse))
        try:
            await on_channel(peer, channel)
            await channel.wait_closed()
        finally:  # a failed or cancelled handler lets go of the channel's pulse too
            await channel._finish("(the server let go of the connection)")
        return ws

    gate = Gate(handler, auth_timeout=auth_timeout, max_pending=max_pending,
                access_log=None, max_headers=32)
    return gate


async def listen(host: str, port: int, secret: bytes, node: str, on_channel: Accept, *,
                 ssl_context: ssl.SSLContext | None = None, **options: Any) -> web.BaseRunner:
    """Serve `make_server` on host:port; returns the runner (`await runner.cleanup()`)."""
    runner = web.ServerRunner(make_server(secret, node, on_channel, **options),
                              handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port, ssl_context=ssl_context)
    await site.start()
    return runner


def bound_port(runner: web.BaseRunner) -> int:
    """The port a runner listens on (after binding port 0)."""
    for site in runner.sites:
        server = getattr(site, "_server", None)
        for sock in getattr(server, "sockets", None) or []:
            return int(sock.getsockname()[1])
    raise RuntimeError("runner is not listening")


async def ws_pair(max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
                  heartbeat: float | None = DEFAULT_HEARTBEAT) -> tuple[WsChannel, WsChannel]:
    """Two ends of a websocket over loopback, in this process (tests, benchmarks)."""
    secret = secrets.token_bytes(32)
    accepted: asyncio.Future[WsChannel] = asyncio.get_running_loop().create_future()

    async def on_channel(peer: str, channel: WsChannel) -> None:
        accepted.set_result(channel)

    runner = await listen("127.0.0.1", 0, secret, "server", on_channel,
                          heartbeat=heartbeat, max_frame_bytes=max_frame_bytes)
    try:
        client = await connect(f"ws://127.0.0.1:{bound_port(runner)}", secret, "client",
                               heartbeat=heartbeat, max_frame_bytes=max_frame_bytes)
        server = await asyncio.wait_for(accepted, AUTH_TIMEOUT)
    except BaseException:
        await runner.cleanup()
        raise
    server._on_close = runner.cleanup
    return client, server


register_transport("ws", ws_pair)
