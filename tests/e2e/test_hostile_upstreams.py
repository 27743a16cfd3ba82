"""Hostile upstreams through the real gunicorn + gevent gateway: no upstream (an unending event, CRLF split reads,
a drip, an oversized answer) freezes a worker or costs the client anything."""
from __future__ import annotations

import json
import threading
import time

import pytest
import requests

from tests.checks import assert_free, sse_error

NANO = 10**9


def _post(gw, secret: str, path: str, body: dict, **kw) -> requests.Response:
    return requests.post(f"{gw.base_url}/{path}", headers={"Authorization": f"Bearer {secret}"}, json=body,
                         timeout=60, **kw)


# The upstream key never reaches a client.

# Imagen's :predict answers carry no model text, so only generateContent has the no-image echo.
# No upstream freezes a worker.

def test_an_unending_event_is_a_502_while_health_stays_fast(gateway):
    key_id, secret = gateway.create_key("1")
    worst: list[float] = []
    done = threading.Event()

    def probe() -> None:
        while not done.is_set():
            started = time.monotonic()
            requests.get(f"{gateway.url}/health", timeout=30)
            worst.append(time.monotonic() - started)
            time.sleep(0.02)

    prober = threading.Thread(target=probe)
    prober.start()
    started = time.monotonic()
    try:
        r = _post(gateway, secret, "chat/completions",
                  {"model": "gpt-test", "stream": True,
                   "messages": [{"role": "user", "content": "hi [huge-event=30]"}]})
        elapsed = time.monotonic() - started
        text = r.text
    finally:
        done.set()
        prober.join()
    error = sse_error(text)
    assert error["code"] == "upstream_error" and "larger than" in error["message"]
    assert elapsed < 15  # stopped at the 4 MiB cap, not after 30 MiB (60 MiB got the worker killed before)
    assert max(worst) < 1.5, worst  # 10 MiB used to stall /health for 2 s
    assert_free(gateway, key_id, NANO, 502)


def test_a_crlf_stream_split_inside_every_line_ending_succeeds(gateway):
    key_id, secret = gateway.create_key("1")
    stream = gateway.client(secret).chat.completions.create(
        model="gpt-test", stream=True, stream_options={"include_usage": True},
        messages=[{"role": "user", "content": "hi [crlf]"}])
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "tok0 tok1 tok2 tok3 "
    assert chunks[-1].usage.prompt_tokens == 11 and chunks[-1].usage.completion_tokens == 4
    cost = -(-(11 * 400_000_000 + 4 * 1_600_000_000) // 10**6)  # 0.40 and 1.60 credits per million tokens
    assert gateway.balance(key_id) == NANO - cost
    assert gateway.open_holds(key_id) == 0
    assert gateway.usage(key_id)[-1]["status"] == 200


@pytest.fixture(scope="module")
def tight(request, gateway_config):
    """A gateway whose 'fake' upstream has a 1.5 s deadline and a 1 MiB answer limit, and whose model gpt-deadline
    reaches the same fake through an upstream with a 0.5 s deadline (for drips, which only a deadline ends)."""
    from tests.gateway import Gateway
    tmp, cfg = gateway_config()
    cfg["upstreams"]["fake"].update(total_timeout_seconds=1.5, max_response_bytes=1 << 20)
    cfg["upstreams"]["fake-deadline"] = {**cfg["upstreams"]["fake"], "total_timeout_seconds": 0.5}
    cfg["models"]["gpt-deadline"] = {**cfg["models"]["gpt-test"], "upstream": "fake-deadline"}
    gw = Gateway(tmp, cfg).start()
    yield gw
    gw.stop(wait=False)


@pytest.mark.parametrize("word, stream", [("[drip]", False), ("[drip-headers]", False), ("[drip-headers]", True)])
def test_a_drip_ends_at_the_deadline_with_504(tight, word, stream):
    key_id, secret = tight.create_key("1")
    started = time.monotonic()
    r = _post(tight, secret, "chat/completions",
              {"model": "gpt-deadline", "stream": stream, "messages": [{"role": "user", "content": f"hi {word}"}]})
    elapsed = time.monotonic() - started
    assert r.status_code == 504, r.text
    assert r.json()["error"]["code"] == "upstream_timeout"
    assert 0.45 < elapsed < 10  # the fake drips for 60 s; only the 0.5 s deadline ends it this soon
    assert_free(tight, key_id, NANO, 504)


@pytest.mark.parametrize("word", ["[oversize=2]", "[oversize-chunked=2]"])
def test_an_oversized_answer_is_a_502(tight, word):
    key_id, secret = tight.create_key("1")
    r = _post(tight, secret, "chat/completions",
              {"model": "gpt-test", "messages": [{"role": "user", "content": f"hi {word}"}]})
    assert r.status_code == 502, r.text
    assert "larger than its limit of 1048576 bytes" in r.json()["error"]["message"]
    assert_free(tight, key_id, NANO, 502)
    # A normal answer on the same upstream still passes, and over a reused connection.
    ok = tight.client(secret).chat.completions.create(model="gpt-test",
                                                      messages=[{"role": "user", "content": "hello"}])
    assert ok.choices[0].message.content == "Hello from the fake upstream!"


class _ClosingUpstream:
    """An OpenAI-shaped upstream on a raw socket that answers keep-alive (HTTP/1.1, Content-Length) and then
    closes each connection 50 ms later, as upstreams do with idle ones: a pooled connection it dropped must be
    noticed before reuse (providers/http.py's peek), not sent a request and turned into a 502."""

    ANSWER = {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "gpt-4.1-mini",
              "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
              "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}}

    def __init__(self) -> None:
        import socket
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            with conn:
                data = b""
                while b"\r\n\r\n" not in data:
                    data += conn.recv(65536)
                head, _, body = data.partition(b"\r\n\r\n")
                length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length:"))
                while len(body) < length:
                    body += conn.recv(65536)
                out = json.dumps(self.ANSWER).encode()
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: keep-alive\r\n"
                             b"Content-Length: %d\r\n\r\n%s" % (len(out), out))
                time.sleep(0.05)


def test_a_pooled_connection_the_upstream_closed_is_replaced(make_gateway):
    upstream = _ClosingUpstream()
    try:
        gw = make_gateway(lambda cfg: cfg["upstreams"]["fake"].update(
            base_url=f"http://127.0.0.1:{upstream.port}/v1"))
        key_id, secret = gw.create_key("1")
        for _ in range(3):
            r = _post(gw, secret, "chat/completions", {"model": "gpt-test",
                                                       "messages": [{"role": "user", "content": "hi"}]})
            assert r.status_code == 200, r.text
            time.sleep(0.3)  # the upstream has closed the pooled connection by now
        assert upstream.accepted == 3
        rows = gw.usage(key_id)
        assert [(row["status"], row["prompt_tokens"], row["completion_tokens"]) for row in rows] == [(200, 10, 5)] * 3
        # 10 prompt and 5 completion tokens at 0.40 and 1.60 credits per million: 12,000 nano-credits a call
        assert gw.balance(key_id) == NANO - 3 * 12_000 and gw.open_holds(key_id) == 0
    finally:
        upstream.sock.close()
