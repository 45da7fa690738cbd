from __future__ import annotations

import asyncio
import importlib.util
from pathlib import Path

import numpy as np
import pytest
from aiohttp.test_utils import TestClient, TestServer

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
async def test_multicore_downpour_example():
    run = await load("multicore_downpour").main(replicas=2, shards=1, epochs=6)
    assert run.final["test_accuracy"] > 0.9


@pytest.mark.slow
async def test_embedded_app_answers_while_training():
    example = load("embed_aiohttp")
    app = example.make_app(epochs=150)
    async with TestClient(TestServer(app)) as client:
        digits = example.asyncdb.datasets.load("digits")
        rows = (digits.x_test[:5] * 16).tolist()  # raw pixels: the app preprocesses them
        answered_during_training = 0
        points = []
        while True:  # until training ends, however long the machine's load makes it
            status = await (await client.get("/status")).json()
            reply = await client.post("/predict", json={"rows": rows})
            assert reply.status == 200
            body = await reply.json()
            assert len(body["classes"]) == 5
            answered_during_training += body["training"]
            mounted = await client.get("/dashboard/api/state")
            points.append((await mounted.json())["count"])
            if not status["training"]:
                break
            await asyncio.sleep(0.05)
        assert answered_during_training >= 3
        assert len(set(points)) >= 3  # the mounted dashboard's history grew while training
        state = await (await client.get("/dashboard/api/state")).json()
        assert state["done"] and state["count"] >= 3
        assert [a["role"] for a in state["actors"]] == ["coordinator", "shard", "replica"]
        assert (await client.get("/dashboard/")).status == 200
        metrics = await (await client.get("/dashboard/metrics")).text()
        assert "asyncdb_examples_total" in metrics
        bad = await client.post("/predict", json={"rows": [[1, 2, 3]]})
        assert bad.status == 400
        for body in (b"{not json", b"[1, 2]", b'{"rows": "abc"}'):
            malformed = await client.post("/predict", data=body)
            assert malformed.status == 400, body
        final = await (await client.get("/status")).json()
        assert not final["training"]
        assert final["latest"]["test_accuracy"] > 0.9
        assert np.isfinite(final["latest"]["loss"])


@pytest.mark.slow
def test_multihost_example():
    run = load("multihost").main(epochs=15)  # 8 reached 0.8997 once: asynchrony varies
    assert run.final["test_accuracy"] > 0.9
    assert run.final["replicas"] == 2
