"""metrics.py's batched recording: the same series and values as the library's own inc()/observe(), written at
the latest FLUSH_SECONDS after they were recorded (and at once before a scrape)."""
from __future__ import annotations

import gevent
from prometheus_client import REGISTRY, CollectorRegistry, Histogram

import metrics


def _value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_batched_counts_and_buckets_equal_the_librarys_own_observe():
    route, model = "test.batched", "m-batched"
    seconds = [0.0, 0.05, 0.0500001, 1, 2.4, 300, 301, 0.2]  # on, just past and beyond the bucket bounds
    reference = Histogram("ref_latency_seconds", "reference", buckets=metrics.LATENCY_BUCKETS,
                          registry=CollectorRegistry())
    for s in seconds:
        reference.observe(s)
        metrics.record_settlement(route, model, s, 3, 5, 7)
        metrics.record_request(route, model, 200)
    assert _value("gateway_requests_total", route=route, model=model, status="200") == 0  # not written yet
    metrics.flush()
    for bound in [*metrics.LATENCY_BUCKETS, float("inf")]:
        le = "+Inf" if bound == float("inf") else str(float(bound))
        expected = reference.collect()[0]
        want = next(s.value for s in expected.samples if s.name.endswith("_bucket") and s.labels["le"] == le)
        assert _value("gateway_upstream_latency_seconds_bucket", route=route, model=model, le=le) == want
    assert _value("gateway_upstream_latency_seconds_sum", route=route, model=model) == sum(seconds)
    assert _value("gateway_upstream_latency_seconds_count", route=route, model=model) == len(seconds)
    assert _value("gateway_requests_total", route=route, model=model, status="200") == len(seconds)
    assert _value("gateway_tokens_total", model=model, direction="in") == 3 * len(seconds)
    assert _value("gateway_tokens_total", model=model, direction="out") == 5 * len(seconds)
    assert _value("gateway_credits_charged_nano_total", model=model) == 7 * len(seconds)


def test_the_flusher_writes_within_flush_seconds_and_holds_net_out():
    metrics.flush()  # what earlier tests in this process recorded is written, not counted into this test's change
    before = _value("gateway_holds_in_flight")
    metrics.hold_taken()
    metrics.hold_taken()
    metrics.hold_ended()
    metrics.record_request("test.flusher", "m-flusher", 402)
    gevent.sleep(metrics.FLUSH_SECONDS * 1.5)  # no explicit flush: the worker's own greenlet writes them
    assert _value("gateway_requests_total", route="test.flusher", model="m-flusher", status="402") == 1
    assert _value("gateway_holds_in_flight") == before + 1
    metrics.hold_ended()
    metrics.scrape()  # a scrape flushes first
    assert _value("gateway_holds_in_flight") == before


def test_a_record_from_another_thread_does_not_strand_the_flusher():
    """A first record in a real thread (a database or admin pool's) must not spawn the flusher on that thread's
    hub, which never runs again: the main thread's next record starts it, and it flushes both."""
    import threading

    metrics.flush()
    metrics._flushing[0] = False  # as in a fresh worker: no flusher yet
    route, model = "test.thread", "m-thread"
    t = threading.Thread(target=metrics.record_request, args=(route, model, 200))
    t.start()
    t.join()
    assert not metrics._flushing[0]
    metrics.record_request(route, model, 200)
    assert metrics._flushing[0]
    gevent.sleep(metrics.FLUSH_SECONDS * 1.5)
    assert _value("gateway_requests_total", route=route, model=model, status="200") == 2
