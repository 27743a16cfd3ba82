"""Pooled HTTP to upstreams: one urllib3 pool per upstream per worker, and transport errors as GatewayErrors.

urllib3 is requests' own transport. The gateway calls it directly: the same pooled keep-alive connections
with less than half the CPU per call (docs/performance.md, "What made the difference"), which matters on a
path that is meant to cost about a millisecond.
"""
from __future__ import annotations

import email.parser
import http.client
import json
import math
import os
import re
import socket
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import gevent
import gevent.monkey
import httptools
import urllib3
from urllib3.exceptions import HTTPError, MaxRetryError, NewConnectionError
from urllib3.exceptions import TimeoutError as Urllib3Timeout

from config import UpstreamConfig
from errors import (
    BadRequestError,
    GatewayError,
    ModelNotFoundError,
    RateLimitError,
    UpstreamError,
    UpstreamTimeoutError,
)

_pools: dict[str, urllib3.PoolManager] = {}
# The gunicorn worker patches the socket module before this module is imported (no --preload).
_GREEN = gevent.monkey.is_module_patched("socket")
READ_SIZE = 65536
MAX_MESSAGE_CHARS = 500  # an upstream's error text relayed to a client is cut to this
MAX_RETRY_AFTER = 86400  # a Retry-After beyond a day is relayed as a day
REDACTED = "[redacted]"

# Text shaped like a credential, whoever it belongs to: upstreams echo request headers into error messages.
_SECRETS = re.compile(
    r"\b(?:proxy-)?authorization\b\"?\s*[:=]\s*\"?(?:(?:bearer|basic|token)\s+)?[^\s\"',;&]+"
    r"|\b(?:x-goog-api-key|x-api-key|api-key)\b\"?\s*[:=]\s*\"?[^\s\"',;&]+"
    r"|\bbearer\s+[^\s\"',;]+"
    r"|\b(?:[a-z0-9]+[_.-])*key=[^\s&\"',;)]+"  # key=..., api_key=..., x-goog-api-key=...
    r"|\bsk-[\w-]{8,}"  # OpenAI-style secret keys
    r"|\bAIza[\w-]{20,}",  # Google API keys
    re.IGNORECASE)


def scrub(text: Any, upstream: UpstreamConfig | None = None, limit: int = MAX_MESSAGE_CHARS) -> str:
    """Text from an upstream, fit for a client or a log line: without the upstream's key or anything shaped like
    a bearer token or key= parameter, and at most `limit` characters."""
    text = str(text)
    key = upstream.api_key() if upstream else None
    text = text[:limit * 8]  # the patterns run on a bounded prefix; the rest would be cut anyway
    if key and len(key) >= 4:
        # A key cut in two by the prefix would survive replace(): drop a trailing piece of it first.
        for size in range(min(len(key) - 1, len(text)), 0, -1):
            if text.endswith(key[:size]):
                text = text[:-size]
                break
        text = text.replace(key, REDACTED)
    text = _SECRETS.sub(REDACTED, text)
    return text if len(text) <= limit else text[:limit] + "..."


def scrubbed(exc: GatewayError, upstream: UpstreamConfig | None = None) -> GatewayError:
    """The same error with its message scrubbed (messages built from an upstream's words)."""
    exc.message = scrub(exc.message, upstream)
    exc.args = (exc.message,)
    return exc


@contextmanager
def deadline(upstream: UpstreamConfig, at: float) -> Iterator[None]:
    """Raise UpstreamTimeoutError (504) if the block is still running at monotonic time `at`.

    Under the gevent worker a gevent.Timeout interrupts a read that trickles in a byte at a time, which the
    per-read socket timeout never would; urllib3 closes a connection interrupted that way.
    """
    timer = gevent.Timeout(max(0.001, at - time.monotonic()))
    timer.start()
    try:
        yield
    except gevent.Timeout as exc:
        if exc is not timer:
            raise
        raise _late(upstream) from None
    finally:
        timer.cancel()


def _late(upstream: UpstreamConfig) -> UpstreamTimeoutError:
    return UpstreamTimeoutError(f"The upstream '{upstream.name}' did not answer within its "
                           f"{upstream.deadline_seconds():g} s deadline.")


def _too_large(upstream: UpstreamConfig) -> UpstreamError:
    return UpstreamError(f"The upstream '{upstream.name}' sent an answer larger than its limit of "
                         f"{upstream.max_response_bytes} bytes.")


