"""Websocket channels on aiohttp, for nodes on other hosts.

The frames are the same as on every transport; a frame travels as consecutive binary
websocket messages of at most `PIECE_BYTES` (large arrays as zero-copy slices), and the
receiver's `FrameDecoder` puts them back together. Compression is off.

Before any frame, both sides prove they hold the shared secret (HMAC-SHA256 over fresh
nonces from both sides and both node names): the server challenges, the client answers
and challenges back. A peer that fails is disconnected (close code 4401) and nothing it
sent is acted on. Heartbeats find a dead peer in seconds; a frame over the size limit
closes that connection with code 1009, a malformed one with 1007, each with the reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import secrets
import ssl
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
from aiohttp import web

from .base import Channel, register_transport
from .errors import AuthenticationError, ChannelClosed, DecodeError, MessageTooLarge
from .frame import DEFAULT_MAX_FRAME_BYTES, Frame, FrameDecoder, OutFrame
from .pool import BufferPool

log = logging.getLogger("asyncdb.transport.ws")

PIECE_BYTES = 4 << 20
MAX_MESSAGE_BYTES = PIECE_BYTES + (64 << 10)
DEFAULT_HEARTBEAT = 5.0
AUTH_TIMEOUT = 10.0
CLOSE_WAIT = 1.0  # how long a close waits for the peer's close frame
PATH = "/asyncdb"
CLOSE_AUTH = 4401
CLOSE_TOO_BIG = 1009
CLOSE_INVALID = 1007

Socket = web.WebSocketResponse | aiohttp.ClientWebSocketResponse


def _proof(secret: bytes, role: str, challenge: str, nonce: str, node: str) -> str:
    text = f"asyncdb-v1|{role}|{challenge}|{nonce}|{node}".encode()
    return hmac.new(secret, text, hashlib.sha256).hexdigest()


class WsChannel(Channel):
    """One end of an authenticated websocket; `peer` is the other side's node name."""

    scheme = "ws"

    def __init__(self, ws: Socket, peer: str,
                 max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
                 on_close: Callable[[], Awaitable[None]] | None = None) -> None:
        self.ws = ws
        self.peer = peer
        self.max_frame_bytes = max_frame_bytes
        self._decoder = FrameDecoder(max_frame_bytes, BufferPool())
        self._inbox: deque[Frame] = deque()
        self._send_lock = asyncio.Lock()
        self._closed = False
        self._reason = ""
        self._on_close = on_close
        self._done = asyncio.get_running_loop().create_future()

    @property
    def closed(self) -> bool:
        return self._closed or self.ws.closed

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
                    # aiohttp takes any bytes-like object, memoryviews included (it
                    # checks at run time); its annotation says bytes.
                    await self.ws.send_bytes(piece)  # type: ignore[arg-type]
        except (ConnectionError, RuntimeError) as exc:
            await self._finish(f"({exc})")
            raise ChannelClosed(f"websocket to {self.peer} broke: {exc}") from exc

    async def receive(self) -> Frame:
        while not self._inbox:
            if self._closed:
                raise ChannelClosed(f"websocket to {self.peer} is closed {self._reason}".rstrip())
            message = await self.ws.receive()
            if message.type == aiohttp.WSMsgType.BINARY:
                try:
                    self._inbox.extend(self._decoder.feed(message.data))
                except DecodeError as exc:
                    code = CLOSE_TOO_BIG if isinstance(exc, MessageTooLarge) else CLOSE_INVALID
                    log.warning("closing websocket from %s: %s", self.peer, exc)
                    await self._close(code, str(exc))
                    raise ChannelClosed(f"closed the websocket from {self.peer}: {exc}") from exc
            elif message.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING,
                                  aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                extra = message.extra if message.type != aiohttp.WSMsgType.ERROR else message.data
                await self._finish(f"(code {self.ws.close_code}: {extra or 'peer closed'})")
            else:
                await self._close(CLOSE_INVALID, "only binary frames are accepted")
                raise ChannelClosed(f"{self.peer} sent a {message.type.name} message")
        return self._inbox.popleft()

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
        if not self._done.done():
            self._done.set_result(None)  # first: the server's handler ends on this
        if self._on_close is not None:
            with contextlib.suppress(Exception):
                await self._on_close()


def _fields(message: aiohttp.WSMessage, *names: str) -> list[str]:
    """The named string fields of a JSON text message; AuthenticationError if absent."""
    try:
        if message.type != aiohttp.WSMsgType.TEXT:
            raise TypeError(message.type)
        data = json.loads(message.data)
        return [str(data[name]) for name in names]
    except (TypeError, KeyError, ValueError):
        raise AuthenticationError(f"expected a handshake message with {names}") from None


