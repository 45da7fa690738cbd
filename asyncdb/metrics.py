"""Training figures in the Prometheus text format (prometheus_client).

Each run or node gets its own `CollectorRegistry` holding one `FiguresCollector`, which
reads the latest figures when scraped: the cumulative counts the shards and replicas keep
become counters, the current state gauges, and the shards' update times a histogram.
Nothing is registered in prometheus_client's global default registry, so many clusters
can live in one process.

    asyncdb_examples_total             examples trained on, all replicas
    asyncdb_shard_updates_total        gradient pushes applied by the shards
    asyncdb_fetches_total              parameter fetches by the replicas
    asyncdb_pushes_total               gradient pushes by the replicas
    asyncdb_rejected_pushes_total      pushes a shard refused (bad shape, NaN, ...)
    asyncdb_skipped_fetches_total      fetches a rate limit skipped
    asyncdb_deferred_pushes_total      pushes a rate limit deferred
    asyncdb_staleness                  mean staleness of the updates so far (versions)
    asyncdb_staleness_max              largest staleness seen
    asyncdb_replicas_alive             replicas still training
    asyncdb_examples_per_second        recent training throughput
    asyncdb_update_seconds             time a shard took to apply one update (histogram)
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry

from asyncdb.transport.ws import bound_port

from .downpour import Replica
from .errors import ConfigError
from .node import Node
from .shard import UPDATE_BUCKETS, ParameterShard

CONTENT_TYPE = CONTENT_TYPE_LATEST

COUNTERS = {
    "examples": "examples trained on, all replicas",
    "shard_updates": "gradient pushes applied by the shards",
    "fetches": "parameter fetches by the replicas",
    "pushes": "gradient pushes by the replicas",
    "rejected_pushes": "pushes a shard refused",
    "skipped_fetches": "fetches a rate limit skipped",
    "deferred_pushes": "pushes a rate limit deferred",
}
GAUGES = {
    "staleness": "mean staleness of the updates so far, in versions",
    "staleness_max": "largest staleness seen, in versions",
    "replicas_alive": "replicas still training",
    "examples_per_second": "recent training throughput, examples/s",
}


@dataclass
class Figures:
    """One snapshot of what a run (or a node's actors) has done so far."""

    examples: int = 0
    shard_updates: int = 0
    fetches: int = 0
    pushes: int = 0
    rejected_pushes: int = 0
    skipped_fetches: int = 0
    deferred_pushes: int = 0
    staleness: float = 0.0
    staleness_max: float = 0.0
    replicas_alive: int = 0
    examples_per_second: float = 0.0
    update_counts: list[int] = field(default_factory=lambda: [0] * (len(UPDATE_BUCKETS) + 1))
    update_seconds: float = 0.0


def entry_figures(entry: Mapping[str, Any]) -> Figures:
    """The figures in one of the coordinator's history entries."""
    counts = entry.get("update_counts")
    return Figures(
        examples=int(entry.get("examples", 0)),
        shard_updates=int(entry.get("updates", 0)),
        fetches=int(entry.get("fetches", 0)),
        pushes=int(entry.get("pushes", 0)),
        rejected_pushes=int(entry.get("rejected", 0)),
        skipped_fetches=int(entry.get("skipped_fetches", 0)),
        deferred_pushes=int(entry.get("deferred_pushes", 0)),
        staleness=float(entry.get("staleness_mean", 0.0)),
        staleness_max=float(entry.get("staleness_max", 0)),
        replicas_alive=int(entry.get("replicas", 0)),
        examples_per_second=float(entry.get("examples_per_s", 0.0)),
        update_counts=list(counts) if counts else Figures().update_counts,
        update_seconds=float(entry.get("update_seconds", 0.0)),
    )


class NodeFigures:
    """Figures of the shards and replicas living on one node (`asyncdb serve`), read
    from the actors themselves; examples/s is the rate since the previous reading."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self._last: tuple[float, int] | None = None

    def __call__(self) -> Figures:
        figures = Figures()
        staleness_sum = 0.0
        for name in self.node.actors():
            actor = self.node.actor(name)
            if isinstance(actor, ParameterShard):
                _add_shard(figures, actor)
                staleness_sum += actor.staleness_sum
            elif isinstance(actor, Replica):
                _add_replica(figures, actor)
        if figures.shard_updates:
            figures.staleness = staleness_sum / figures.shard_updates
        now = time.monotonic()
        if self._last is not None and now > self._last[0]:
            figures.examples_per_second = max(
                0.0, (figures.examples - self._last[1]) / (now - self._last[0]))
        self._last = (now, figures.examples)
        return figures


def _add_shard(figures: Figures, shard: ParameterShard) -> None:
    figures.shard_updates += shard.version
    figures.rejected_pushes += shard.rejected
    figures.staleness_max = max(figures.staleness_max, shard.staleness_max)
    figures.update_seconds += shard.update_seconds
    figures.update_counts = [a + b for a, b in zip(figures.update_counts,
                                                   shard.update_counts, strict=True)]


def _add_replica(figures: Figures, replica: Replica) -> None:
    counts = replica.counts
    figures.examples += counts["examples"]
    figures.fetches += counts["fetches"]
    figures.pushes += counts["pushes"]
    figures.skipped_fetches += counts["skipped_fetches"]
    figures.deferred_pushes += counts["deferred_pushes"]
    figures.replicas_alive += 1


class FiguresCollector(Collector):
    """Turns the figures `source` returns (None: nothing yet) into metric families."""

    def __init__(self, source: Callable[[], Figures | None]) -> None:
        self.source = source

    def collect(self) -> Iterator[Metric]:
        figures = self.source() or Figures()
        for name, doc in COUNTERS.items():
            yield CounterMetricFamily(f"asyncdb_{name}", doc, value=getattr(figures, name))
        for name, doc in GAUGES.items():
            yield GaugeMetricFamily(f"asyncdb_{name}", doc, value=getattr(figures, name))
        cumulative, buckets = 0, []
        for bound, count in zip([*UPDATE_BUCKETS, float("inf")], figures.update_counts,
                                strict=True):
            cumulative += count
            buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
        yield HistogramMetricFamily("asyncdb_update_seconds",
                                    "time a shard took to apply one update",
                                    buckets=buckets, sum_value=figures.update_seconds)


def registry(source: Callable[[], Figures | None]) -> CollectorRegistry:
    """A registry of its own (never the global default) exposing `source`'s figures."""
    reg = CollectorRegistry(auto_describe=True)
    reg.register(FiguresCollector(source))
    return reg


def exposition(reg: CollectorRegistry) -> bytes:
    """The Prometheus text format of everything in `reg`."""
    return generate_latest(reg)


def parse_address(text: str, default_host: str = "127.0.0.1") -> tuple[str, int]:
    """'HOST:PORT', ':PORT', 'PORT' or 'HOST' (port 0: a free one); loopback unless told."""
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = ("", text) if text.isdigit() else (text, "0")
    if not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"want HOST:PORT, got {text!r}")
    return host.strip("[]") or default_host, int(port)


async def serve_metrics(listen: str, reg: CollectorRegistry) -> tuple[web.AppRunner, str]:
    """Serve `reg` at http://HOST:PORT/metrics on a listener of its own; return the
    runner (clean it up to stop) and the URL."""
    host, port = parse_address(listen)

    async def metrics(request: web.Request) -> web.Response:
        return metrics_response(reg)

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise ConfigError(f"cannot serve metrics on {host}:{port}: {exc}") from exc
    return runner, f"http://{_url_host(host)}:{bound_port(runner)}/metrics"


def metrics_response(reg: CollectorRegistry) -> web.Response:
    response = web.Response(body=exposition(reg))
    response.headers["Content-Type"] = CONTENT_TYPE
    return response


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
