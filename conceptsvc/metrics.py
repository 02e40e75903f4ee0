"""Prometheus metrics of the service, exported over HTTP (``--metrics-port``).

One :class:`ServiceMetrics` per server, on its own registry (no module-level metric objects), so
several servers can live in one test process. With several worker processes the supervisor sets
``PROMETHEUS_MULTIPROC_DIR`` before the workers start: each worker's metric values then live in
files that the supervisor's endpoint aggregates (:func:`multiprocess_registry`), so one scrape sees
the whole server. Gauges declare how they combine across workers.

What is exported (all names prefixed ``conceptsvc_``):

- ``requests_total{method,code}`` and ``request_duration_seconds{method,code}``: every RPC by
  gRPC status (auth rejections included);
- ``captions_annotated_total{source}``: captions answered, by ``engine`` or ``cache``;
- ``stream_item_errors_total{code}``: stream and batch items answered with an error status;
- ``cache_lookups_total{tier,result}``: hits and misses of the ``memory`` and ``redis`` tiers;
- ``redis_errors_total``: Redis commands that failed or timed out (each is a cache miss);
- ``redis_rejected_total``: Redis entries whose signature did not check (forged or damaged;
  each is a cache miss, and overwritten);
- ``index_concepts`` / ``index_keys``: size of the loaded index; ``index_reloads_total{result}``;
- ``inflight_requests``: RPCs being handled now; ``worker_up``: one per live worker process.
"""

from __future__ import annotations

import os
import threading
from typing import Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    start_http_server,
)
from prometheus_client import multiprocess as _multiprocess

from conceptsvc.errors import ConfigError

__all__ = [
    "ServiceMetrics",
    "mark_process_dead",
    "multiprocess_registry",
    "start_metrics_http_server",
]

_LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)


class _Children:
    """A labelled metric's children, found by their label values in one dict lookup.

    ``metric.labels(...)`` validates and stringifies the values and takes the metric's lock on
    every call; the RPC path asks for the same few children on every call (a unary Annotate
    counted ≈ 56k instructions of metrics a call under callgrind, most of it in ``labels``).
    The child for a set of values never changes, so it is looked up once and kept; label values
    here come from a fixed set (method names, status codes, cache tiers).
    """

    __slots__ = ("_children", "_metric")

    def __init__(self, metric: Any) -> None:
        self._metric = metric
        self._children: dict[tuple[str, ...], Any] = {}

    def __call__(self, *values: str) -> Any:
        child = self._children.get(values)
        if child is None:  # two threads may both get here: labels() returns the same child
            child = self._children[values] = self._metric.labels(*values)
        return child


class ServiceMetrics:
    """The service's metrics; also the cache's :class:`~conceptsvc.cache.CacheObserver`."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "conceptsvc_requests", "RPCs handled, by method and gRPC status code",
            ["method", "code"], registry=r,
        )
        self.latency = Histogram(
            "conceptsvc_request_duration_seconds", "RPC handling time, by method and status",
            ["method", "code"], buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.captions = Counter(
            "conceptsvc_captions_annotated", "Captions annotated, by where the result came from",
            ["source"], registry=r,
        )
        self.item_errors = Counter(
            "conceptsvc_stream_item_errors", "Stream and batch items answered with an error status",
            ["code"], registry=r,
        )
        self.cache = Counter(
            "conceptsvc_cache_lookups", "Cache lookups by tier and result",
            ["tier", "result"], registry=r,
        )
        self.redis_errors = Counter(
            "conceptsvc_redis_errors", "Redis commands that failed or timed out", registry=r
        )
        self.redis_rejected_entries = Counter(
            "conceptsvc_redis_rejected",
            "Redis entries whose signature did not check (forged or damaged): cache misses",
            registry=r,
        )
        self.index_concepts = Gauge(
            "conceptsvc_index_concepts", "Concepts in the loaded index",
            multiprocess_mode="livemax", registry=r,
        )
        self.index_keys = Gauge(
            "conceptsvc_index_keys", "Normalised term keys in the loaded index",
            multiprocess_mode="livemax", registry=r,
        )
        self.reloads = Counter(
            "conceptsvc_index_reloads", "Index (re)loads by result", ["result"], registry=r
        )
        self.worker_up = Gauge(
            "conceptsvc_worker_up", "1 per live server process (labelled by pid with workers)",
            multiprocess_mode="liveall", registry=r,
        )
        self.worker_up.set(1)
        self.inflight = Gauge(
            "conceptsvc_inflight_requests", "RPCs being handled",
            multiprocess_mode="livesum", registry=r,
        )
        self._requests = _Children(self.requests)
        self._latency = _Children(self.latency)
        self._captions = _Children(self.captions)
        self._item_errors = _Children(self.item_errors)
        self._cache = _Children(self.cache)

    # -- RPCs --------------------------------------------------------------------------------
    def observe_rpc(self, method: str, code: str, seconds: float) -> None:
        self._requests(method, code).inc()
        self._latency(method, code).observe(seconds)

    def captions_annotated(self, engine: int, cached: int) -> None:
        if engine:
            self._captions("engine").inc(engine)
        if cached:
            self._captions("cache").inc(cached)

    def item_error(self, code: str) -> None:
        self._item_errors(code).inc()

    # -- cache observer ------------------------------------------------------------------------
    def cache_lookups(self, tier: str, hits: int, misses: int) -> None:
        if hits:
            self._cache(tier, "hit").inc(hits)
        if misses:
            self._cache(tier, "miss").inc(misses)

    def redis_error(self) -> None:
        self.redis_errors.inc()

    def redis_rejected(self, entries: int) -> None:
        self.redis_rejected_entries.inc(entries)

    # -- index -----------------------------------------------------------------------------------
    def index_loaded(self, concepts: int, keys: int) -> None:
        self.index_concepts.set(concepts)
        self.index_keys.set(keys)
        self.reloads.labels("ok").inc()

    def index_load_failed(self) -> None:
        self.reloads.labels("error").inc()

    def value(self, name: str, labels: dict[str, str] | None = None) -> float:
        """Current value of one sample (0 when absent); for tests and the benchmark."""
        v = self.registry.get_sample_value(name, labels or {})
        return 0.0 if v is None else v


def multiprocess_registry() -> CollectorRegistry:
    """A registry that aggregates every worker's metric files (``PROMETHEUS_MULTIPROC_DIR``)."""
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        raise RuntimeError("multiprocess metrics need PROMETHEUS_MULTIPROC_DIR to be set")
    registry = CollectorRegistry()
    _multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    return registry


def mark_process_dead(pid: int) -> None:
    """Drop a finished worker's live gauges from the aggregate."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        _multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]


def start_metrics_http_server(
    port: int, host: str, registry: CollectorRegistry
) -> tuple[WSGIServer, threading.Thread, int]:
    """Serve ``/metrics`` in a daemon thread; returns the server, its thread and the bound port.
    A port that cannot be bound is a ConfigError naming the address (as the gRPC port's)."""
    try:
        server, thread = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        raise ConfigError(
            f"cannot serve metrics on {host}:{port} ({exc.strerror or exc}); is the port in "
            "use or the host wrong? (--metrics-port, --metrics-host)"
        ) from None
    return server, thread, int(server.server_address[1])
