from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys

import pytest
from aiohttp import ClientSession
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

import asyncdb
from asyncdb import metrics
from asyncdb.errors import ConfigError
from asyncdb.models import MLP

SECRET = b"metrics-test-secret-0123456789"


def samples(text: str) -> dict[str, float]:
    return {s.name + (f"{{le={s.labels['le']}}}" if "le" in s.labels else ""): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


@pytest.mark.parametrize(("text", "address"), [
    ("9100", ("127.0.0.1", 9100)), (":9100", ("127.0.0.1", 9100)),
    ("0.0.0.0:80", ("0.0.0.0", 80)), ("[::1]:5", ("::1", 5)), ("myhost", ("myhost", 0))])
def test_addresses_default_to_loopback(text, address):
    assert metrics.parse_address(text) == address


@pytest.mark.parametrize("text", ["host:port", "1:99999", "a:-1"])
def test_bad_addresses_fail_clearly(text):
    with pytest.raises(ConfigError, match="HOST:PORT"):
        metrics.parse_address(text)


async def test_node_figures_read_the_actors_on_a_node():
    data = asyncdb.datasets.load("digits")
    seen: list[dict[str, float]] = []
    async with asyncdb.Cluster.inproc(shards=2, replicas=2) as cluster:
        reg = metrics.registry(metrics.NodeFigures(cluster.node))

        def scrape(entry) -> None:  # in the event loop, between messages
            seen.append(samples(metrics.exposition(reg).decode()))

        run = await cluster.train(MLP([64, 16, 10]), data, epochs=3, eval_every=0.01,
                                  on_progress=scrape)
    during = seen[-2]  # the last evaluation before the final one
    assert during["asyncdb_replicas_alive"] == 2
    assert 0 < during["asyncdb_examples_total"] <= run.final["examples"]
    assert during["asyncdb_shard_updates_total"] > 0
    assert during["asyncdb_fetches_total"] > 0 and during["asyncdb_pushes_total"] > 0
    assert during["asyncdb_update_seconds_count"] == during["asyncdb_shard_updates_total"]
    assert during["asyncdb_rejected_pushes_total"] == 0
    assert all(s["asyncdb_examples_per_second"] >= 0 for s in seen)
    assert not any(name.startswith("asyncdb_") for name in REGISTRY._names_to_collectors)


def _serve(*extra: str) -> tuple[subprocess.Popen[str], list[str]]:
    proc = subprocess.Popen([sys.executable, "-m", "asyncdb", "serve", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    return proc, [proc.stdout.readline(), proc.stdout.readline()]


@pytest.mark.slow
async def test_serve_exposes_metrics_apart_from_the_websocket_listener(tmp_path):
    secret = tmp_path / "secret"
    secret.write_bytes(SECRET)
    secret.chmod(0o600)  # serve refuses secret files others may read
    proc, lines = await asyncio.to_thread(
        _serve, "--listen", "127.0.0.1:0", "--secret-file", str(secret), "--metrics", "0")
    try:
        ws_url = re.search(r"ws://127\.0\.0\.1:\d+", lines[0]).group(0)
        metrics_url = re.search(r"http://127\.0\.0\.1:\d+/metrics", lines[1]).group(0)
        assert ws_url.rsplit(":", 1)[1] not in metrics_url
        first = asyncio.Event()
        data = asyncdb.datasets.load("digits")
        async with asyncdb.Cluster.connect([ws_url], SECRET, shards=1, replicas=1) as cluster:
            training = asyncio.ensure_future(cluster.train(
                MLP([64, 64, 10]), data, epochs=40, eval_every=0.05,
                on_progress=lambda entry: entry["examples"] and first.set()))
            await asyncio.wait_for(first.wait(), 60)
            where = {(a["role"], a["pid"]) for a in cluster.describe()}
            async with ClientSession() as session, session.get(metrics_url) as reply:
                assert reply.status == 200
                during = samples(await reply.text())
            await training
        assert where == {("coordinator", os.getpid()), ("shard", proc.pid),
                         ("replica", proc.pid)}  # the peer reported its own pid
        assert during["asyncdb_replicas_alive"] == 1
        assert during["asyncdb_examples_total"] > 0
        assert during["asyncdb_shard_updates_total"] > 0
        assert during['asyncdb_update_seconds_bucket{le=+Inf}'] > 0
    finally:
        proc.terminate()
        proc.communicate(timeout=30)


def test_serve_refuses_a_bad_metrics_address(tmp_path):
    secret = tmp_path / "secret"
    secret.write_bytes(SECRET)
    secret.chmod(0o600)  # serve refuses secret files others may read
    out = subprocess.run([sys.executable, "-m", "asyncdb", "serve", "--listen", "127.0.0.1:0",
                          "--secret-file", str(secret), "--metrics", "here:there"],
                         capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 1 and "HOST:PORT" in out.stderr
