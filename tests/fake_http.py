"""What every fake HTTP upstream on 127.0.0.1 shares: a threaded server that records requests, started and
stopped in a background thread (or as a context manager). Each fake supplies only its request handler."""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self


class FakeServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128  # the default 5 drops connections when 50 parallel requests arrive at once

    def __init__(self, addr: tuple[str, int], handler: type[BaseHTTPRequestHandler], key: str) -> None:
        super().__init__(addr, handler)
        self.key = key
        self.requests: list[dict] = []
        self.disconnects = 0
        self.released: set[str] = set()  # words a test has released (FakeUpstream.release)


class FakeHandler(BaseHTTPRequestHandler):
    """A fake's request handler: HTTP/1.1 keep-alive, quiet, and its answers written whole."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out as two writes; Nagle would hold the second 40 ms
    server: FakeServer

    def log_message(self, *args: Any) -> None:
        pass

    def _send(self, status: int, data: bytes, content_type: str, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def _json(self, status: int, doc: Any, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(doc).encode(), "application/json", headers)


class FakeUpstream:
    """Start with .start() (or as a context manager); .base_url ends in /v1; .requests records every POST."""

    handler: type[BaseHTTPRequestHandler]

    def __init__(self, key: str = "sk-upstream-test", port: int = 0) -> None:
        self.server = FakeServer(("127.0.0.1", port), self.handler, key)
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        # Polled every 0.05 s, not socketserver's 0.5 s: stop() waits for the next poll, once per fake per test.
        self._thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)

    @property
    def requests(self) -> list[dict]:
        return self.server.requests

    def release(self, word: str) -> None:
        """End the answers waiting on `word` (the fake OpenAI's [until=word] streams)."""
        self.server.released.add(word)

    def start(self) -> Self:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
