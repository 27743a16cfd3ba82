"""gunicorn settings for the benchmark's holding runs: the shipped gunicorn.conf.py plus event-loop stall monitors.

Two measures in each worker, written every 0.5 s to $BENCH_STALL_FILE.<pid>.json with wall-clock times:
  loop lag   a greenlet sleeps 5 ms at a time and records how late it wakes: how long every other greenlet and
             callback kept the loop from its timers (what a client such as /health waits on top of its own work);
  slices     a greenlet.settrace hook times each greenlet's uninterrupted run between two switches: the longest
             is the longest blocking call (a SQLite lock wait in C would show here), named by the greenlet,
             with the CPU time it used (much less CPU than wall time: the OS ran another process meanwhile).
  gc         gc.callbacks time each garbage collection (a full one walks every live object, with the loop held).
The app itself is not changed; the hooks cost a few percent of CPU, so only the holding runs use this file.
"""
import os
from pathlib import Path

_shipped = Path(__file__).resolve().parent.parent / "gunicorn.conf.py"
exec(compile(_shipped.read_text(), str(_shipped), "exec"))  # the shipped settings, unchanged
_shipped_post_worker_init = post_worker_init  # noqa: F821 (defined by the exec above): GC tuning, orphan holds

INTERVAL = 0.005
THRESHOLD = 0.002  # lags and slices shorter than this are not kept
KEEP = 2000


def _keep(items: list, item: tuple) -> None:
    items.append(item)
    if len(items) > 2 * KEEP:
        items.sort(key=lambda s: -s[1])
        del items[KEEP:]


def post_worker_init(worker):
    """Start the stall monitors in the worker (after gevent has patched and the app is loaded)."""
    _shipped_post_worker_init(worker)
    path = os.environ.get("BENCH_STALL_FILE")
    if not path:
        return
    import gc
    import json
    import time

    import gevent
    import greenlet

    hub = gevent.get_hub()
    lags, slices = [], []
    # Wall time and this thread's CPU time: a slice with much less CPU than wall time was the OS running
    # another process (a shared machine), not the gateway holding its loop.
    state = {"since": time.perf_counter(), "cpu_since": time.thread_time(), "worst_lag": 0.0, "worst_slice": 0.0}

    def trace(event, args):
        if event in ("switch", "throw"):
            origin = args[0]
            now, cpu = time.perf_counter(), time.thread_time()
            ran, used = now - state["since"], cpu - state["cpu_since"]
            state["since"], state["cpu_since"] = now, cpu
            if origin is not hub and ran > THRESHOLD:
                state["worst_slice"] = max(state["worst_slice"], ran)
                run = getattr(origin, "_run", None) or getattr(origin, "run", None)
                _keep(slices, (time.time(), ran, getattr(run, "__qualname__", type(origin).__name__), used))

    greenlet.settrace(trace)
    collections = []  # (wall time, seconds, generation, CPU seconds)

    def on_gc(phase, info):
        if phase == "start":
            state["gc_from"], state["gc_cpu_from"] = time.perf_counter(), time.thread_time()
        elif "gc_from" in state:
            took = time.perf_counter() - state.pop("gc_from")
            used = time.thread_time() - state.pop("gc_cpu_from")
            state["worst_gc"] = max(state.get("worst_gc", 0.0), took)
            if took > THRESHOLD:
                _keep(collections, (time.time(), took, info.get("generation"), used))

    gc.callbacks.append(on_gc)

    def monitor():
        ticks, last_write = 0, time.monotonic()
        while True:
            t0 = time.perf_counter()
            gevent.sleep(INTERVAL)
            late = time.perf_counter() - t0 - INTERVAL
            ticks += 1
            state["worst_lag"] = max(state["worst_lag"], late)
            if late > THRESHOLD:
                _keep(lags, (time.time(), late))
            if time.monotonic() - last_write > 0.5:
                last_write = time.monotonic()
                out = f"{path}.{os.getpid()}.json"
                with open(out + ".tmp", "w") as f:
                    json.dump({"pid": os.getpid(), "ticks": ticks, "max_lag_s": state["worst_lag"], "lags": lags,
                               "max_slice_s": state["worst_slice"], "slices": slices,
                               "max_gc_s": state.get("worst_gc", 0.0), "gcs": collections}, f)
                os.replace(out + ".tmp", out)

    gevent.spawn(monitor)