class Reply:
    """An upstream's answer: status, headers, and the body read whole (bounded) or (stream=True) left on .raw."""

    def __init__(self, resp: urllib3.BaseHTTPResponse, streaming: bool, deadline: float,
                 body: bytes | None = None) -> None:
        self.raw = resp
        self.status_code = resp.status
        self.headers = resp.headers  # case-insensitive
        self.deadline = deadline  # monotonic time a stream's first byte must arrive by
        self._streaming = streaming
        self._body = body

    @property
    def content(self) -> bytes:
        return self._body if self._body is not None else self.raw.data

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", "replace")

    def json(self) -> Any:
        return json.loads(self.content)

    def load(self, upstream: UpstreamConfig) -> None:
        """Read a stream's body whole after all (an error answer), bounded like a plain call's."""
        with deadline(upstream, self.deadline):
            self._body = _read_body(upstream, self.raw, self.deadline)
        self._streaming = False

    def finish(self) -> None:
        """Read a finished stream's remainder (the chunked terminator), so close() can reuse its connection."""
        self.raw.drain_conn()
        self._streaming = False

    def close(self) -> None:
        """Give the connection back; a stream not finished closes it, since its unread rest cannot be reused."""
        if self._streaming:
            self.raw.close()
        self.raw.release_conn()


# Header lines already checked and encoded, by (name, value); bounded, since values could vary without end.
_LINES: dict[tuple[Any, Any], bytes] = {}
MAX_KEPT_LINES = 256


class _OneWrite:
    """A urllib3 connection that sends a request's head and its (bytes) body in one write, and builds the head's
    lines once (putheader).

    http.client sends the head, then urllib3 sends the body: two syscalls and, with Nagle off, two TCP segments
    per upstream call. The head is held back here and goes out with the body instead.
    """

    _holding = False
    _held: bytes | None = None

    def request(self, method: str, url: str, body: Any = None, headers: Any = None, **kw: Any) -> None:
        if not isinstance(body, bytes) or not body:
            return super().request(method, url, body=body, headers=headers, **kw)
        self._holding, self._held = True, None
        try:
            super().request(method, url, body=body, headers=headers, **kw)
        finally:
            held, self._holding, self._held = self._held, False, None
        if held is not None:  # no body write followed the head (not expected for a bytes body): send it now
            super().send(held)

    def putheader(self, header: Any, *values: Any) -> None:
        """urllib3's and http.client's putheader, with each distinct header line checked and encoded once.

        They check a header's name and value by regex and encode both on every call, six headers per upstream
        call (about 15 µs). The lines an upstream call sends are few and repeat (Host, the key, the content
        type, the user agent), so a line they built is kept and reused for the same (name, values); a
        Content-Length of digits is formatted directly. Anything new goes through them first, so a bad name or
        value raises as before and is never kept.
        """
        # Only str names and values are kept: 1, 1.0 and True are equal as keys but not as header lines.
        if len(values) == 1 and type(header) is str and type(values[0]) is str:
            value = values[0]
            if header == "Content-Length" and value.isascii() and value.isdigit():
                self._output(b"Content-Length: " + value.encode())
                return
            key = (header, value)
            line = _LINES.get(key)
            if line is not None:
                self._output(line)
                return
            before = len(self._buffer)
            super().putheader(header, value)
            if len(self._buffer) == before + 1 and len(_LINES) < MAX_KEPT_LINES:  # SKIP_HEADER adds nothing
                _LINES[key] = self._buffer[-1]
            return
        super().putheader(header, *values)

    def send(self, data: Any) -> None:
        if self._holding:
            if self._held is None:
                self._held = bytes(data)
                return
            data, self._holding, self._held = self._held + bytes(data), False, None
            if self._plain_socket and self.sock is not None:
                send_all(self.sock, data)
                return
        super().send(data)

    _plain_socket = False


def send_all(sock: socket.socket, data: bytes) -> None:
    """sock.sendall(data) for a plain (not TLS) socket, without what gevent's sendall adds to every call.

    gevent's sendall asks the kernel for SO_SNDBUF (a getsockopt syscall) and reads the clock before its first
    send, for each of a request's two writes (upstream and client); send() already waits while the buffer is
    full and honours the socket's timeout, so a loop over it sends the same bytes.
    """
    view = memoryview(data)
    while view:
        view = view[sock.send(view):]


