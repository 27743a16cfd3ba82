"""A plain upstream call's exchange (providers/http._exchange): the bytes it sends, and what it makes of every
kind of answer a real or hostile upstream can give, against a raw socket server on 127.0.0.1."""
from __future__ import annotations

import gzip
import socket
import threading
import time
import zlib
from collections.abc import Iterator

import pytest
import urllib3

from config import UpstreamConfig
from errors import UpstreamError, UpstreamTimeoutError
from providers import http as gw_http

BODY = {"model": "gpt-4.1-mini", "messages": [{"role": "user", "content": "hi"}]}
JSON = b'{"id":"chatcmpl-1","object":"chat.completion"}'


def ok(body: bytes = JSON, extra: str = "") -> bytes:
    return (f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n{extra}\r\n"
            .encode() + body)


class RawUpstream:
    """Answers the n-th request it reads (over all connections) with answers[n]: raw bytes, written as given.
    An answer may be a tuple (bytes, action): "close" closes the connection after it, "hang" keeps it open
    without reading further. Records the connections and the raw requests."""

    def __init__(self, answers: list) -> None:
        self.answers = list(answers)
        self.requests: list[bytes] = []
        self.connections = 0
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.stop = threading.Event()
        self.held: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        buf = b""
        try:
            while True:
                while b"\r\n\r\n" not in buf:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    buf += chunk
                head, _, rest = buf.partition(b"\r\n\r\n")
                length = int(next(line.split(b":", 1)[1] for line in head.split(b"\r\n")
                                  if line.lower().startswith(b"content-length:")))
                while len(rest) < length:
                    rest += conn.recv(65536)
                self.requests.append(head + b"\r\n\r\n" + rest[:length])
                buf = rest[length:]
                answer = self.answers.pop(0)
                data, action = answer if isinstance(answer, tuple) else (answer, "")
                conn.sendall(data)
                if action == "close":
                    return
                if action == "hang":
                    self.held.append(conn)
                    self.stop.wait(30)
                    return
        finally:
            if conn not in self.held:
                conn.close()

    def close(self) -> None:
        self.stop.set()
        self.sock.close()
        for conn in self.held:
            conn.close()


@pytest.fixture
def serve() -> Iterator:
    servers: list[RawUpstream] = []

    def make(answers: list, **settings) -> tuple[RawUpstream, UpstreamConfig]:
        server = RawUpstream(answers)
        servers.append(server)
        up = UpstreamConfig(name=f"raw{server.port}", kind="openai", base_url=f"http://127.0.0.1:{server.port}/v1",
                            **settings)
        return server, up
    yield make
    for server in servers:
        server.close()
    gw_http._forget_pools()


def call(up: UpstreamConfig, headers: dict | None = None) -> gw_http.Reply:
    return gw_http.post(up, up.base_url + "/chat/completions", BODY, headers or {"Authorization": "Bearer sk-up"})


def test_request_bytes_are_urllib3s(serve) -> None:
    server, up = serve([ok(), ok()])
    call(up)
    call(up, {"Authorization": "Bearer sk-up", "User-Agent": "mine/1", "X-Int": 7})
    # What urllib3 sends for the same call, through a socket pair
    given = ({"Authorization": "Bearer sk-up"}, {"Authorization": "Bearer sk-up", "User-Agent": "mine/1", "X-Int": 7})
    for sent, headers in zip(server.requests, given, strict=True):
        a, b = socket.socketpair()
        conn = urllib3.connection.HTTPConnection("127.0.0.1", server.port)
        conn.sock = a
        body = sent.partition(b"\r\n\r\n")[2]
        conn.request("POST", "/v1/chat/completions", body=body,
                     headers={"Content-Type": "application/json", **headers})
        a.shutdown(socket.SHUT_WR)
        expected = b""
        while chunk := b.recv(65536):
            expected += chunk
        a.close()
        b.close()
        assert sent == expected


@pytest.mark.parametrize("name, value", [
    ("Authorization", "Bearer sk-a\r\nX-Injected: 1"), ("Authorization", "Bearer sk-a\nX: 1"), ("X\r\nY", "v"),
    ("Bad:Name", "v"), (" Lead", "v"), ("X-Null", "a\0b"), ("X-Wide", "\u2603"), ("X-Bool", True),
])
def test_a_header_that_cannot_be_sent_is_a_502_and_nothing_is_sent(serve, name, value) -> None:
    server, up = serve([ok()])
    for _ in range(2):  # never kept as a good line
        with pytest.raises(UpstreamError, match="cannot be sent"):
            call(up, {name: value})
    assert server.requests == []


def test_keep_alive_connection_is_reused(serve) -> None:
    server, up = serve([ok(b'{"n":1}'), ok(b'{"n":2}'), ok(b'{"n":3}')])
    assert [call(up).json()["n"] for _ in range(3)] == [1, 2, 3]
    assert server.connections == 1


def test_headers_are_case_insensitive_and_keep_repeats(serve) -> None:
    _, up = serve([ok(extra="Retry-After: 7\r\nX-Two: a\r\nX-Two: b\r\n")])
    reply = call(up)
    assert reply.status_code == 200
    assert reply.headers["retry-after"] == "7"
    assert reply.headers.getlist("x-two") == ["a", "b"]


def test_chunked_answer(serve) -> None:
    chunked = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"5\r\n{\"a\":\r\n3\r\n12}\r\n0\r\n\r\n")
    server, up = serve([chunked, ok()])
    assert call(up).json() == {"a": 12}
    call(up)
    assert server.connections == 1


def test_interim_100_continue_is_skipped(serve) -> None:
    _, up = serve([b"HTTP/1.1 100 Continue\r\n\r\n" + ok(b'{"final":true}', "X-Real: 1\r\n")])
    reply = call(up)
    assert reply.json() == {"final": True}
    assert reply.headers["x-real"] == "1"


