"""A plain upstream call's exchange (providers/http._exchange): the bytes it sends, and what it makes of every
kind of answer a real or hostile upstream can give, against a raw socket server on 127.0.0.1."""
from __future__ import annotations

import gzip
import json
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

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
    without reading further, "early" answers as soon as the request's head is read and closes (its body
    unread), "drip" writes the answer a byte every 20 ms, "flood" writes chunks of a body that never ends.
    Records the connections and the raw requests."""

    def __init__(self, answers: list, tls: ssl.SSLContext | None = None) -> None:
        self.answers = list(answers)
        self.tls = tls
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

    def _handshake(self, conn: socket.socket) -> socket.socket:
        return self.tls.wrap_socket(conn, server_side=True) if self.tls else conn

    def _serve(self, conn: socket.socket) -> None:
        buf = b""
        try:
            conn = self._handshake(conn)
            while True:
                while b"\r\n\r\n" not in buf:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    buf += chunk
                head, _, rest = buf.partition(b"\r\n\r\n")
                length = int(next(line.split(b":", 1)[1] for line in head.split(b"\r\n")
                                  if line.lower().startswith(b"content-length:")))
                if self.answers and isinstance(self.answers[0], tuple) and self.answers[0][1] == "early":
                    self.requests.append(head)
                    conn.sendall(self.answers.pop(0)[0])
                    return
                while len(rest) < length:
                    rest += conn.recv(65536)
                self.requests.append(head + b"\r\n\r\n" + rest[:length])
                buf = rest[length:]
                answer = self.answers.pop(0)
                data, action = answer if isinstance(answer, tuple) else (answer, "")
                if action == "flood":  # endless 64 KiB chunks until the client goes
                    conn.sendall(data)
                    chunk = b"10000\r\n" + b"z" * 65536 + b"\r\n"
                    while not self.stop.is_set():
                        conn.sendall(chunk)
                if action == "drip":
                    for i in range(len(data)):
                        if self.stop.wait(0.02):
                            return
                        conn.sendall(data[i:i + 1])
                    continue
                conn.sendall(data)
                if action == "close":
                    return
                if action == "hang":
                    self.held.append(conn)
                    self.stop.wait(30)
                    return
        except OSError:
            return  # the client went (a refused answer, a deadline): its side is what the test checks
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

    def make(answers: list, tls: ssl.SSLContext | None = None, **settings) -> tuple[RawUpstream, UpstreamConfig]:
        server = RawUpstream(answers, tls)
        servers.append(server)
        scheme = "https" if tls else "http"
        up = UpstreamConfig(name=f"raw{server.port}", kind="openai",
                            base_url=f"{scheme}://127.0.0.1:{server.port}/v1", **settings)
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
], ids=["one-long-field", "101-fields"])
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
    ("gzip", gzip.compress(JSON, mtime=0)),  # a fixed mtime: xdist workers must collect the same test ids
    ("deflate", zlib.compress(JSON)),
    ("deflate", zlib.compress(JSON)[2:-4]),  # raw deflate, as some servers send it
    ("identity", JSON),
], ids=["gzip", "deflate", "raw-deflate", "identity"])
def test_coded_answer_is_decoded(serve, coding, data) -> None:
    _, up = serve([ok(data, f"Content-Encoding: {coding}\r\n")])
    assert call(up).content == JSON


def test_coded_answer_decoding_past_the_limit_is_a_502(serve) -> None:
    bomb = gzip.compress(b"\0" * 200_000, mtime=0)  # about 200 bytes that decode to 200 KB
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



def test_trailer_fields_are_dropped(serve) -> None:
    chunked = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-Head: 1\r\n\r\n"
               b"7\r\n{\"a\":1}\r\n0\r\nContent-Encoding: gzip\r\nRetry-After: 3600\r\n\r\n")
    server, up = serve([chunked, ok()])
    reply = call(up)
    assert reply.json() == {"a": 1}  # the trailer's Content-Encoding did not make it a gzip body
    assert reply.headers["x-head"] == "1" and "retry-after" not in reply.headers
    call(up)
    assert server.connections == 1


@pytest.mark.parametrize("tail", [
    b"0\r\nX-Big: " + b"v" * 200_000,  # one endless trailer field
    b"0\r\n" + b"a: b\r\n" * 40_000,  # many small ones
    b"5;" + b"e" * 200_000,  # an endless chunk extension
], ids=["endless-trailer", "many-trailers", "endless-extension"])
def test_bytes_that_carry_no_body_are_bounded(serve, tail) -> None:
    _, up = serve([(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n7\r\n{\"a\":1}\r\n" + tail, "hang")])
    with pytest.raises(UpstreamError, match="framing is over its limits"):
        call(up)


def test_tiny_chunks_are_bounded_and_normal_chunks_are_not(serve) -> None:
    tiny = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + b"1\r\na\r\n" * 60_000 + b"0\r\n\r\n"
    normal = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + (b"64\r\n" + b"b" * 100 + b"\r\n") * 2000
    _, up = serve([(tiny, "hang"), normal + b"0\r\n\r\n"])
    with pytest.raises(UpstreamError, match="framing is over its limits"):
        call(up)
    assert call(up).content == b"b" * 200_000


def test_switching_protocols_is_its_status_and_the_connection_is_dropped(serve) -> None:
    server, up = serve([b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\nxx",
                        ok()])
    assert call(up).status_code == 101  # the provider turns any status but 200 into a 502
    call(up)
    assert server.connections == 2


def test_an_early_answer_to_a_large_body_is_read(serve) -> None:
    early = (b"HTTP/1.1 413 Payload Too Large\r\nConnection: close\r\nContent-Length: 27\r\n\r\n"
             b'{"error":{"message":"big"}}')
    _, up = serve([(early, "early")])
    reply = gw_http.post(up, up.base_url + "/chat/completions", {"input": "x" * 8_000_000},
                         {"Authorization": "Bearer sk-up"})
    assert (reply.status_code, reply.json()) == (413, {"error": {"message": "big"}})


@pytest.mark.parametrize("name", ["Content-Length", "transfer-encoding"])
def test_a_request_framed_twice_is_refused(serve, name) -> None:
    server, up = serve([ok()])
    with pytest.raises(UpstreamError, match="framed twice"):
        call(up, {name: "chunked" if "transfer" in name else "5"})
    assert server.requests == []


def test_host_is_sent_as_urllib3_sends_it() -> None:
    up = UpstreamConfig(name="h", kind="openai", base_url="http://api.example.com./v1")
    for host, port, line in [("api.example.com.", 80, b"Host: api.example.com\r\n"),
                             ("::1", 8080, b"Host: [::1]:8080\r\n"), ("b\u00fccher.example", 443, None)]:
        pool = urllib3.HTTPSConnectionPool(host, port) if port == 443 else urllib3.HTTPConnectionPool(host, port)
        head = gw_http._request_head(up, pool, "/v1/x", {}, 0)
        assert head.split(b"\r\n")[1] + b"\r\n" == (line or b"Host: xn--bcher-kva.example\r\n")


def test_every_gzip_member_is_decoded(serve) -> None:
    _, up = serve([ok(gzip.compress(b'{"a":') + gzip.compress(b"1}"), "Content-Encoding: gzip\r\n")])
    assert call(up).json() == {"a": 1}


def test_a_transfer_coding_other_than_chunked_is_a_502(serve) -> None:
    body = gzip.compress(JSON)
    coded = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    _, up = serve([coded])
    with pytest.raises(UpstreamError, match="transfer coding"):
        call(up)


def test_an_answer_that_drips_stops_at_the_deadline(serve) -> None:
    _, up = serve([(ok(b"x" * 1000), "drip")], timeout_seconds=5, total_timeout_seconds=0.5)
    started = time.monotonic()
    with pytest.raises(UpstreamTimeoutError):
        call(up)
    assert time.monotonic() - started < 2


UNDER_GEVENT = """
from gevent import monkey
monkey.patch_all()
import json, sys, time
import gevent
sys.path.insert(0, {root!r})
from config import UpstreamConfig
from errors import GatewayError
from providers import http

