"""The gateway's log formatter writes exactly what logging.Formatter(app.LOG_FORMAT) writes, for every kind of
record: plain, with arguments, across second boundaries, with a traceback and with a stack."""
from __future__ import annotations

import logging
import sys

import app


def _record(name: str, level: int, msg: str, args: tuple, created: float, **extra) -> logging.LogRecord:
    record = logging.LogRecord(name, level, __file__, 1, msg, args, extra.pop("exc_info", None),
                               sinfo=extra.pop("sinfo", None))
    record.created = created
    record.msecs = int((created - int(created)) * 1000) + 0.0
    return record


def _both(record_args: tuple, **extra) -> tuple[str, str]:
    ours = app.LineFormatter().format(_record(*record_args, **dict(extra)))
    stdlib = logging.Formatter(app.LOG_FORMAT).format(_record(*record_args, **dict(extra)))
    return ours, stdlib


def test_same_lines_as_the_stdlib_formatter() -> None:
    fmt = app.LineFormatter()
    stdlib = logging.Formatter(app.LOG_FORMAT)
    # One formatter across seconds, back and forth: its cached second must never leak into another second.
    for created in (1_764_550_000.0, 1_764_550_000.999, 1_764_550_001.0005, 1_764_550_000.5, 1_764_636_399.25):
        record = _record("gateway.request", logging.INFO, "request_id=%s status=%s", ("req_1", 200), created)
        twin = _record("gateway.request", logging.INFO, "request_id=%s status=%s", ("req_1", 200), created)
        assert fmt.format(record) == stdlib.format(twin)
        assert record.asctime == twin.asctime and record.message == twin.message
    ours, theirs = _both(("gateway", logging.WARNING, "no args %d%%", (), 1_764_550_002.123))
    assert ours == theirs


def test_traceback_and_stack_appended_as_the_stdlib_does() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        exc_info = sys.exc_info()
    ours, theirs = _both(("gateway", logging.ERROR, "request_id=%s unhandled error", ("req_2",), 1_764_550_003.5),
                         exc_info=exc_info)
    assert ours == theirs and "ValueError: boom" in ours
    # A message already ending in a newline gets no second one before the traceback.
    ours, theirs = _both(("gateway", logging.ERROR, "ends with newline\n", (), 1_764_550_003.5), exc_info=exc_info)
    assert ours == theirs
    ours, theirs = _both(("gateway", logging.INFO, "with stack", (), 1_764_550_004.0), sinfo="Stack (most recent)")
    assert ours == theirs and ours.endswith("\nStack (most recent)")
