from __future__ import annotations

import asyncio
import os
import shutil

import pytest
from aiohttp import ClientSession
from aiohttp.test_utils import TestClient, TestServer

from asyncdb import AllReplicasLost, Cluster, Dashboard, datasets
from asyncdb.errors import ConfigError
from asyncdb.models import MLP


def entry(time: float, examples: int, **extra):
    return {"time": time, "examples": examples, "examples_per_s": examples / time,
            "loss": 1.0 / time, "val_accuracy": 0.5, "staleness_mean": 1.5,
            "staleness_max": 3, "updates": examples // 10, "replicas": 2, "lost": [],
            "fetches": 7, "pushes": 9, "skipped_fetches": 1, "deferred_pushes": 2,
            "rejected": 0, "replica_examples": {"0": examples // 2, "1": examples // 2},
            "shard_updates": [examples // 20, examples // 20], **extra}


async def test_state_serves_entries_since_a_point():
    dashboard = Dashboard(title="t")
    dashboard.record(entry(1.0, 100))
    dashboard.record(entry(2.0, 300, loss=float("nan")))
    async with TestClient(TestServer(dashboard.app())) as client:
        state = await (await client.get("/api/state?since=1")).json()
        assert state["count"] == 2 and not state["done"] and state["title"] == "t"
        assert [e["examples"] for e in state["entries"]] == [300]
        assert state["entries"][0]["loss"] is None  # NaN is not JSON
        dashboard.finish()
        assert (await (await client.get("/api/state")).json())["done"]
        assert (await client.get("/api/state?since=x")).status == 400
        assert (await client.get("/api/state?since=-1")).status == 400


async def test_page_and_assets_ship_with_the_package():
    async with TestClient(TestServer(Dashboard().app())) as client:
        page = await client.get("/")
        assert page.status == 200 and "assets/dashboard.js" in await page.text()
        script = await client.get("/assets/dashboard.js")
        assert script.content_type == "text/javascript"
        assert "http" not in (await script.text()).split("\n", 3)[3]  # nothing from a CDN
        assert (await client.get("/assets/dashboard.css")).status == 200
        assert (await client.get("/assets/..%2Fdashboard.py")).status == 404


async def test_metrics_follow_the_latest_entry():
    dashboard = Dashboard()
    async with TestClient(TestServer(dashboard.app())) as client:
        empty = await (await client.get("/metrics")).text()
        assert "asyncdb_examples_total 0.0" in empty
        dashboard.record(entry(2.0, 640, update_counts=[0, 3, 1] + [0] * 9,
                               update_seconds=0.0002))
        reply = await client.get("/metrics")
        assert reply.content_type == "text/plain"
        text = await reply.text()
        for line in ("asyncdb_examples_total 640.0", "asyncdb_shard_updates_total 64.0",
                     "asyncdb_fetches_total 7.0", "asyncdb_pushes_total 9.0",
                     "asyncdb_rejected_pushes_total 0.0", "asyncdb_staleness 1.5",
                     "asyncdb_replicas_alive 2.0", "asyncdb_examples_per_second 320.0",
                     'asyncdb_update_seconds_bucket{le="3e-05"} 3.0',
                     'asyncdb_update_seconds_bucket{le="+Inf"} 4.0',
                     "asyncdb_update_seconds_count 4.0"):
            assert line in text, line


async def test_two_dashboards_keep_their_own_figures():
    a, b = Dashboard(), Dashboard()
    a.record(entry(1.0, 10))
    b.record(entry(1.0, 20))
    async with TestClient(TestServer(a.app())) as ca, TestClient(TestServer(b.app())) as cb:
        assert "asyncdb_examples_total 10.0" in await (await ca.get("/metrics")).text()
        assert "asyncdb_examples_total 20.0" in await (await cb.get("/metrics")).text()


async def test_start_binds_loopback_and_refuses_a_bad_address():
    async with Dashboard() as dashboard:
        url = await dashboard.start()
        assert url.startswith("http://127.0.0.1:")
        async with ClientSession() as session, session.get(url + "api/state") as reply:
            assert reply.status == 200
        with pytest.raises(ConfigError):
            await dashboard.start()
    with pytest.raises(ConfigError):
        await Dashboard().start("127.0.0.1:notaport")


async def test_describe_says_where_every_actor_runs():
    async with Cluster.local(shards=1, replicas=2) as cluster:
        actors = cluster.describe()
        assert [(a["role"], a["index"]) for a in actors] == [
            ("coordinator", 0), ("shard", 0), ("replica", 0), ("replica", 1)]
        assert actors[0]["pid"] == os.getpid()
        pids = {a["pid"] for a in actors[1:]}
        assert pids == {p.pid for p in cluster.nodes.processes.values()}
        assert all(a["alive"] and a["host"] for a in actors)
        lost = asyncio.Event()
        cluster.node.on_peer_lost(lambda peer, error: lost.set())
        cluster.nodes.kill(actors[2]["node"])
        await asyncio.wait_for(lost.wait(), 30)
        assert [a["alive"] for a in cluster.describe()] == [True, True, False, True]
    assert cluster.describe() == []


# -- in a real browser --------------------------------------------------------------------

def _browser() -> tuple[str, str] | None:
    browser = next(filter(None, map(shutil.which, ("chromium", "chromium-browser",
                                                    "google-chrome"))), None)
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


def _open(url: str, paths: tuple[str, str]):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = paths[0]
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1200,900"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(paths[1]))
    driver.get(url)
    return driver


def _watch_points(driver, chart: str, changes: int, timeout: float) -> list[int]:
    """The chart's point counts, each read once it differs from the one before."""
    from selenium.webdriver.support.ui import WebDriverWait

    seen = [int(driver.find_element("id", chart).get_attribute("data-points"))]
    for _ in range(changes):
        WebDriverWait(driver, timeout, poll_frequency=0.05).until(
            lambda d: int(d.find_element("id", chart).get_attribute("data-points")) != seen[-1])
        seen.append(int(driver.find_element("id", chart).get_attribute("data-points")))
    return seen


def _script(driver, script: str, until, timeout: float = 60):
    """Run `script` in the page until `until(result)` holds; return that result."""
    from selenium.webdriver.support.ui import WebDriverWait

    found = []

    def check(d) -> bool:
        found[:] = [d.execute_script(script)]
        return bool(until(found[0]))

    WebDriverWait(driver, timeout, poll_frequency=0.05).until(check)
    return found[0]


@pytest.mark.slow
async def test_a_browser_watches_the_curves_grow():
    paths = _browser()
    if paths is None:
        pytest.skip("no headless browser: apt-get install chromium chromium-driver")
    pytest.importorskip("selenium", reason="selenium is not installed (pip install selenium)")
    data = datasets.load("digits")
    async with Cluster.local(shards=1, replicas=2) as cluster, Dashboard(cluster) as dashboard:
        url = await dashboard.start()
        driver = await asyncio.to_thread(_open, url, paths)
        training = asyncio.ensure_future(cluster.train(
            MLP([64, 32, 10]), data, steps=10**7, eval_every=0.1,
            on_progress=dashboard.record, max_restarts=0))
        try:
            seen = await asyncio.to_thread(_watch_points, driver, "chart-loss", 2, 60)
            accuracy = await asyncio.to_thread(_watch_points, driver, "chart-accuracy", 2, 60)
            rows = await asyncio.to_thread(driver.execute_script, (
                "return [...document.querySelectorAll('#actors tr')].map(r => r.innerText)"))
            # with no restarts allowed the run ends when its replicas are lost; the page
            # shows them go
            replicas = [a["node"] for a in cluster.describe() if a["role"] == "replica"]
            cluster.nodes.kill(replicas[1])
            dead = await asyncio.to_thread(
                _script, driver, "return document.querySelector('#actors').innerText",
                lambda text: "no" in text.split())
            cluster.nodes.kill(replicas[0])
            with pytest.raises(AllReplicasLost):
                await training
            dashboard.finish()
            status = await asyncio.to_thread(
                _script, driver, "return document.getElementById('status').innerText",
                lambda text: "finished" in text)
        finally:
            if not training.done():
                training.cancel()
            await asyncio.to_thread(driver.quit)
    assert seen[0] < seen[1] < seen[2], seen
    assert accuracy[0] < accuracy[1] < accuracy[2], accuracy
    assert len(rows) == 1 + 1 + 1 + 2  # the header, coordinator, one shard, two replicas
    assert str(os.getpid()) in rows[1]
    assert replicas[1] in dead
    assert "finished" in status