up = UpstreamConfig(name="flood", kind="openai", base_url=sys.argv[1], timeout_seconds=5, total_timeout_seconds=0.25,
                    max_response_bytes=1 << 40)
gaps = [0.0]

def ticker():  # the hub's longest stall while the call runs
    while True:
        t = time.monotonic()
        gevent.sleep(0.005)
        gaps.append(time.monotonic() - t - 0.005)

gevent.spawn(ticker)
start = time.monotonic()
try:
    http.post(up, sys.argv[1] + "/chat/completions", {{"model": "m"}}, {{}})
    outcome = "answered"
except GatewayError as exc:
    outcome = f"{{exc.status}} {{exc.message}}"
print(json.dumps({{"outcome": outcome, "seconds": time.monotonic() - start, "stall": max(gaps)}}))
"""


def test_under_gevent_a_flooding_upstream_stops_at_the_deadline_and_never_stalls_the_worker(serve, tmp_path) -> None:
    # Body bytes as fast as loopback carries them (for 0.25 s: a few hundred MB), under a cap they never reach:
    # gevent's recv returns at once while bytes wait, so only the loop's yields let the deadline's timer and
    # the worker's other greenlets run.
    server, up = serve([(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", "flood")])
    script = tmp_path / "flood.py"
    script.write_text(UNDER_GEVENT.format(root=str(Path(gw_http.__file__).resolve().parent.parent)))
    out = subprocess.run([sys.executable, str(script), up.base_url], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["outcome"].startswith("504 "), result
    # Bounds far from both outcomes (a 0.25 s deadline; 33 s and a 33 s stall without the yields), so that a
    # loaded machine, which delays the subprocess itself, cannot fail them.
    assert result["seconds"] < 3, result
    assert result["stall"] < 1, result


@pytest.fixture(scope="module")
def tls_context(tmp_path_factory: pytest.TempPathFactory) -> tuple[ssl.SSLContext, str]:
    if not shutil.which("openssl"):
        pytest.skip("openssl is needed to make a test certificate")
    tmp = tmp_path_factory.mktemp("tls")
    cert, key = str(tmp / "cert.pem"), str(tmp / "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-days", "1", "-subj", "/CN=127.0.0.1", "-keyout", key, "-out", cert,
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    return context, cert


def test_tls_upstream_is_verified_and_its_connection_reused(serve, tls_context, monkeypatch) -> None:
    context, cert = tls_context
    monkeypatch.setenv("SSL_CERT_FILE", cert)  # trust the test certificate (urllib3 loads the default paths)
    chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n{\"a\":\r\n3\r\n12}\r\n0\r\n\r\n"
    server, up = serve([ok(b'{"n":1}'), chunked], tls=context)
    assert call(up).json() == {"n": 1}
    assert call(up).json() == {"a": 12}
    assert server.connections == 1
    assert server.requests[0].startswith(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:")


def test_tls_upstream_with_an_untrusted_certificate_is_a_502(serve, tls_context) -> None:
    context, _ = tls_context
    server, up = serve([ok()], tls=context)
    with pytest.raises(UpstreamError, match="could not be reached"):
        call(up)
    assert server.requests == []
