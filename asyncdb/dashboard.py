"""A live training dashboard: an aiohttp app serving one page of curves and the
Prometheus metrics of a run.

    dashboard = Dashboard(cluster)
    url = await dashboard.start("127.0.0.1:0")     # or mount dashboard.app() yourself
    run = await cluster.train(..., on_progress=dashboard.record)
    dashboard.finish()

Routes (relative, so the app can be mounted under any prefix with
`app.add_subapp("/training/", dashboard.app())`):

    GET /                  the page (HTML, JS and CSS ship in asyncdb/dashboard_assets)
    GET /assets/{name}     its script and style sheet
    GET /api/state?since=N history entries from the N-th on, where every actor runs
                           (`Cluster.describe()`), and whether the run is done
    GET /metrics           the run's figures in the Prometheus text format
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from importlib import resources
from typing import Any

from aiohttp import web

from asyncdb.transport.ws import bound_port

from . import metrics
from .cluster import Cluster
from .errors import ConfigError

ASSETS = {"dashboard.js": "text/javascript", "dashboard.css": "text/css",
          "index.html": "text/html"}


class Dashboard:
    """Collects a run's history entries and serves them with the cluster's layout.
    `record` is an `on_progress` callback; it can be chained with others."""

    def __init__(self, cluster: Cluster | None = None, *, title: str = "asyncdb") -> None:
        self.cluster = cluster
        self.title = title
        self.history: list[dict[str, Any]] = []
        self.done = False
        self.registry = metrics.registry(self._figures)
        self._runner: web.AppRunner | None = None
        self.url: str | None = None

    def record(self, entry: dict[str, Any]) -> None:
        """Add one history entry (the coordinator's `on_progress` calls this)."""
        self.done = False
        self.history.append(_plain(entry))

    def chain(self, callback: Callable[[dict[str, Any]], None]) -> Callable[[dict[str, Any]], None]:
        """An `on_progress` callback that calls `callback`, then records the entry."""
        def both(entry: dict[str, Any]) -> None:
            callback(entry)
            self.record(entry)
        return both

    def finish(self) -> None:
        """Say the run is over: the page stops waiting for points."""
        self.done = True

    def _figures(self) -> metrics.Figures | None:
        return metrics.entry_figures(self.history[-1]) if self.history else None

    def state(self, since: int = 0) -> dict[str, Any]:
        actors = self.cluster.describe() if self.cluster is not None else []
        return {"title": self.title, "done": self.done, "count": len(self.history),
                "since": since, "entries": self.history[since:], "actors": actors}

    def app(self) -> web.Application:
        """The dashboard's routes as an aiohttp app, to serve or to mount."""
        app = web.Application()
        app.router.add_get("/", self._index)
        app.router.add_get("/assets/{name}", self._asset)
        app.router.add_get("/api/state", self._state)
        app.router.add_get("/metrics", self._metrics)
        return app

    async def start(self, listen: str = "127.0.0.1:0") -> str:
        """Serve the dashboard on HOST:PORT (loopback and a free port unless told);
        return its URL."""
        if self._runner is not None:
            raise ConfigError("the dashboard is already serving")
        host, port = metrics.parse_address(listen)
        runner = web.AppRunner(self.app(), access_log=None)
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port).start()
        except OSError as exc:
            await runner.cleanup()
            raise ConfigError(f"cannot serve the dashboard on {host}:{port}: {exc}") from exc
        self._runner = runner
        shown = f"[{host}]" if ":" in host else host
        self.url = f"http://{shown}:{bound_port(runner)}/"
        return self.url

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> Dashboard:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _index(self, request: web.Request) -> web.Response:
        return _asset_response("index.html")

    async def _asset(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in ASSETS:
            raise web.HTTPNotFound(text=f"no asset {name!r}")
        return _asset_response(name)

    async def _state(self, request: web.Request) -> web.Response:
        try:
            since = int(request.query.get("since", "0"))
        except ValueError:
            raise web.HTTPBadRequest(text="since must be a whole number") from None
        if since < 0:
            raise web.HTTPBadRequest(text="since cannot be negative")
        return web.Response(text=json.dumps(self.state(since)),
                            content_type="application/json")

    async def _metrics(self, request: web.Request) -> web.Response:
        return metrics.metrics_response(self.registry)


def _asset_response(name: str) -> web.Response:
    body = resources.files("asyncdb").joinpath("dashboard_assets", name).read_bytes()
    response = web.Response(body=body, content_type=ASSETS[name])
    response.headers["Cache-Control"] = "no-cache"
    return response


def _plain(value: Any) -> Any:
    """A JSON-safe copy: NaN and infinities become None."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
