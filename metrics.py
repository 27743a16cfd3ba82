"""Prometheus metrics with the official prometheus-client, right across gunicorn workers (multiprocess mode).

gunicorn.conf.py points PROMETHEUS_MULTIPROC_DIR at an empty directory in the master before any worker is
forked, so every worker writes its samples to files there and a scrape of any worker sums them all. Outside
gunicorn (the flask CLI, a bare import) the variable is unset and the metrics live in the process.

GET /metrics answers the Prometheus text format to `Authorization: Bearer $GATEWAY_ADMIN_TOKEN` and 404s
when no admin token is set, like the admin API.
"""
from __future__ import annotations

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


def _child(metric: Any, *labels: str) -> Any:
    key = (metric, *labels)
    child = _children.get(key)
    if child is None:
        if len(_children) >= CHILDREN_MAX:
            _children.clear()
        child = _children[key] = metric.labels(*labels)
    return child


def record_request(route: str, model: str, status: int) -> None:
    _child(REQUESTS, route, model or "-", str(status)).inc()


def record_settlement(route: str, model: str, seconds: float, prompt: int, completion: int, nano: int) -> None:
    _child(UPSTREAM_LATENCY, route, model or "-").observe(seconds)
    if prompt:
        _child(TOKENS, model, "in").inc(prompt)
    if completion:
        _child(TOKENS, model, "out").inc(completion)
    if nano:
        _child(CREDITS, model or "-").inc(nano)


def scrape() -> bytes:
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