# A response head of plain "Name: value" lines, each ended by CRLF or LF, then the blank line (or EOF). Name
# characters are those of the email package's header pattern; a value holds no CR or LF, which that package
# would treat as a line break. Anything else (folded lines, a line without a colon, a bare CR) is left to it.
_PLAIN_HEAD = re.compile(r"(?:[!-9;-~]+:[^\r\n]*\r?\n)*(?:\r?\n)?")
_FIELD = re.compile(r"([!-9;-~]+):[ \t]*([^\r\n]*)\r?\n")


def parse_head(fp: Any) -> http.client.HTTPMessage:
    """http.client.parse_headers(fp), without the email package's parser for a head of plain lines.

    That parser costs about 35 µs per upstream answer (a feed parser, a policy, line-by-line regexes), for a
    head that is nearly always a handful of "Name: value" lines. For those, the same HTTPMessage is built
    directly: the email package's compat32 policy stores a field as the text after the colon with leading
    blanks and the line end taken off, which is what _FIELD captures. Any other head goes to the email
    package as before, so its defects (and urllib3's warning about them) are unchanged.
    """
    lines = http.client._read_headers(fp)  # its limits: line length, header count
    text = b"".join(lines).decode("iso-8859-1")
    if not _PLAIN_HEAD.fullmatch(text):
        return email.parser.Parser(_class=http.client.HTTPMessage).parsestr(text)
    msg = http.client.HTTPMessage()
    for name, value in _FIELD.findall(text):
        msg[name] = value
    return msg


class _Response(http.client.HTTPResponse):
    """http.client's response with its head parsed by parse_head; everything else is http.client's."""

    def begin(self) -> None:
        # http.client.HTTPResponse.begin of Python 3.11 with parse_head for parse_headers (a module global it
        # looks up, so no narrower override exists) and without its debuglevel prints.
        if self.headers is not None:
            return
        while True:
            version, status, reason = self._read_status()
            if status != http.client.CONTINUE:
                break
            http.client._read_headers(self.fp)  # a 100 Continue's head, skipped
        self.code = self.status = status
        self.reason = reason.strip()
        if version in ("HTTP/1.0", "HTTP/0.9"):
            self.version = 10
        elif version.startswith("HTTP/1."):
            self.version = 11
        else:
            raise http.client.UnknownProtocol(version)
        self.headers = self.msg = parse_head(self.fp)
        tr_enc = self.headers.get("transfer-encoding")
        if tr_enc and tr_enc.lower() == "chunked":
            self.chunked = True
            self.chunk_left = None
        else:
            self.chunked = False
        self.will_close = self._check_close()
        self.length = None
        length = self.headers.get("content-length")
        if length and not self.chunked:
            try:
                self.length = int(length)
            except ValueError:
                self.length = None
            else:
                if self.length < 0:
                    self.length = None
        else:
            self.length = None
        if (status == http.client.NO_CONTENT or status == http.client.NOT_MODIFIED or 100 <= status < 200
                or self._method == "HEAD"):
            self.length = 0
        if not self.will_close and not self.chunked and self.length is None:
            self.will_close = True


class _Connection(_OneWrite, urllib3.connection.HTTPConnection):
    _plain_socket = True
    response_class = _Response

    @property
    def is_connected(self) -> bool:
        """urllib3's check of a pooled connection before reuse (readable = closed by the upstream, or stray
        bytes: not reusable), as one non-blocking peek instead of a gevent poll object and its watcher."""
        sock = self.sock
        raw = getattr(sock, "_sock", None)  # the OS socket under gevent's; absent without gevent
        if raw is None:
            return super().is_connected
        try:
            raw.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return True  # nothing to read: the connection is open and idle
        except OSError:
            return False  # reset: gone
        return False  # EOF, or bytes nobody asked for


class _TLSConnection(_OneWrite, urllib3.connection.HTTPSConnection):
    response_class = _Response


class _Pool(urllib3.HTTPConnectionPool):
    ConnectionCls = _Connection


class _TLSPool(urllib3.HTTPSConnectionPool):
    ConnectionCls = _TLSConnection


