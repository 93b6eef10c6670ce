"""Every Prometheus metric the gateway exports, declared once with fixed, bounded labels.

Label values come only from fixed sets (transport, outcome, route template, status class,
frame type, error code from the error table) or from settings (provider names). Nothing here
is created per request, and nothing is recorded per chunk: a stream counts its chunks in a
local variable and records everything once, when it ends.

Counters and histograms export no `_created` series (one per labelled child, doubling the
output for nothing most dashboards use) unless `PROMETHEUS_DISABLE_CREATED_SERIES=false` asks
for them.

With several workers (`tokenrelay serve --workers N`), the `serve` command points
`PROMETHEUS_MULTIPROC_DIR` at a fresh directory and `/metrics` aggregates every worker's files.
"""

from __future__ import annotations

import functools
import gc
import os
import time
from typing import Any, Literal, TypeVar

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

if os.environ.get("PROMETHEUS_DISABLE_CREATED_SERIES", "").lower() not in ("false", "0", "f"):
    disable_created_metrics()  # type: ignore[no-untyped-call]

MetricT = TypeVar("MetricT", Counter, Gauge, Histogram)


@functools.cache
def child(metric: MetricT, *labels: str) -> MetricT:
    """`metric.labels(*labels)`, looked up once: `labels()` takes a lock and checks its
    arguments on every call, several times per request. The cache stays as small as the label
    sets are (bounded, see above)."""
    found: Any = metric.labels(*labels)
    return found  # type: ignore[no-any-return]


Transport = Literal["rest", "sse", "ws"]
Outcome = Literal["completed", "cancelled", "client_disconnected", "abandoned", "error", "timeout"]
TRANSPORTS: tuple[Transport, ...] = ("rest", "sse", "ws")
OUTCOMES: tuple[Outcome, ...] = (
    "completed",
    "cancelled",
    "client_disconnected",
    "abandoned",
    "error",
    "timeout",
)

# Route templates: every route is a fixed path, so a dict lookup names it; anything else
# (static files, unknown paths) folds into a bounded label.
ROUTES = frozenset(
    {
        "/api/chat/completions",
        "/api/models",
        "/api/models/categories",
        "/api/openapi.json",
        "/api/responses",
        "/api/v1/messages",
        "/api/v1/messages/count_tokens",
        "/api/v1/models",
        "/api/ws",
        "/healthz",
        "/readyz",
        "/metrics",
    }
)
# WebSocket frame types, both directions; anything else is counted as "invalid".
FRAME_TYPES = frozenset(
    {
        "chat.start",
        "chat.cancel",
        "chat.resume",
        "chat.started",
        "ping",
        "chat.delta",
        "chat.done",
        "chat.error",
        "error",
        "pong",
        "cancel.ignored",
        "invalid",
    }
)

# Which cap refused a stream: the process's own, or the principal's (a key, or an address).
REFUSALS = ("max_streams", "streams_per_key", "streams_per_address")

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
CANCEL_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1)

