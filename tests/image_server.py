"""A real HTTP server on 127.0.0.1 serving good images and every kind of bad answer safefetch must refuse."""
from __future__ import annotations

import ssl
import struct
import threading
import time
import zlib
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Self


def make_png(width: int = 2, height: int = 2) -> bytes:
    """A valid RGB PNG (signature, IHDR, one zlib IDAT, IEND, real CRCs) of a red square."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"".join(b"\x00" + b"\xff\x00\x00" * width for _ in range(height))  # filter byte 0, then pixels
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def _segment(marker: int, body: bytes) -> bytes:
    return struct.pack(">BBH", 0xFF, marker, len(body) + 2) + body


# A 1x1 grey baseline JPEG: one 8x8 block whose coefficients are all zero, coded with one-symbol Huffman tables
# (DC category 0 = "0", AC end-of-block = "0"), so the entropy-coded data is the two bits 00 padded with ones.
_ONE_CODE = bytes([1] + [0] * 15) + b"\x00"
CAT_JPG = (b"\xff\xd8"
           + _segment(0xE0, b"JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00")
           + _segment(0xDB, b"\x00" + b"\x01" * 64)
           + _segment(0xC0, b"\x08\x00\x01\x00\x01\x01\x01\x11\x00")
           + _segment(0xC4, b"\x00" + _ONE_CODE)
           + _segment(0xC4, b"\x10" + _ONE_CODE)
           + _segment(0xDA, b"\x01\x01\x00\x00\x3f\x00")
           + b"\x3f\xff\xd9")
CAT_PNG = make_png()
BIG_BYTES = 50 * 1024 * 1024


class ImageServer:
    """Context manager: a threaded server on 127.0.0.1:<free port> with per-path request counts and Host headers.

    Paths: /cat.png, /cat.jpg, /redirect-ok (302 to /cat.png), /redirect-private (302 to http://10.0.0.1/x.png),
    /redirect-loop (302 to itself), /big.png (PNG header then 50 MB trickled without Content-Length),
    /big-declared.png (the same with Content-Length 50 MB), /trickle.png (one byte every 0.2 s),
    /text (text/html), /fake-png (image/png header, text body), /hang (never answers), anything else 404.
    With tls=(certfile, keyfile) it speaks HTTPS instead.
    """

    def __init__(self, tls: tuple[str, str] | None = None) -> None:
        self.counts: Counter[str] = Counter()
        self.in_flight = 0  # requests being answered now, and the most there ever were at once
        self.max_in_flight = 0
        self.lock = threading.Lock()
        self.hosts: dict[str, str] = {}  # path -> the Host header of its latest request
        self.sent: dict[str, int] = {}  # streamed path -> body bytes written before the client hung up
        self.finished: dict[str, threading.Event] = {p: threading.Event() for p in ("/big.png", "/big-declared.png")}
        self.stopping = threading.Event()  # wakes /hang so shutdown never waits on it
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._httpd.daemon_threads = True
        self._httpd.owner = self  # type: ignore[attr-defined]
        self.scheme = "https" if tls else "http"
        if tls:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*tls)
            self._httpd.socket = context.wrap_socket(self._httpd.socket, server_side=True)
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        """http(s)://host:port/path; host may be a name the test's resolver maps, or a bracketed IPv6 literal."""
        return f"{self.scheme}://{host}:{self.port}{path}"

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5)


class _Handler(BaseHTTPRequestHandler):
    server_version = "ImageServer/1"

    def log_message(self, format: str, *args: object) -> None:
        """Quiet: tests read the counters instead."""

    def do_GET(self) -> None:
        owner: ImageServer = self.server.owner  # type: ignore[attr-defined]
        with owner.lock:
            owner.in_flight += 1
            owner.max_in_flight = max(owner.max_in_flight, owner.in_flight)
        try:
            self._answer(owner)
        finally:
            with owner.lock:
                owner.in_flight -= 1

    def _answer(self, owner: ImageServer) -> None:
        path = self.path.split("?")[0]
        with owner.lock:
            owner.counts[path] += 1
        owner.hosts[path] = self.headers.get("Host", "")
        if path == "/slow.png":  # a good image after 0.5 s: long enough for fetches to overlap
            owner.stopping.wait(0.5)
            self._send(200, "image/png", make_png(3, 3))
        elif path == "/cat.png":
            self._send(200, "image/png", CAT_PNG)
        elif path == "/cat.jpg":
            self._send(200, "image/jpeg", CAT_JPG)
        elif path == "/redirect-ok":
            self._redirect("/cat.png")
        elif path == "/redirect-private":
            self._redirect("http://10.0.0.1/x.png")
        elif path == "/redirect-loop":
            self._redirect("/redirect-loop")
        elif path in ("/big.png", "/big-declared.png"):
            self._stream_big(owner, path, declare=path == "/big-declared.png")
        elif path == "/trickle.png":
            self._trickle(owner)
        elif path == "/text":
            self._send(200, "text/html; charset=utf-8", b"<html><body>not an image</body></html>")
        elif path == "/fake-png":
            self._send(200, "image/png", b"<html><body>I am text wearing a PNG label</body></html>")
        elif path == "/hang":
            owner.stopping.wait(30)
        else:
            self._send(404, "text/plain", b"not found")

    def _send(self, status: int, ctype: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _redirect(self, location: str) -> None:
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _stream_big(self, owner: ImageServer, path: str, declare: bool) -> None:
        """PNG signature, then zeros in 64 KiB chunks, counting what was written until the client hangs up."""
        sent = 0
        try:
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            if declare:
                self.send_header("Content-Length", str(BIG_BYTES))
            self.end_headers()  # no length otherwise: HTTP/1.0, the body ends when the connection closes
            self.wfile.write(CAT_PNG[:8])
            sent = 8
            chunk = b"\x00" * 65536
            while sent < BIG_BYTES and not owner.stopping.is_set():
                self.wfile.write(chunk)
                self.wfile.flush()
                sent += len(chunk)
                time.sleep(0.002)  # slowly: a client that reads it all would take seconds
        except OSError:  # BrokenPipe / ConnectionReset: the client stopped reading, as it should
            pass
        finally:
            owner.sent[path] = sent
            owner.finished[path].set()

    def _trickle(self, owner: ImageServer) -> None:
        """A PNG that arrives one byte every 0.2 s: each read is quick, the whole never is."""
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.end_headers()
        try:
            for byte in CAT_PNG:
                if owner.stopping.wait(0.2):
                    return
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
        except OSError:
            pass