def pool(upstream: UpstreamConfig) -> urllib3.PoolManager:
    """The worker's connection pool for this upstream, made after fork so no socket is shared across processes."""
    p = _pools.get(upstream.name)
    if p is None:
        # block=False: past maxsize, extra connections are opened rather than waited for (docs/runtime.md,
        # "urllib3 (upstream HTTP)").
        # PoolManager reads no proxy variables, so an operator's HTTP_PROXY cannot reroute upstream calls.
        p = urllib3.PoolManager(num_pools=4, maxsize=upstream.pool_size, block=False, retries=False)
        p.pool_classes_by_scheme = {"http": _Pool, "https": _TLSPool}
        _pools[upstream.name] = p
    return p


_targets: dict[tuple[str, str], tuple[urllib3.HTTPConnectionPool, str]] = {}


def _forget_pools() -> None:
    _pools.clear()
    _targets.clear()


# A forked child starts with no pools: a socket shared with the parent would interleave two processes' requests.
os.register_at_fork(after_in_child=_forget_pools)


def _target(upstream: UpstreamConfig, url: str) -> tuple[urllib3.HTTPConnectionPool, str]:
    """The host's connection pool and the request path for a URL, as PoolManager.urlopen would find them.

    PoolManager.urlopen parses the URL and builds a pool key on every call (about 5% of a plain request's CPU);
    the URLs an upstream is called at are few (its routes, its models), so the answer is kept. A pool the
    manager has closed since (evicted) is looked up again.
    """
    manager = pool(upstream)
    found = _targets.get((upstream.name, url))
    if found is None or found[0].pool is None:
        u = urllib3.util.parse_url(url)
        found = (manager.connection_from_host(u.host, u.port, u.scheme), u.request_uri)
        _targets[(upstream.name, url)] = found
    return found


def require_key(upstream: UpstreamConfig) -> str:
    """The upstream's API key, or a 502 that names the environment variable to set."""
    key = upstream.api_key()
    if not key:
        raise UpstreamError(f"The upstream '{upstream.name}' has no API key: set the environment variable "
                            f"{upstream.api_key_env} on the gateway and restart it.")
    return key


class _Answered:
    """A plain answer read by _exchange, in the shape Reply reads from a urllib3 response; its connection is
    already back in the pool (or closed)."""

    def __init__(self, status: int, headers: urllib3.HTTPHeaderDict) -> None:
        self.status = status
        self.headers = headers

    def close(self) -> None:
        pass

    def release_conn(self) -> None:
        pass


def post(upstream: UpstreamConfig, url: str, payload: Any, headers: dict[str, str], *,
         stream: bool = False, timeout: float | None = None) -> Reply:
    """POST JSON; transport failures become 502 (unreachable) or 504 (timed out).

    The answer must come within upstream.deadline_seconds(): all of it for a plain call, its headers for a
    stream (iter_events holds the first byte to the same deadline). A plain answer is read in chunks and is a 502
    past upstream.max_response_bytes, so no upstream can make the gateway buffer without bound.
    """
    # bytes, or an iterator of bytes (a multipart upload streamed from its spool file) sent as they come
    data = payload if isinstance(payload, (bytes, Iterator)) else json.dumps(payload).encode()
    at = time.monotonic() + upstream.deadline_seconds()
    if not stream and isinstance(data, bytes):
        with deadline(upstream, at):
            try:
                host_pool, path = _target(upstream, url)
                status, head, body = _exchange(upstream, host_pool, path, data,
                                               {"Content-Type": "application/json", **headers}, timeout, at)
            except (HTTPError, OSError) as exc:
                raise transport_error(upstream, exc) from None
        return Reply(_Answered(status, head), False, at, body)
    limit = urllib3.Timeout(connect=upstream.connect_timeout_seconds, read=timeout or upstream.timeout_seconds)
    with deadline(upstream, at):
        try:
            host_pool, path = _target(upstream, url)
            resp = host_pool.urlopen("POST", path, body=data, headers={"Content-Type": "application/json", **headers},
                                     preload_content=False, timeout=limit, redirect=False, assert_same_host=False)
        except (HTTPError, OSError) as exc:
            raise transport_error(upstream, exc) from None
        if stream:
            return Reply(resp, True, at)
        try:
            body = _read_body(upstream, resp, at)
        except BaseException:
            resp.close()  # the unread rest makes the connection unusable
            resp.release_conn()
            raise
    resp.release_conn()
    return Reply(resp, False, at, body)


