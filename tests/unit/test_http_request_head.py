"""The upstream connection's request head: byte for byte what urllib3 and http.client send, first and later calls."""
from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
import urllib3

from providers import http as gw_http

BODY = b'{"model":"gpt-4.1-mini","messages":[{"role":"user","content":"hi"}]}'


def _sent(conn_cls: type, headers: dict, body: bytes = BODY) -> bytes:
    a, b = socket.socketpair()
    try:
        conn = conn_cls("upstream.example", 8443)
        conn.sock = a
        conn.request("POST", "/v1/chat/completions", body=body, headers=headers, preload_content=False)
        a.shutdown(socket.SHUT_WR)
        out = b""
        while chunk := b.recv(65536):
            out += chunk
        return out
    finally:
        a.close()
        b.close()


@pytest.fixture(autouse=True)
def _fresh_lines() -> Iterator[None]:
    gw_http._LINES.clear()
    yield
    gw_http._LINES.clear()


@pytest.mark.parametrize("headers", [
    {"Content-Type": "application/json", "Authorization": "Bearer sk-upstream-key"},
    {"Content-Type": "application/json", "Authorization": "Bearer sk-k", "Accept-Encoding": "identity",
     "Accept": "text/event-stream"},
    {"Content-Type": "application/json", "x-goog-api-key": "AIza-key", "User-Agent": "custom/1",
     "Host": "other.example", "X-Latin": "caf\xe9", "X-Int": 7},
])
def test_same_bytes_as_urllib3_every_time(headers: dict) -> None:
    expected = _sent(urllib3.connection.HTTPConnection, headers)
    assert b"Content-Length: %d\r\n" % len(BODY) in expected
    assert _sent(gw_http._Connection, headers) == expected  # lines checked and kept
    assert gw_http._LINES  # the second call below reuses them
    assert _sent(gw_http._Connection, headers) == expected
    other = BODY + b" " * 1234  # another length
    assert _sent(gw_http._Connection, headers, other) == _sent(urllib3.connection.HTTPConnection, headers, other)


@pytest.mark.parametrize("name, value", [
    ("Authorization", "Bearer sk-a\r\nX-Injected: 1"),
    ("Authorization", "Bearer sk-a\nX-Injected: 1"),
    (" Lead", "v"),
    ("X\r\nY", "v"),
    ("Bad:Name", "v"),
    ("Content-Length", "12\r\nX: 1"),
])
def test_bad_header_lines_raise_every_time_and_are_never_kept(name: str, value: str) -> None:
    for _ in range(2):
        with pytest.raises(ValueError):
            _sent(gw_http._Connection, {"Content-Type": "application/json", name: value})
    assert all(line.count(b"\n") == 0 and b"X-Injected" not in line for line in gw_http._LINES.values())
    assert (name, value) not in gw_http._LINES


def test_kept_lines_are_bounded() -> None:
    for i in range(gw_http.MAX_KEPT_LINES + 50):
        _sent(gw_http._Connection, {"X-Seq": str(i)})
    assert len(gw_http._LINES) == gw_http.MAX_KEPT_LINES
    last = str(gw_http.MAX_KEPT_LINES + 49)
    assert b"X-Seq: " + last.encode() in _sent(gw_http._Connection, {"X-Seq": last})


def test_values_other_than_str_are_sent_as_http_client_sends_them() -> None:
    # 1, 1.0 and True are equal as dict keys; each must still be sent (or refused) as http.client does.
    assert b"X-N: 1\r\n" in _sent(gw_http._Connection, {"X-N": 1})
    assert b"X-N: True\r\n" in _sent(gw_http._Connection, {"X-N": True})
    assert b"X-N: 1\r\n" in _sent(gw_http._Connection, {"X-N": "1"})
    with pytest.raises(TypeError):
        _sent(urllib3.connection.HTTPConnection, {"X-N": 1.0})
    with pytest.raises(TypeError):
        _sent(gw_http._Connection, {"X-N": 1.0})
    assert not any(type(key[1]) is not str for key in gw_http._LINES)
