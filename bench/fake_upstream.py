"""A fast fake OpenAI-compatible upstream for the benchmark: gevent raw sockets, HTTP/1.1 keep-alive, no latency.

POST .../chat/completions answers at once:
  plain: one fixed chat.completion with usage (prebuilt bytes, so the fake is never the bottleneck);
  "stream": true: chunked SSE, `chunks` content events (the first carries the role and the first token), a finish
  event, a usage event and `data: [DONE]`.
Knobs ride in the message text, so they pass through the gateway untouched: `[bench chunks=50 delay=0.01]`
(delay: seconds between content events), `[bench hold=1 delay=1.5 jitter=0.5]` (a slow stream: one event every
delay +- jitter seconds until POST /control/release, or --max-hold seconds, then the end of the stream).
GET /health is 200; GET /control/stats counts requests and open streams.

Run: python bench/fake_upstream.py --port 9999 --key sk-upstream
"""
from __future__ import annotations

import argparse
import json
import random
import re
import resource
import signal
import socket
import sys
import time

import gevent
from gevent.event import Event
from gevent.server import StreamServer

REPLY = "Hello from the bench upstream!"
PROMPT_TOKENS = 12
_KNOBS = re.compile(rb"\[bench ([^\]]*)\]")
_STREAM = re.compile(rb'"stream"\s*:\s*true')
_OK_JSON = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
_OK_SSE = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
           b"Transfer-Encoding: chunked\r\n\r\n")


def _json_response(status: str, doc: object) -> bytes:
    data = json.dumps(doc, separators=(",", ":")).encode()
    return (f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
            .encode() + data)


def _frame(event: bytes) -> bytes:
    """One SSE event as one chunk of a chunked body."""
    return b"%x\r\n%s\r\n" % (len(event), event)


def _event(doc: dict) -> bytes:
    return b"data: " + json.dumps(doc, separators=(",", ":")).encode() + b"\n\n"


def _chunk(delta: dict, finish: str | None = None) -> dict:
    return {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 1700000000,
            "model": "gpt-4.1-mini", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


PLAIN = _json_response("200 OK", {
    "id": "chatcmpl-bench", "object": "chat.completion", "created": 1700000000, "model": "gpt-4.1-mini",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": REPLY}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": 9, "total_tokens": PROMPT_TOKENS + 9}})
UNAUTHORIZED = _json_response("401 Unauthorized", {"error": {
    "message": "Incorrect API key provided.", "type": "invalid_request_error", "param": None,
    "code": "invalid_api_key"}})
NOT_FOUND = _json_response("404 Not Found", {"error": {
    "message": "not found", "type": "invalid_request_error", "param": None, "code": None}})
FIRST = _frame(_event(_chunk({"role": "assistant", "content": "tok"})))
TOKEN = _frame(_event(_chunk({"content": " tok"})))
FINISH = _frame(_event(_chunk({}, "stop")))
DONE = _frame(b"data: [DONE]\n\n") + b"0\r\n\r\n"


def _usage(completion: int) -> bytes:
    return _frame(_event({**_chunk({}), "choices": [], "usage": {
        "prompt_tokens": PROMPT_TOKENS, "completion_tokens": completion, "total_tokens": PROMPT_TOKENS + completion}}))