def _read_body(upstream: UpstreamConfig, resp: urllib3.BaseHTTPResponse, at: float) -> bytes:
    """The whole body, counted as it arrives; a 502 past max_response_bytes, a 504 past the deadline."""
    cap = upstream.max_response_bytes
    declared = resp.headers.get("Content-Length", "")
    if declared.isdigit() and len(declared) < 20:
        if int(declared) > cap:
            raise _too_large(upstream)  # said up front: nothing need be read
        # Exactly the declared bytes, at most cap, in one read instead of urllib3's read1 machinery twice (3% of
        # a plain request's CPU); a short body is urllib3's IncompleteRead, a 502 like any broken read. Only under
        # gevent, whose timer (deadline()) interrupts a body that drips; and not for a coded (gzip...) body, which
        # could decode to any size: both are counted chunk by chunk below.
        if _GREEN and resp.headers.get("Content-Encoding", "identity").strip().lower() == "identity":
            try:
                return resp.read()
            except (HTTPError, OSError) as exc:
                raise transport_error(upstream, exc) from None
    parts: list[bytes] = []
    size = 0
    while True:
        try:
            chunk = resp.read1(READ_SIZE)
        except (HTTPError, OSError) as exc:
            raise transport_error(upstream, exc) from None
        if not chunk:
            return b"".join(parts)
        size += len(chunk)
        if size > cap:
            raise _too_large(upstream)
        parts.append(chunk)
        if time.monotonic() > at:  # without gevent (unit tests) the timer cannot interrupt a read; this can
            raise _late(upstream)


# --- A plain call: one exchange on a pooled connection --------------------------------------------------------

MAX_HEAD_BYTES = 65536  # an answer's status line and header fields together
MAX_HEAD_FIELDS = 100  # http.client's limit on an answer's header fields
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_BAD_VALUE = re.compile(r"[\r\n\0]")
_BAD_PATH = re.compile(r"[\x00-\x20\x7f]")
_USER_AGENT = f"User-Agent: python-urllib3/{urllib3.__version__}\r\n".encode()
_STARTS: dict[tuple[str, str, int | None, str], tuple[bytes, bytes]] = {}  # (request line, Host line) by target
_FIELD_LINES: dict[tuple[str, str], bytes] = {}  # "Name: value" + CRLF, by (name, value); bounded


def _request_head(upstream: UpstreamConfig, host_pool: urllib3.HTTPConnectionPool, path: str,
                  headers: dict[str, str], length: int) -> bytes:
    """The bytes urllib3 and http.client send before a POST's bytes body, in their order: the request line,
    Host and Accept-Encoding: identity (unless given), Content-Length, User-Agent (unless given), then the given
    headers. Each line is checked and built once: a name must be a token, a value must be Latin-1 without CR,
    LF or NUL (http.client would let a folded line through; nothing the gateway sends has one)."""
    where = (host_pool.scheme, host_pool.host, host_pool.port, path)
    start = _STARTS.get(where)
    if start is None:
        if _BAD_PATH.search(path) or not path.isascii():
            raise UpstreamError(f"The upstream '{upstream.name}' has a URL path that cannot be sent; check its "
                                "base_url.")
        host = host_pool.host.rstrip(".").encode("idna").decode("ascii")  # as urllib3 sends it
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        if host_pool.port not in (None, 443 if host_pool.scheme == "https" else 80):
            host = f"{host}:{host_pool.port}"
        start = (f"POST {path} HTTP/1.1\r\n".encode("ascii"), f"Host: {host}\r\n".encode("ascii"))
        if len(_STARTS) < MAX_KEPT_LINES:
            _STARTS[where] = start
    given = {name.lower() for name in headers if type(name) is str}
    if given & _FRAMING:
        raise UpstreamError(f"The upstream '{upstream.name}' would get a request framed twice (a Content-Length or "
                            "Transfer-Encoding header besides the body's own).")
    lines = [start[0]]
    if "host" not in given:
        lines.append(start[1])
    if "accept-encoding" not in given:
        lines.append(b"Accept-Encoding: identity\r\n")
    lines.append(b"Content-Length: %d\r\n" % length)
    if "user-agent" not in given:
        lines.append(_USER_AGENT)
    for name, value in headers.items():
        line = _FIELD_LINES.get((name, value)) if type(value) is str else None  # 1 == True as a key
        if line is None:
            line = _field_line(upstream, name, value)
            if type(value) is str and len(_FIELD_LINES) < MAX_KEPT_LINES:
                _FIELD_LINES[(name, value)] = line
        lines.append(line)
    lines.append(b"\r\n")
    return b"".join(lines)