async def _server_handshake(ws: web.WebSocketResponse, secret: bytes, node: str) -> str:
    challenge = secrets.token_hex(32)
    await ws.send_str(json.dumps({"asyncdb": 1, "challenge": challenge, "node": node}))
    peer, nonce, proof = _fields(await ws.receive(timeout=AUTH_TIMEOUT),
                                 "node", "nonce", "proof")
    if not hmac.compare_digest(proof, _proof(secret, "client", challenge, nonce, peer)):
        raise AuthenticationError(f"peer calling itself {peer!r} failed the challenge")
    await ws.send_str(json.dumps({"proof": _proof(secret, "server", challenge, nonce, node)}))
    return peer


async def _client_handshake(ws: aiohttp.ClientWebSocketResponse, secret: bytes,
                            node: str) -> str:
    challenge, peer = _fields(await ws.receive(timeout=AUTH_TIMEOUT), "challenge", "node")
    nonce = secrets.token_hex(32)
    await ws.send_str(json.dumps({"node": node, "nonce": nonce,
                                  "proof": _proof(secret, "client", challenge, nonce, node)}))
    message = await ws.receive(timeout=AUTH_TIMEOUT)
    if message.type != aiohttp.WSMsgType.TEXT:
        raise AuthenticationError(f"server {peer!r} refused us (wrong secret?)")
    (proof,) = _fields(message, "proof")
    if not hmac.compare_digest(proof, _proof(secret, "server", challenge, nonce, peer)):
        raise AuthenticationError(f"server {peer!r} failed the challenge")
    return peer


async def connect(url: str, secret: bytes, node: str, *,
                  ssl_context: ssl.SSLContext | None = None,
                  heartbeat: float = DEFAULT_HEARTBEAT,
                  max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> WsChannel:
    """Open an authenticated channel to the node serving at `url` (ws:// or wss://)."""
    if not url.rstrip("/").endswith(PATH):
        url = url.rstrip("/") + PATH
    session = aiohttp.ClientSession()
    try:
        ws = await session.ws_connect(url, heartbeat=heartbeat, compress=0,
                                      max_msg_size=MAX_MESSAGE_BYTES,
                                      ssl=ssl_context if ssl_context is not None else True,
                                      autoping=True)
        try:
            peer = await asyncio.wait_for(_client_handshake(ws, secret, node),
                                          AUTH_TIMEOUT)
        except (AuthenticationError, TimeoutError) as exc:
            await ws.close()
            if isinstance(exc, AuthenticationError):
                raise
            raise AuthenticationError(f"no handshake from {url} in {AUTH_TIMEOUT:g} s") from exc
    except BaseException as exc:
        await session.close()
        if isinstance(exc, aiohttp.ClientError | OSError) and not isinstance(
                exc, AuthenticationError):
            raise ChannelClosed(f"cannot connect to {url}: {exc}") from exc
        raise
    return WsChannel(ws, peer, max_frame_bytes, on_close=session.close)


Accept = Callable[[str, WsChannel], Awaitable[None]]


def make_app(secret: bytes, node: str, on_channel: Accept, *,
             heartbeat: float = DEFAULT_HEARTBEAT,
             max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> web.Application:
    """An aiohttp app accepting authenticated peers at PATH; `on_channel(peer, channel)`
    is called for each and the connection lives until the channel closes."""

    async def handler(request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(heartbeat=heartbeat, compress=False,
                                   max_msg_size=MAX_MESSAGE_BYTES)
        await ws.prepare(request)
        try:
            peer = await asyncio.wait_for(_server_handshake(ws, secret, node), AUTH_TIMEOUT)
        except (AuthenticationError, TimeoutError, asyncio.CancelledError) as exc:
            log.warning("refused %s: %s", request.remote,
                        exc if str(exc) else "no answer to the challenge")
            await ws.close(code=CLOSE_AUTH, message=b"authentication failed")
            return ws
        channel = WsChannel(ws, peer, max_frame_bytes)
        await on_channel(peer, channel)
        await channel.wait_closed()
        return ws

    app = web.Application()
    app.router.add_get(PATH, handler)
    return app


async def listen(host: str, port: int, secret: bytes, node: str, on_channel: Accept, *,
                 ssl_context: ssl.SSLContext | None = None, **options: Any) -> web.AppRunner:
    """Serve `make_app` on host:port; returns the runner (`await runner.cleanup()`)."""
    runner = web.AppRunner(make_app(secret, node, on_channel, **options),
                           handle_signals=False, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, ssl_context=ssl_context)
    await site.start()
    return runner


def bound_port(runner: web.AppRunner) -> int:
    """The port a runner listens on (after binding port 0)."""
    for site in runner.sites:
        server = getattr(site, "_server", None)
        for sock in getattr(server, "sockets", None) or []:
            return int(sock.getsockname()[1])
    raise RuntimeError("runner is not listening")


async def ws_pair(max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
                  heartbeat: float = DEFAULT_HEARTBEAT) -> tuple[WsChannel, WsChannel]:
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
