"""Prometheus metrics with the official prometheus-client, right across gunicorn workers (multiprocess mode).

gunicorn.conf.py points PROMETHEUS_MULTIPROC_DIR at an empty directory in the master before any worker is
forked, so every worker writes its samples to files there and a scrape of any worker sums them all. Outside
gunicorn (the flask CLI, a bare import) the variable is unset and the metrics live in the process.

GET /metrics answers the Prometheus text format to `Authorization: Bearer $GATEWAY_ADMIN_TOKEN` and 404s
when no admin token is set, like the admin API.
"""
from __future__ import annotations

import atexit
import bisect
import os
from typing import Any

from flask import Flask, Response, request
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
TTFT_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

REQUESTS = Counter("gateway_requests_total", "Requests answered, by route, model and HTTP status.",
                   ["route", "model", "status"])
UPSTREAM_LATENCY = Histogram("gateway_upstream_latency_seconds",
                             "From the credit hold to settlement: the upstream call and the relay of its answer.",
                             ["route", "model"], buckets=LATENCY_BUCKETS)
TTFT = Histogram("gateway_time_to_first_token_seconds",
                 "From the request's arrival to the first streamed event relayed to the client.", ["model"],
                 buckets=TTFT_BUCKETS)
TOKENS = Counter("gateway_tokens_total", "Tokens charged, by model and direction (in or out).", ["model", "direction"])
CREDITS = Counter("gateway_credits_charged_nano_total", "Nano-credits charged (10^-9 credit), by model.", ["model"])
OPEN_STREAMS = Gauge("gateway_open_streams", "Streams being relayed now.", multiprocess_mode="livesum")
HOLDS = Gauge("gateway_holds_in_flight", "Credit holds taken and not yet settled.", multiprocess_mode="livesum")
LIMITED = Counter("gateway_rate_limited_total", "Requests refused by the per-key rate limiter, by window.",
                  ["window"])


# The labelled children by (metric, label values). prometheus-client's labels() checks and converts its arguments
# and takes a lock on every call; five calls per settled request were about a third of the metrics' CPU. The
# children are the library's own, so a scrape sees the same series; the dict mirrors the library's own table
# of children and is cleared past CHILDREN_MAX all the same.
_children: dict[tuple, Any] = {}
CHILDREN_MAX = 10_000

# What this worker recorded since its last flush: counter and gauge children -> the amount to add; histogram
# children -> [sum, count per bucket]. In multiprocess mode every inc() is a lock, a getpid() and a write into
# the worker's mmap'd file: about 7 us each inside a request, eight per settled request. Added up here instead
# and written once per series every FLUSH_SECONDS (and before this worker answers a scrape, and at exit), so a
# scrape shows another worker's counts at most FLUSH_SECONDS late; a worker killed with SIGKILL loses at most
# its last FLUSH_SECONDS of counts.
FLUSH_SECONDS = 1.0
_adds: dict[Any, float] = {}
_observed: dict[Any, list] = {}
_flushing: list[bool] = [False]  # whether this process's flusher greenlet runs (reset in a forked child)
_hooks: list[bool] = [False]


def _child(metric: Any, *labels: str) -> Any:
    key = (metric, *labels)
    child = _children.get(key)
    if child is None:
        if len(_children) >= CHILDREN_MAX:
            _children.clear()
        child = _children[key] = metric.labels(*labels)
    return child


def _add(child: Any, amount: float) -> None:
    _adds[child] = _adds.get(child, 0) + amount
    if not _flushing[0]:
        _start_flusher()


def _observe(child: Any, bounds: tuple[float, ...], value: float) -> None:
    pending = _observed.get(child)
    if pending is None:
        pending = _observed[child] = [0.0] + [0] * (len(bounds) + 1)  # the last bucket is +Inf
    pending[0] += value
    pending[1 + bisect.bisect_left(bounds, value)] += 1  # the first bucket whose bound is >= value, as observe()
    if not _flushing[0]:
        _start_flusher()


def _forked() -> None:
    """In a forked child: the parent's pending counts and flusher are the parent's."""
    _adds.clear()
    _observed.clear()
    _flushing[0] = False


def _start_flusher() -> None:
    """At this process's first record, not at import (importing the app has no side effects)."""
    import gevent  # here: billing (so this module) is imported in gunicorn's master before gevent patches

    if not gevent.get_hub().main_hub:
        # A greenlet spawned here would belong to this thread's own hub (a real thread of the database or
        # admin pools, or a test's), which may never run again: the counts wait for the main thread's next one.
        return
    if not _hooks[0]:  # both are inherited by forked children: once per process tree is enough
        _hooks[0] = True
        os.register_at_fork(after_in_child=_forked)
        atexit.register(flush)
    _flushing[0] = True

    def loop() -> None:
        while True:
            gevent.sleep(FLUSH_SECONDS)
            flush()
    gevent.spawn(loop)


def flush() -> None:
    """Write what this worker recorded since the last flush into the library's values (its mmap'd file)."""
    global _adds, _observed
    adds, observed = _adds, _observed
    _adds, _observed = {}, {}
    for child, amount in adds.items():
        if amount:
            child.inc(amount)
    for child, (total, *counts) in observed.items():
        child._sum.inc(total)  # prometheus-client 0.26's Histogram: _sum and one value per bucket
        for bucket, count in zip(child._buckets, counts, strict=True):
            if count:
                bucket.inc(count)


def hold_taken() -> None:
    _add(HOLDS, 1)


def hold_ended() -> None:
    _add(HOLDS, -1)


def record_request(route: str, model: str, status: int) -> None:
    _add(_child(REQUESTS, route, model or "-", str(status)), 1)


def record_settlement(route: str, model: str, seconds: float, prompt: int, completion: int, nano: int) -> None:
    _observe(_child(UPSTREAM_LATENCY, route, model or "-"), LATENCY_BUCKETS, seconds)
    if prompt:
        _add(_child(TOKENS, model, "in"), prompt)
    if completion:
        _add(_child(TOKENS, model, "out"), completion)
    if nano:
        _add(_child(CREDITS, model or "-"), nano)



def scrape() -> bytes:
    flush()
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry)
    return generate_latest()


def register(app: Flask) -> None:
    import admin  # the admin token check and its throttle

    @app.get("/metrics")
    def metrics_view() -> Response:
        admin.require_token(request)
        return Response(scrape(), mimetype=CONTENT_TYPE_LATEST)