def _field_line(upstream: UpstreamConfig, name: Any, value: Any) -> bytes:
    if type(value) is int:
        value = str(value)  # as http.client sends an int
    if type(name) is str and type(value) is str and _TOKEN.fullmatch(name) and not _BAD_VALUE.search(value):
        try:
            return f"{name}: {value}\r\n".encode("latin-1")
        except UnicodeEncodeError:
            pass
    raise UpstreamError(f"The upstream '{upstream.name}' would get a header {str(name)[:40]!r} that cannot be sent "
                        "(a bad name, or a value with a line break or a character outside Latin-1); check its key "
                        "and settings.")


class _Answer:
    """httptools' callbacks for one upstream answer: its header fields and body as they arrive.

    A 1xx interim answer (100 Continue) is dropped and the next one read. Trailer fields after a chunked body
    are dropped, as http.client drops them. Anything after the answer (a second message, garbage) is ignored
    and marks the connection unfit for reuse.
    """

    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.fields: list[tuple[bytes, bytes]] = []
        self.body: bytes | bytearray = b""  # the first piece as it came; a bytearray once a second one arrives
        self.size = 0
        self.headers_done = False
        self.complete = False
        self.extra = False
        self.keep_alive = False
        self.head_size = 0  # the header fields' bytes, as parsed

    def on_message_begin(self) -> None:
        if self.complete:
            self.extra = True

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.headers_done and not self.complete:  # after the head: a trailer field
            self.fields.append((name, value))
            self.head_size += len(name) + len(value) + 4

    def on_headers_complete(self) -> None:
        if not self.complete:
            self.headers_done = True
            # llhttp answers this only while the message is being parsed (False once it is complete)
            self.keep_alive = self.parser.should_keep_alive()

    def on_body(self, body: bytes) -> None:
        if self.complete:
            return
        if not self.size:
            self.body = body
        else:
            if type(self.body) is bytes:
                self.body = bytearray(self.body)
            self.body += body
        self.size += len(body)

    def on_message_complete(self) -> None:
        if self.complete:
            return
        status = self.parser.get_status_code()
        if 100 <= status < 200 and status != 101:
            self.fields, self.headers_done, self.head_size = [], False, 0  # an interim answer: the real one follows
            return
        self.complete = True


# Requests whose framing _request_head sets itself: a caller's own would frame the body twice.
_FRAMING = frozenset({"content-length", "transfer-encoding"})
# Reads of an answer between two yields to the event loop: gevent's recv returns at once while bytes wait, so an
# upstream that sends fast would otherwise keep every other request of the worker waiting, its deadline too.
YIELD_EVERY_READS = 16


def _exchange(upstream: UpstreamConfig, host_pool: urllib3.HTTPConnectionPool, path: str, data: bytes,
              headers: dict[str, str], timeout: float | None, at: float) -> tuple[int, urllib3.HTTPHeaderDict, bytes]:
    """POST data and read the whole answer on one of the pool's keep-alive connections: (status, headers, body).

    urllib3 keeps the pool, makes and checks the connections (connect timeout, TLS); the request goes out in one
    write, and the answer is parsed as it arrives by httptools (llhttp, the HTTP parser of Node.js), not through
    urllib3's and http.client's request and response objects: 1.19 -> 1.03 ms of CPU per plain request at one
    connection (docs/performance.md, round 5). Bounded as _read_body is: the head at MAX_HEAD_BYTES, the body
    (decoded, if the upstream coded it anyway) at max_response_bytes, a larger declared Content-Length refused
    before its body is read, and the whole exchange by the deadline. A connection is reused only after a
    complete answer that allows keep-alive and nothing after it.
    """
    request = _request_head(upstream, host_pool, path, headers, len(data)) + data
    conn = host_pool._get_conn()  # a pooled connection checked for a close by the upstream, or a new one
    reusable = False
    try:
        if conn.sock is None:
            conn.timeout = upstream.connect_timeout_seconds
            conn.connect()
        sock = conn.sock
        sock.settimeout(timeout or upstream.timeout_seconds)
        sent = True
        try:
            if conn._plain_socket:
                send_all(sock, request)
            else:
                sock.sendall(request)
        except (BrokenPipeError, ConnectionResetError):
            # The upstream may have answered early (a 413, a 429) and closed: read that answer, as urllib3 does.
            sent = False
        status, head, body, reusable = _read_answer(upstream, sock, at)
        reusable = reusable and sent
    finally:
        if not reusable:
            conn.close()
        host_pool._put_conn(conn)
    return status, head, body