HTTP_REQUESTS = Counter(
    "tokenrelay_http_requests_total",
    "HTTP requests by route template, method and status class.",
    ["route", "method", "status"],
)
HTTP_DURATION = Histogram(
    "tokenrelay_http_request_duration_seconds",
    "HTTP request duration (for a stream: until its last byte) by route template and method.",
    ["route", "method"],
    buckets=DURATION_BUCKETS,
)
STREAM_TTFT = Histogram(
    "tokenrelay_stream_ttft_seconds",
    "Time from a request's arrival at the gateway to its first token written to the client.",
    ["transport", "provider"],
    buckets=LATENCY_BUCKETS,
)
STREAM_DURATION = Histogram(
    "tokenrelay_stream_duration_seconds",
    "Stream duration from arrival to its end, by outcome.",
    ["transport", "provider", "outcome"],
    buckets=DURATION_BUCKETS,
)
STREAMS = Counter(
    "tokenrelay_streams_total",
    "Streams that ended, by outcome.",
    ["transport", "provider", "outcome"],
)
STREAMS_ACTIVE = Gauge(
    "tokenrelay_streams_active",
    "Streams in flight now.",
    ["transport"],
    multiprocess_mode="livesum",
)
STREAMS_REFUSED = Counter(
    "tokenrelay_streams_refused_total",
    "Streams refused before they started, by the cap that refused them.",
    ["reason"],
)
CHUNKS = Counter(
    "tokenrelay_stream_chunks_total",
    "Deltas relayed to clients.",
    ["transport", "provider"],
)
TOKENS = Counter(
    "tokenrelay_tokens_total",
    "Tokens of streams that ended, as reported by the upstream or counted.",
    ["transport", "provider", "kind"],
)
CANCEL_PROPAGATION = Histogram(
    "tokenrelay_cancel_propagation_seconds",
    "Time from a cancel (client chat.cancel or disconnect) to the upstream response closed.",
    ["transport"],
    buckets=CANCEL_BUCKETS,
)
UPSTREAM_ERRORS = Counter(
    "tokenrelay_upstream_errors_total",
    "Upstream failures by provider and error code.",
    ["provider", "code"],
)
CACHE_OPERATIONS = Counter(
    "tokenrelay_cache_operations_total",
    "Cache operations by backend, use (completions, catalog), operation and result "
    "(hit, miss, stored, error).",
    ["backend", "use", "operation", "result"],
)
CLASSIFIER_CALLS = Counter(
    "tokenrelay_classifier_calls_total",
    "Calls to the model classifier by method and status code.",
    ["method", "code"],
)
GC_PAUSE = Histogram(
    "tokenrelay_gc_pause_seconds",
    "Time the cycle collector held the process (its event loop with it), by generation.",
    ["generation"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
)
CLASSIFIER_LATENCY = Histogram(
    "tokenrelay_classifier_call_seconds",
    "Latency of calls to the model classifier by method.",
    ["method"],
    buckets=LATENCY_BUCKETS,
)
STREAM_RESUMES = Counter(
    "tokenrelay_stream_resumes_total",
    "Resumable streams read again, by transport and whether this replica ran the stream.",
    ["transport", "replica"],
)
STREAMS_ABANDONED = Counter(
    "tokenrelay_streams_abandoned_total",
    "Resumable streams closed because nobody came back within resume_grace.",
)
JOURNAL_WRITE_FAILURES = Counter(
    "tokenrelay_journal_write_failures_total",
    "Streams whose shared (Redis) journal lost writes: they are resumable on their replica only.",
)
JOURNAL_BYTES = Gauge(
    "tokenrelay_journal_bytes",
    "Bytes (estimated) of stream journals held in this process's memory.",
    multiprocess_mode="livesum",
)
WS_CONNECTIONS = Gauge(
    "tokenrelay_ws_connections_active",
    "Open WebSocket connections.",
    multiprocess_mode="livesum",
)
WS_FRAMES = Counter(
    "tokenrelay_ws_frames_total",
    "WebSocket frames by direction and type.",
    ["direction", "type"],
)


def route_label(path: str) -> str:
    """A bounded route label for a raw path."""
    if path in ROUTES:
        return path
    if path.startswith("/api/chat/completions/"):  # one label per resumable-stream route
        tail = "/cancel" if path.endswith("/cancel") else "/stream"
        return "/api/chat/completions/{id}" + tail
    if path.startswith("/api/responses/"):  # one label for every response id
        for tail in ("/cancel", "/input_items"):
            if path.endswith(tail):
                return "/api/responses/{id}" + tail
        return "/api/responses/{id}"
    return "other" if path.startswith("/api/") else "static"


def status_label(status: int) -> str:
    return f"{status // 100}xx"


def frame_label(kind: str) -> str:
    return kind if kind in FRAME_TYPES else "invalid"


def exposition() -> tuple[bytes, str]:
    """The text exposition of every metric, aggregated across workers when there are several."""
    registry = REGISTRY
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    return generate_latest(registry), CONTENT_TYPE_LATEST


def watch_gc() -> None:
    """Time each run of the cycle collector into `tokenrelay_gc_pause_seconds` (once per
    process). Every stream and request waits while it runs, so its pauses show in the
    latency of everything else; with nothing left in reference cycles, it seldom runs."""
    if _GC_WATCH not in gc.callbacks:
        gc.callbacks.append(_GC_WATCH)


class _GCWatch:
    __slots__ = ("_started", "_children")

    def __init__(self) -> None:
        self._started = 0.0
        self._children: dict[int, Histogram] = {}

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        paused = time.perf_counter() - self._started
        generation = info["generation"]
        found = self._children.get(generation)
        if found is None:
            found = self._children[generation] = GC_PAUSE.labels(str(generation))
        found.observe(paused)


_GC_WATCH = _GCWatch()
