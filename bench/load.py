"""The benchmark's own load generator: gevent greenlets on raw sockets, HTTP/1.1 keep-alive, in its own process.

Modes (each bounded in time and count; the result is one JSON line on stdout, progress lines before it):
  plain   N connections send the same POST back to back for --duration seconds (used when wrk is missing)
  stream  N concurrent clients run streamed requests back to back for --duration seconds: time to first
          `data:` event, events received, `[DONE]` and the usage event checked on every stream
  hold    N streams opened (at most --open-concurrency connecting at once), kept open until the upstream ends
          them; prints {"ev": "all_open"} once every stream has had its first event
"""
from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import gevent  # noqa: E402
from gevent.lock import BoundedSemaphore  # noqa: E402


def emit(doc: dict) -> None:
    sys.stdout.write(json.dumps(doc) + "\n")
    sys.stdout.flush()


def percentiles(values: list[float], points: tuple[int, ...] = (50, 90, 99)) -> dict[str, float | None]:
    """Nearest-rank percentiles in milliseconds (values are seconds), plus max and count."""
    out: dict[str, float | None] = {}
    ordered = sorted(values)
    for p in points:
        out[f"p{p}_ms"] = ordered[min(len(ordered) - 1, max(0, -(-p * len(ordered) // 100) - 1))] * 1000 \
            if ordered else None
    out["max_ms"] = ordered[-1] * 1000 if ordered else None
    out["n"] = len(ordered)
    return out


class Conn:
    """One client connection: send a request, read the status and headers, then the body piece by piece."""

    def __init__(self, host: str, port: int, timeout: float) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect((host, port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def close(self) -> None:
        self.sock.close()

    def _fill(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise EOFError("the server closed the connection")
        self.buf += data

    def head(self) -> tuple[int, dict[bytes, bytes]]:
        end = self.buf.find(b"\r\n\r\n")
        while end < 0:
            self._fill()
            end = self.buf.find(b"\r\n\r\n")
        lines = self.buf[:end].split(b"\r\n")
        self.buf = self.buf[end + 4:]
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        return int(lines[0].split()[1]), headers

    def pieces(self, headers: dict[bytes, bytes]):
        """The body as it arrives: chunk by chunk, or the Content-Length bytes at once."""
        if headers.get(b"transfer-encoding", b"").lower() == b"chunked":
            while True:
                end = self.buf.find(b"\r\n")
                while end < 0:
                    self._fill()
                    end = self.buf.find(b"\r\n")
                size = int(self.buf[:end].split(b";")[0], 16)
                self.buf = self.buf[end + 2:]
                while len(self.buf) < size + 2:
                    self._fill()
                piece, self.buf = self.buf[:size], self.buf[size + 2:]
                if size == 0:
                    return
                yield piece
        else:
            length = int(headers.get(b"content-length", b"0"))
            while len(self.buf) < length:
                self._fill()
            piece, self.buf = self.buf[:length], self.buf[length:]
            yield piece


def request_bytes(host: str, port: int, path: str, key: str, body: bytes, extra: list[str] = ()) -> bytes:
    more = "".join(f"{h}\r\n" for h in extra)
    return (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nAuthorization: Bearer {key}\r\n{more}"
            f"Content-Type: application/json\r\nAccept: text/event-stream\r\nContent-Length: {len(body)}\r\n\r\n"
            ).encode() + body


class Stream:
    """One streamed request on a connection: times the first `data:` event and checks the end."""

    def __init__(self) -> None:
        self.status = 0
        self.ttft: float | None = None
        self.total = 0.0
        self.events = 0
        self.done = self.usage = self.cost = False
        self.error: str | None = None

    def run(self, conn: Conn, req: bytes, on_first=None) -> None:
        started = time.perf_counter()
        conn.sock.sendall(req)
        self.status, headers = conn.head()
        sse = b""
        for piece in conn.pieces(headers):
            sse += piece
            while True:
                end = sse.find(b"\n\n")
                if end < 0:
                    break
                event, sse = sse[:end], sse[end + 2:]
                if not event.startswith(b"data:"):
                    continue  # ": connected", ": ping"
                if event == b"data: [DONE]":
                    self.done = True
                    continue
                if self.ttft is None:
                    self.ttft = time.perf_counter() - started
                    if on_first:
                        on_first()
                self.events += 1
                if event.startswith(b'data: {"error"'):
                    self.error = event[6:200].decode(errors="replace")
                if b'"usage"' in event and b'"prompt_tokens"' in event:
                    self.usage = True
                    self.cost = b'"cost"' in event
        self.total = time.perf_counter() - started


class Summary:
    """What the streams of one run found, as one JSON object."""

    def __init__(self) -> None:
        self.ttfts: list[float] = []
        self.totals: list[float] = []
        self.started = self.ok = self.done = self.usage = self.cost = self.events = 0
        self.errors: dict[str, int] = {}

    def error(self, text: str) -> None:
        self.errors[text[:120]] = self.errors.get(text[:120], 0) + 1

    def add(self, s: Stream) -> None:
        self.events += s.events
        self.done += s.done
        self.usage += s.usage
        self.cost += s.cost
        if s.ttft is not None:
            self.ttfts.append(s.ttft)
        if s.status == 200 and s.done and s.error is None:
            self.ok += 1
            self.totals.append(s.total)
        else:
            self.error(s.error or f"status {s.status}, done={s.done}")

    def result(self, elapsed: float) -> dict:
        return {"ev": "result", "elapsed_s": elapsed, "streams": self.started, "ok": self.ok, "done": self.done,
                "usage_seen": self.usage, "cost_seen": self.cost, "events": self.events,
                "ttft": percentiles(self.ttfts), "total": percentiles(self.totals), "errors": self.errors,
                "ttft_first_20_ms": [round(t * 1000, 2) for t in self.ttfts[:20]]}


def run_plain(args: argparse.Namespace, req: bytes) -> dict:
    """Closed-loop keep-alive load: each connection sends the next request when the previous answer is in."""
    latencies: list[float] = []
    errors: dict[str, int] = {}
    statuses: dict[int, int] = {}
    deadline = time.perf_counter() + args.duration

    def worker() -> None:
        conn = None
        while time.perf_counter() < deadline and len(latencies) < args.max_requests:
            try:
                if conn is None:
                    conn = Conn(args.host, args.port, args.timeout)
                t0 = time.perf_counter()
                conn.sock.sendall(req)
                status, headers = conn.head()
                for _ in conn.pieces(headers):
                    pass
                latencies.append(time.perf_counter() - t0)
                statuses[status] = statuses.get(status, 0) + 1
            except Exception as exc:  # count it, reconnect, go on until the deadline
                errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
                if conn:
                    conn.close()
                conn = None
                gevent.sleep(0.01)
        if conn:
            conn.close()

    started = time.perf_counter()
    gevent.joinall([gevent.spawn(worker) for _ in range(args.concurrency)], timeout=args.duration + args.timeout + 5)
    elapsed = time.perf_counter() - started
    return {"ev": "result", "elapsed_s": elapsed, "requests": len(latencies), "rps": len(latencies) / elapsed,
            "latency": percentiles(latencies), "statuses": {str(k): v for k, v in statuses.items()},
            "errors": errors}


def run_stream(args: argparse.Namespace, req: bytes) -> dict:
    """N clients, each running streams back to back on a keep-alive connection until the time is up."""
    summary = Summary()
    deadline = time.perf_counter() + args.duration

    def worker() -> None:
        conn = None
        while time.perf_counter() < deadline and summary.started < args.max_requests:
            summary.started += 1
            s = Stream()
            try:
                if conn is None:
                    conn = Conn(args.host, args.port, args.timeout)
                with gevent.Timeout(args.stream_timeout):
                    s.run(conn, req)
            except BaseException as exc:  # gevent.Timeout is a BaseException
                s.error = f"{type(exc).__name__}: {exc}"
                if conn:
                    conn.close()
                conn = None
            summary.add(s)
        if conn:
            conn.close()

    started = time.perf_counter()
    gevent.joinall([gevent.spawn(worker) for _ in range(args.concurrency)],
                   timeout=args.duration + args.stream_timeout + 5)
    return summary.result(time.perf_counter() - started)


def run_hold(args: argparse.Namespace, req: bytes) -> dict:
    """Open N streams (paced), report when all have their first event, wait for all to end."""
    summary = Summary()
    opening = BoundedSemaphore(args.open_concurrency)
    state = {"open": 0, "all_open_at": None}
    started = time.perf_counter()

    def first() -> None:
        opening.release()
        state["open"] += 1
        if state["open"] % max(1, args.concurrency // 10) == 0:
            emit({"ev": "progress", "open": state["open"], "t": time.perf_counter() - started})
        if state["open"] == args.concurrency:
            state["all_open_at"] = time.perf_counter() - started
            emit({"ev": "all_open", "t": state["all_open_at"]})

    def one() -> None:
        opening.acquire()
        summary.started += 1
        s = Stream()
        conn = None
        released = [False]

        def on_first() -> None:
            released[0] = True
            first()
        try:
            conn = Conn(args.host, args.port, args.timeout)
            with gevent.Timeout(args.stream_timeout):
                s.run(conn, req, on_first)
        except BaseException as exc:
            s.error = f"{type(exc).__name__}: {exc}"
        finally:
            if not released[0]:
                opening.release()
            if conn:
                conn.close()
        summary.add(s)

    gevent.joinall([gevent.spawn(one) for _ in range(args.concurrency)], timeout=args.stream_timeout + 10)
    result = summary.result(time.perf_counter() - started)
    result["all_open_at_s"] = state["all_open_at"]
    result["max_open"] = state["open"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=("plain", "stream", "hold"))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", default="/v1/chat/completions")
    parser.add_argument("--key", required=True)
    parser.add_argument("--body", required=True, help="the JSON request body")
    parser.add_argument("--header", action="append", default=[], help="an extra 'Name: value' header (repeatable)")
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--duration", type=float, default=10)
    parser.add_argument("--max-requests", type=int, default=10_000_000)
    parser.add_argument("--timeout", type=float, default=10, help="socket connect/read timeout, seconds")
    parser.add_argument("--stream-timeout", type=float, default=60, help="longest one stream may take, seconds")
    parser.add_argument("--open-concurrency", type=int, default=64, help="hold: streams connecting at once")
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if args.concurrency + 64 > hard:
        raise SystemExit(f"load: {args.concurrency} connections need more than RLIMIT_NOFILE={hard} descriptors")
    req = request_bytes(args.host, args.port, args.path, args.key, args.body.encode(), args.header)
    emit({"mode": args.mode, "concurrency": args.concurrency, "ev": "start"})
    emit({"plain": run_plain, "stream": run_stream, "hold": run_hold}[args.mode](args, req))


if __name__ == "__main__":
    main()