def _read_answer(upstream: UpstreamConfig, sock: socket.socket, at: float
                 ) -> tuple[int, urllib3.HTTPHeaderDict, bytes, bool]:
    answer = _Answer()
    parser = answer.parser
    cap = upstream.max_response_bytes
    buf = bytearray(READ_SIZE)
    view = memoryview(buf)
    head_bytes = 0  # fed before the head was complete
    fed = 0  # all of the answer's bytes so far
    bare = 0  # fed after the head since the last read that carried body bytes: chunk lines, trailers
    to_close = False  # a body without a length or chunking: it ends when the upstream closes
    reads = 0
    while not answer.complete:
        n = sock.recv_into(buf)
        if not n:
            if to_close:
                break
            raise UpstreamError(f"The upstream '{upstream.name}' closed the connection before its answer was "
                                "complete.")
        headers_before, size_before = answer.headers_done, answer.size
        try:
            parser.feed_data(view[:n])
        except httptools.HttpParserUpgrade:
            # 101 Switching Protocols: an answer the gateway never asked for; relayed as its status (a 502), and
            # the connection, now speaking something else, is not reused
            if not answer.headers_done:
                raise UpstreamError(f"The upstream '{upstream.name}' sent an answer that is not valid HTTP.") \
                    from None
            answer.complete = answer.extra = True
        except httptools.HttpParserError:
            if not answer.complete:
                raise UpstreamError(f"The upstream '{upstream.name}' sent an answer that is not valid HTTP.") \
                    from None
            answer.extra = True  # garbage after a complete answer
        if not headers_before:
            head_bytes += n
            # bytes fed while the head was incomplete bound what httptools buffers of a field; head_size catches a
            # head that completed over the limit within one read
            if len(answer.fields) > MAX_HEAD_FIELDS or answer.head_size > MAX_HEAD_BYTES or (
                    not answer.headers_done and head_bytes > MAX_HEAD_BYTES):
                raise UpstreamError(f"The upstream '{upstream.name}' sent an answer head over its limits "
                                    f"({MAX_HEAD_FIELDS} fields, {MAX_HEAD_BYTES} bytes).")
            if answer.headers_done:
                length, chunked, other = _framing(answer.fields)
                if other:
                    raise UpstreamError(f"The upstream '{upstream.name}' sent a transfer coding the gateway does "
                                        "not read.")
                if length is not None and length > cap:
                    raise _too_large(upstream)  # said up front: its body is not read
                to_close = length is None and not chunked and parser.get_status_code() not in (204, 304)
        else:
            bare = 0 if answer.size > size_before else bare + n
        fed += n
        if answer.size > cap:
            raise _too_large(upstream)
        # Chunk lines may not outgrow the body they frame (past the head's allowance), and bytes that carry no
        # body (a trailer, which httptools buffers whole with a copy per read; an endless chunk extension) stop
        # at the head's limit.
        if fed - answer.size > 2 * MAX_HEAD_BYTES + answer.size or bare > MAX_HEAD_BYTES:
            raise UpstreamError(f"The upstream '{upstream.name}' sent a chunked answer whose framing is over its "
                                "limits.")
        if time.monotonic() > at:
            raise _late(upstream)
        reads += 1
        if _GREEN and not reads % YIELD_EVERY_READS:
            gevent.sleep(0)
    head = urllib3.HTTPHeaderDict()
    for name, value in answer.fields:
        head.add(name.decode("latin-1"), value.decode("latin-1"))
    body = answer.body if type(answer.body) is bytes else bytes(answer.body)
    coding = head.get("Content-Encoding")
    if coding is not None and coding.strip().lower() not in ("", "identity"):
        body = _decoded(upstream, coding, body)
    reusable = answer.complete and not answer.extra and not to_close and answer.keep_alive
    return parser.get_status_code(), head, body, reusable


def _framing(fields: list[tuple[bytes, bytes]]) -> tuple[int | None, bool, bool]:
    """(the declared Content-Length, whether the body is chunked, whether another transfer coding is named);
    llhttp has already refused conflicting lengths and a length beside chunking."""
    length, chunked, other = None, False, False
    for name, value in fields:
        lowered = name.lower()
        if lowered == b"content-length" and value.strip().isdigit():
            length = int(value.strip())
        elif lowered == b"transfer-encoding":
            for coding in value.lower().split(b","):
                coding = coding.strip()
                if coding == b"chunked":
                    chunked = True
                elif coding:
                    other = True
    return length, chunked, other