def test_answer_ended_by_close_is_read_whole_and_the_connection_not_reused(serve) -> None:
    server, up = serve([(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n" + JSON, "close"), ok()])
    assert call(up).content == JSON
    call(up)
    assert server.connections == 2


@pytest.mark.parametrize("answer", [
    ok(extra="Connection: close\r\n"),
    ok().replace(b"HTTP/1.1", b"HTTP/1.0"),
    ok() + b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",  # a second answer nobody asked for
    ok() + b"garbage",
])
def test_connection_not_reused_when_the_answer_forbids_it_or_more_follows(serve, answer) -> None:
    server, up = serve([answer, ok(b'{"second":1}')])
    assert call(up).content == JSON
    assert call(up).json() == {"second": 1}
    assert server.connections == 2


def test_upstream_that_closed_an_idle_connection_gets_a_new_one(serve) -> None:
    server, up = serve([(ok(), "close"), ok(b'{"again":1}')])
    call(up)
    time.sleep(0.1)  # its close has arrived (a close racing the next request is a 502, as with urllib3's own path)
    assert call(up).json() == {"again": 1}
    assert server.connections == 2


def test_declared_length_over_the_limit_is_refused_before_its_body(serve) -> None:
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 5000\r\n\r\n"
    _, up = serve([(head, "hang")], max_response_bytes=1000, timeout_seconds=20)
    with pytest.raises(UpstreamError, match="larger than its limit of 1000 bytes"):
        call(up)  # does not wait for the 5,000 bytes that never come


def test_chunked_body_over_the_limit_is_a_502(serve) -> None:
    chunk = b"%x\r\n%s\r\n" % (600, b"x" * 600)
    _, up = serve([(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunk * 3, "hang")],
                  max_response_bytes=1000)
    with pytest.raises(UpstreamError, match="larger than its limit"):
        call(up)


def test_body_without_length_over_the_limit_is_a_502(serve) -> None:
    _, up = serve([(b"HTTP/1.1 200 OK\r\n\r\n" + b"x" * 5000, "hang")], max_response_bytes=1000)
    with pytest.raises(UpstreamError, match="larger than its limit"):
        call(up)


@pytest.mark.parametrize("head", [
    b"HTTP/1.1 200 OK\r\n" + b"X-Big: " + b"a" * 70000 + b"\r\n\r\n",
    b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(101)) + b"Content-Length: 0\r\n\r\n",
])
def test_answer_head_over_its_limits_is_a_502(serve, head) -> None:
    _, up = serve([(head, "hang")])
    with pytest.raises(UpstreamError, match="head over its limits"):
        call(up)


@pytest.mark.parametrize("answer", [
    b"HELLO THERE\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
    b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"HTTP/1.1 200 OK\r\nBad Header\r\n\r\n",
])
def test_answer_that_is_not_valid_http_is_a_502(serve, answer) -> None:
    _, up = serve([(answer, "hang")])
    with pytest.raises(UpstreamError, match="not valid HTTP"):
        call(up)


@pytest.mark.parametrize("answer", [b"", b"HTTP/1.1 200 OK\r\nContent-Len", ok()[:-5]])
def test_upstream_closing_before_the_answer_is_complete_is_a_502(serve, answer) -> None:
    _, up = serve([(answer, "close")])
    with pytest.raises(UpstreamError, match="closed the connection before its answer was complete"):
        call(up)


def test_silent_upstream_is_a_504(serve) -> None:
    _, up = serve([(b"HTTP/1.1 200 OK\r\n", "hang")], timeout_seconds=0.3)
    with pytest.raises(UpstreamTimeoutError):
        call(up)


def test_refused_connection_is_a_502() -> None:
    port = socket.create_server(("127.0.0.1", 0))
    free = port.getsockname()[1]
    port.close()
    up = UpstreamConfig(name="gone", kind="openai", base_url=f"http://127.0.0.1:{free}/v1")
    with pytest.raises(UpstreamError, match="could not be reached"):
        call(up)
    gw_http._forget_pools()


@pytest.mark.parametrize("coding, data", [
    ("gzip", gzip.compress(JSON)),
    ("deflate", zlib.compress(JSON)),
    ("deflate", zlib.compress(JSON)[2:-4]),  # raw deflate, as some servers send it
    ("identity", JSON),
])
def test_coded_answer_is_decoded(serve, coding, data) -> None:
    _, up = serve([ok(data, f"Content-Encoding: {coding}\r\n")])
    assert call(up).content == JSON


def test_coded_answer_decoding_past_the_limit_is_a_502(serve) -> None:
    bomb = gzip.compress(b"\0" * 200_000)  # about 200 bytes that decode to 200 KB
    _, up = serve([ok(bomb, "Content-Encoding: gzip\r\n")], max_response_bytes=10_000)
    assert len(bomb) < 10_000
    with pytest.raises(UpstreamError, match="larger than its limit"):
        call(up)


def test_coded_answer_that_does_not_decode_is_a_502(serve) -> None:
    _, up = serve([ok(b"not gzip at all", "Content-Encoding: gzip\r\n")])
    with pytest.raises(UpstreamError, match="does not decode"):
        call(up)


def test_a_coding_without_a_decoder_is_passed_as_it_came(serve) -> None:
    _, up = serve([ok(b"\x1b\x00br", "Content-Encoding: br\r\n")])
    assert call(up).content == b"\x1b\x00br"


def test_error_status_and_its_body_are_returned(serve) -> None:
    _, up = serve([b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 3\r\nContent-Length: 2\r\n\r\n{}"])
    reply = call(up)
    assert (reply.status_code, reply.content, reply.headers["Retry-After"]) == (429, b"{}", "3")

