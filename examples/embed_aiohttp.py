"""An aiohttp web app that trains in the background and serves predictions from the
shards' current parameters while training goes on.

    python examples/embed_aiohttp.py [--host 127.0.0.1] [--port 8080] [--epochs 200]
    curl localhost:8080/status
    curl -X POST localhost:8080/predict -d '{"rows": [[0, 0, 5, 13, ...64 pixels]]}'
    open http://localhost:8080/dashboard/    (live curves; /dashboard/metrics for Prometheus)

Rows are raw pixels (0 to 16), as in the data file; the data set's preprocessing is
applied before predicting. The app listens on 127.0.0.1 unless told otherwise; a body
that is not JSON, or rows of the wrong shape, get 400.

Training runs in node processes (`Cluster.local`), so the app's event loop only routes
messages: requests are answered at once, whatever the replicas are doing.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from typing import Any

import numpy as np
from aiohttp import web

import asyncdb
from asyncdb.models import MLP

CLUSTER = web.AppKey("cluster", asyncdb.Cluster)
STATE = web.AppKey("state", dict)
DASHBOARD = web.AppKey("dashboard", asyncdb.Dashboard)


async def status(request: web.Request) -> web.Response:
    state = request.app[STATE]
    return web.json_response({"training": state["training"], "latest": state["latest"]})


async def predict(request: web.Request) -> web.Response:
    model: MLP = request.app[STATE]["model"]
    try:
        body = await request.json()
        rows = np.asarray(body["rows"], np.float32)
    except (ValueError, TypeError, KeyError):
        raise web.HTTPBadRequest(text='send JSON: {"rows": [[...], ...]}') from None
    if rows.ndim != 2 or rows.shape[1] != model.sizes[0] or not np.isfinite(rows).all():
        raise web.HTTPBadRequest(text=f"rows must be a list of {model.sizes[0]}-vectors")
    state = request.app[STATE]
    rows = state["data"].preprocessing.apply(rows)  # raw pixels, as the model was trained
    params = None
    if state["training"]:
        try:
            params = await request.app[CLUSTER].parameters()
        except asyncdb.AsyncDBError:  # the run is ending: its shards are stopping
            await state["ended"].wait()
    if params is None:
        params = state["final"]
    if params is None:
        raise web.HTTPServiceUnavailable(text="training failed; no parameters to serve")
    return web.json_response({"classes": model.predict(params, rows).tolist(),
                              "training": state["training"]})


async def training(app: web.Application, epochs: float) -> None:
    state = app[STATE]
    try:
        run = await app[CLUSTER].train(
            state["model"], state["data"], algorithm=asyncdb.Downpour(batch_size=32),
            optimizer=asyncdb.Adagrad(lr=0.05), epochs=epochs, eval_every=0.2,
            on_progress=app[DASHBOARD].chain(lambda entry: state.update(latest=entry)))
        state.update(final=run.params, latest=run.final)
    finally:
        app[DASHBOARD].finish()
        state["training"] = False
        state["ended"].set()


def make_app(epochs: float = 200, replicas: int = 1, shards: int = 1) -> web.Application:
    app = web.Application()
    data = asyncdb.datasets.load("digits")
    app[STATE] = {"training": True, "ended": asyncio.Event(), "latest": None,
                  "final": None, "data": data,
                  "model": MLP([data.n_features, 128, data.n_classes])}
    app[CLUSTER] = asyncdb.Cluster.local(shards=shards, replicas=replicas)
    app[DASHBOARD] = asyncdb.Dashboard(app[CLUSTER], title="embedded training")

    async def lifetime(app: web.Application) -> Any:
        async with app[CLUSTER]:
            task = asyncio.create_task(training(app, epochs))
            yield
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    app.cleanup_ctx.append(lifetime)
    app.router.add_get("/status", status)
    app.router.add_post("/predict", predict)
    app.add_subapp("/dashboard/", app[DASHBOARD].app())  # the dashboard's routes, mounted
    return app


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1: this host only)")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--epochs", type=float, default=200)
    args = parser.parse_args()
    web.run_app(make_app(args.epochs), host=args.host, port=args.port)
