from __future__ import annotations

import asyncio
import importlib.util
import time
from pathlib import Path

import numpy as np
from aiohttp.test_utils import TestClient, TestServer

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


async def test_multicore_downpour_example():
    run = await load("multicore_downpour").main(replicas=2, shards=1, epochs=6)
    assert run.final["test_accuracy"] > 0.9


async def test_embedded_app_answers_while_training():
    example = load("embed_aiohttp")
    app = example.make_app(epochs=400)
    async with TestClient(TestServer(app)) as client:
        rows = example.asyncdb.datasets.load("digits").x_test[:5].tolist()
        answered_during_training, slowest = 0, 0.0
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            start = time.monotonic()
            status = await (await client.get("/status")).json()
            slowest = max(slowest, time.monotonic() - start)
            reply = await client.post("/predict", json={"rows": rows})
            assert reply.status == 200
            body = await reply.json()
            assert len(body["classes"]) == 5
            answered_during_training += body["training"]
            if not status["training"]:
                break
            await asyncio.sleep(0.05)
        assert answered_during_training >= 3
        assert slowest < 0.5  # the event loop was never blocked by training
        bad = await client.post("/predict", json={"rows": [[1, 2, 3]]})
        assert bad.status == 400
        final = await (await client.get("/status")).json()
        assert not final["training"]
        assert final["latest"]["test_accuracy"] > 0.9
        assert np.isfinite(final["latest"]["loss"])


def test_multihost_example():
    run = load("multihost").main(epochs=8)
    assert run.final["test_accuracy"] > 0.9
    assert run.final["replicas"] == 2