class Upstream:
    """The server's state: the key it accepts, counters, and the event that ends held streams."""

    def __init__(self, key: str, chunks: int, max_hold: float) -> None:
        self.auth = f"Bearer {key}".encode()
        self.chunks, self.max_hold = chunks, max_hold
        self.requests = self.streams_open = self.held_open = 0
        self.release = Event()

    def handle(self, sock: socket.socket, _addr: object) -> None:
        """One keep-alive connection: parse requests with Content-Length bodies, answer each in turn."""
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        buf = b""
        try:
            while True:
                end = buf.find(b"\r\n\r\n")
                while end < 0:
                    if len(buf) > 65536:
                        return
                    data = sock.recv(65536)
                    if not data:
                        return
                    buf += data
                    end = buf.find(b"\r\n\r\n")
                lines = buf[:end].split(b"\r\n")
                buf = buf[end + 4:]
                method, path, version = lines[0].split(b" ", 2)
                length, auth, close = 0, b"", version == b"HTTP/1.0"
                for line in lines[1:]:
                    name, _, value = line.partition(b":")
                    name = name.strip().lower()
                    if name == b"content-length":
                        length = int(value)
                    elif name == b"authorization":
                        auth = value.strip()
                    elif name == b"connection":
                        close = value.strip().lower() == b"close"
                while len(buf) < length:
                    data = sock.recv(max(65536, length - len(buf)))
                    if not data:
                        return
                    buf += data
                body, buf = buf[:length], buf[length:]
                self.requests += 1
                if not self.route(sock, method, path, auth, body) or close:
                    return
        except (OSError, ValueError):
            return
        finally:
            sock.close()

    def route(self, sock: socket.socket, method: bytes, path: bytes, auth: bytes, body: bytes) -> bool:
        """Answer one request; False when the connection must close."""
        if method == b"POST" and path.endswith(b"/chat/completions"):
            if auth != self.auth:
                sock.sendall(UNAUTHORIZED)
            elif _STREAM.search(body):
                return self.stream(sock, body)
            else:
                sock.sendall(PLAIN)
        elif path == b"/health":
            sock.sendall(_json_response("200 OK", {"status": "OK"}))
        elif path == b"/control/stats":
            sock.sendall(_json_response("200 OK", {"requests": self.requests, "streams_open": self.streams_open,
                                                   "held_open": self.held_open}))
        elif method == b"POST" and path == b"/control/release":
            released, self.release = self.release, Event()
            released.set()
            sock.sendall(_json_response("200 OK", {"released": True}))
        else:
            sock.sendall(NOT_FOUND)
        return True

    def stream(self, sock: socket.socket, body: bytes) -> bool:
        knobs = {}
        match = _KNOBS.search(body)
        if match:
            for pair in match.group(1).split():
                name, _, value = pair.partition(b"=")
                knobs[name.decode()] = float(value)
        delay = knobs.get("delay", 0.0)
        self.streams_open += 1
        try:
            sock.sendall(_OK_SSE + FIRST)
            sent = 1
            if knobs.get("hold"):
                sent += self._held(sock, delay, knobs.get("jitter", 0.0))
            else:
                for _ in range(int(knobs.get("chunks", self.chunks)) - 1):
                    gevent.sleep(delay)  # sleep(0) still lets the other connections run between events
                    sock.sendall(TOKEN)
                    sent += 1
            sock.sendall(FINISH + _usage(sent) + DONE)
        finally:
            self.streams_open -= 1
        return True

    def _held(self, sock: socket.socket, delay: float, jitter: float) -> int:
        """Send a token every delay +- jitter seconds until released (or max_hold); returns how many."""
        release, sent = self.release, 0
        deadline = time.monotonic() + self.max_hold
        self.held_open += 1
        try:
            while time.monotonic() < deadline:
                tick, t0 = max(0.01, delay + random.uniform(-jitter, jitter)), time.monotonic()
                if release.wait(tick):  # end at this stream's next tick, so the ends spread over one delay
                    gevent.sleep(max(0.0, tick - (time.monotonic() - t0)))
                    break
                sock.sendall(TOKEN)
                sent += 1
        finally:
            self.held_open -= 1
        return sent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--key", required=True, help="the API key the fake accepts (Authorization: Bearer KEY)")
    parser.add_argument("--chunks", type=int, default=50, help="content events per stream (default 50)")
    parser.add_argument("--max-hold", type=float, default=300, help="longest a held stream lasts, seconds")
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    upstream = Upstream(args.key, args.chunks, args.max_hold)
    server = StreamServer((args.host, args.port), upstream.handle, backlog=4096)
    gevent.signal_handler(signal.SIGTERM, server.stop)
    gevent.signal_handler(signal.SIGINT, server.stop)
    print(f"fake upstream on http://{args.host}:{args.port}/v1", file=sys.stderr, flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