def _decoded(upstream: UpstreamConfig, coding: str, body: bytes) -> bytes:
    """A body the upstream coded although the gateway asked for identity: gzip (every member) and deflate
    decoded as urllib3 would, to at most max_response_bytes (a small bomb must not become a large answer); a
    coding urllib3 has no decoder for here is left as it came."""
    cap = upstream.max_response_bytes
    for name in reversed([c.strip() for c in coding.lower().split(",") if c.strip()]):
        if name == "identity":
            continue
        if name not in ("gzip", "x-gzip", "deflate"):
            return body
        try:
            body = _gunzip(body, cap) if name != "deflate" else _inflate(body, cap)
        except zlib.error:
            raise UpstreamError(f"The upstream '{upstream.name}' sent a {name} body that does not decode.") from None
        if len(body) > cap:
            raise _too_large(upstream)
    return body


def _gunzip(data: bytes, cap: int) -> bytes:
    """Every gzip member of data, to at most cap + 1 bytes (the caller refuses more)."""
    out = bytearray()
    while data and len(out) <= cap:
        member = zlib.decompressobj(16 + zlib.MAX_WBITS)
        out += member.decompress(data, cap + 1 - len(out))
        if member.unconsumed_tail:
            break  # the output is already past the cap
        data = member.unused_data
    return bytes(out)


def _inflate(data: bytes, cap: int) -> bytes:
    """A deflate body: zlib-wrapped as the standard says, or raw as some servers send it."""
    try:
        return zlib.decompressobj(zlib.MAX_WBITS).decompress(data, cap + 1)
    except zlib.error:
        return zlib.decompressobj(-zlib.MAX_WBITS).decompress(data, cap + 1)


def transport_error(upstream: UpstreamConfig, exc: Exception) -> GatewayError:
    """A failed connection or read as the gateway's 504 (timed out) or 502 (anything else)."""
    reason = exc.reason if isinstance(exc, MaxRetryError) else exc
    # NewConnectionError subclasses ConnectTimeoutError in urllib3, but a refused connection is no timeout.
    if isinstance(reason, NewConnectionError) and "timed out" not in str(reason).lower():
        return UpstreamError(f"The upstream '{upstream.name}' could not be reached (connection failed).")
    if isinstance(reason, (Urllib3Timeout, TimeoutError)) or "timed out" in str(reason).lower():
        return UpstreamTimeoutError(f"The upstream '{upstream.name}' did not answer in time.")
    return UpstreamError(f"The upstream '{upstream.name}' could not be reached ({type(reason).__name__}).")


def retry_after_seconds(value: str | None) -> str | None:
    """A Retry-After value worth relaying: whole seconds, at least 1 and at most a day; None for nonsense."""
    if not value or len(value) > 32:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None  # an HTTP date, or garbage: the client decides for itself
    if not math.isfinite(seconds):
        return None  # "inf" and "nan" parse as floats but are no delay
    return str(min(MAX_RETRY_AFTER, max(1, math.ceil(seconds))))


def status_error(upstream: UpstreamConfig, status: int, message: str, *, code: str | None = None,
                 param: str | None = None, retry_after: str | None = None) -> GatewayError:
    """Map an upstream's HTTP error to the gateway's; the upstream's message is scrubbed and cut short here."""
    message = scrub(message, upstream)
    code = scrub(code, upstream, 100) if code else None
    param = scrub(param, upstream, 100) if param else None
    if status in (400, 422):
        return BadRequestError(message, status=status, code=code, param=param)
    if status == 404:
        return ModelNotFoundError(message, code=code or "model_not_found", param=param)
    if status == 429:
        headers = {"Retry-After": retry_after} if retry_after else {}
        return RateLimitError(message, headers=headers, code=code or "rate_limit_exceeded")
    if status in (401, 403):
        return UpstreamError(f"The upstream '{upstream.name}' refused the gateway's credentials "
                             f"(HTTP {status}); the operator must check {upstream.api_key_env}.")
    if status == 504:
        return UpstreamTimeoutError(f"The upstream '{upstream.name}' timed out: {message}")
    return UpstreamError(f"The upstream '{upstream.name}' failed with HTTP {status}: {message}")
