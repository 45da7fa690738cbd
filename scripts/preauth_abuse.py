"""Unauthenticated abuse of an `asyncdb serve` node, measured (not a test).

Starts a serve node on a loopback port and, as nobody in particular, with no secret:

1. `frames`: 100 connections each announce a text message just under the old 4 MiB
   message limit in the handshake and send all of it but its last byte; the serve
   node's RSS before, while they are held, and after they close;
2. `headers`: 300 connections that never finish their HTTP headers, against the node
   started with a 128-descriptor limit; how long it holds them, and how long a real
   peer takes to get in meanwhile;
3. `names`: 25 handshakes naming the peer with 4 MiB; bytes the node logged.

    python scripts/preauth_abuse.py            # prints one JSON object
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import secrets
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from asyncdb.transport import ws

OLD_LIMIT = ws.PIECE_BYTES + (64 << 10)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


class Serve:
    def __init__(self, secret_file: str, nofile: int | None = None) -> None:
        code = ("import resource, sys; "
                + (f"resource.setrlimit(resource.RLIMIT_NOFILE, ({nofile}, {nofile})); "
                   if nofile else "")
                + "from asyncdb.cli import main; sys.exit(main(sys.argv[1:]))")
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 (open as long as the node runs)
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code, "serve", "--listen", "127.0.0.1:0",
             "--secret-file", secret_file, "--name", "target"],
            stdout=subprocess.PIPE, stderr=self.log, text=True)
        assert self.proc.stdout is not None
        self.url = self.proc.stdout.readline().split()[-1]
        self.port = int(self.url.rsplit(":", 1)[1])

    def logged_bytes(self) -> int:
        self.log.seek(0, os.SEEK_END)
        return self.log.tell()

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait()
        self.log.close()


async def upgrade(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(f"GET {ws.PATH} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                 f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                 "Sec-WebSocket-Version: 13\r\n\r\n".encode())
    await reader.readuntil(b"\r\n\r\n")
    return reader, writer


def text_header(length: int) -> bytes:
    return bytes([0x81, 0x80 | 127]) + struct.pack(">Q", length) + bytes(4)  # zero mask


async def settle(pid: int, seconds: float = 3.0) -> float:
    """RSS once it stops growing (or after `seconds`)."""
    last, deadline = rss_mb(pid), time.monotonic() + seconds
    while time.monotonic() < deadline:
        await asyncio.sleep(0.25)
        now = rss_mb(pid)
        if abs(now - last) < 1:
            return now
        last = now
    return last


async def frames(secret_file: str) -> dict[str, Any]:
    server = Serve(secret_file)
    try:
        before = rss_mb(server.proc.pid)
        conns = [await upgrade(server.port) for _ in range(100)]
        body = b"x" * (OLD_LIMIT - 2)
        for _reader, writer in conns:
            writer.write(text_header(OLD_LIMIT - 1))
            writer.write(body)
            # The server may close it on the header, or stop reading.
            with contextlib.suppress(ConnectionError, TimeoutError):
                await asyncio.wait_for(writer.drain(), 5)
        held = await settle(server.proc.pid)
        alive = sum(not w.is_closing() and not r.at_eof() for r, w in conns)
        for _reader, writer in conns:
            writer.close()
        after = await settle(server.proc.pid)
        return {"rss_before_mb": round(before, 1), "rss_held_mb": round(held, 1),
                "rss_after_mb": round(after, 1), "connections_still_open": alive}
    finally:
        server.stop()


async def headers(secret_file: str, secret: bytes) -> dict[str, Any]:
    server = Serve(secret_file, nofile=128)
    conns = []
    try:
        start = time.monotonic()
        for _ in range(300):
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(b"GET /asyncdb HTTP/1.1\r\nHost: x\r\n")
            conns.append((reader, writer))
        t0 = time.monotonic()
        try:
            channel = await asyncio.wait_for(ws.connect(server.url, secret, "legit"), 120)
            peer_in = round(time.monotonic() - t0, 2)
            await channel.close()
        except (TimeoutError, OSError, Exception) as exc:
            peer_in = f"failed: {exc!r}"
        closed_at = []

        async def wait_eof(reader: asyncio.StreamReader) -> None:
            await reader.read()
            closed_at.append(time.monotonic() - start)

        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*(wait_eof(r) for r, _w in conns)), 180)
        return {"junk_connections": len(conns), "real_peer_in_s": peer_in,
                "junk_closed": len(closed_at),
                "last_junk_closed_after_s": round(max(closed_at), 1) if closed_at else None}
    finally:
        for _reader, writer in conns:
            writer.close()
        server.stop()


async def names(secret_file: str) -> dict[str, Any]:
    server = Serve(secret_file)
    try:
        before = server.logged_bytes()
        name = "n" * (4 << 20)
        hello = json.dumps({"asyncdb": 2, "node": name, "nonce": "0" * 64,
                            "proof": "0" * 64}).encode()
        for _ in range(25):
            reader, writer = await upgrade(server.port)
            writer.write(bytes([0x81, 0x80 | 127]) + struct.pack(">Q", len(hello)) + bytes(4))
            writer.write(hello)
            with contextlib.suppress(ConnectionError, TimeoutError):
                await asyncio.wait_for(writer.drain(), 5)
                await asyncio.wait_for(reader.read(), 15)
            writer.close()
        await asyncio.sleep(0.5)
        return {"attempts": 25, "name_bytes": len(name),
                "logged_bytes": server.logged_bytes() - before}
    finally:
        server.stop()


def write_secret(path: str, secret: bytes) -> str:
    Path(path).write_bytes(secret)
    os.chmod(path, 0o600)
    return path


async def main() -> dict[str, Any]:
    secret = secrets.token_hex(32).encode()
    with tempfile.TemporaryDirectory() as tmp:
        secret_file = write_secret(str(Path(tmp) / "secret"), secret)
        return {"frames": await frames(secret_file),
                "headers": await headers(secret_file, secret),
                "names": await names(secret_file)}


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main())))
