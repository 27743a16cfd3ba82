"""Hostile and malformed requests: always an OpenAI-shaped JSON answer, never a 500, an HTML page or a lost credit."""
from __future__ import annotations

import json
import re
import socket
import time

import pytest
import requests

import billing
import db

MAX_BODY = 4096


def raw(gw, data: bytes, timeout: float = 10) -> tuple[int, dict[str, str], bytes]:
    """Send bytes on a fresh connection; the first response as (status, lower-case headers, body)."""
    with socket.create_connection(("127.0.0.1", gw.port), timeout=timeout) as sock:
        sock.sendall(data)
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = sock.recv(65536)
            if not chunk:
                break
            buf += chunk
        head, _, body = buf.partition(b"\r\n\r\n")
        lines = head.decode("latin1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
        length = int(headers.get("content-length", "0"))
        while len(body) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            body += chunk
        return status, headers, body[:length]


def openai_error(status: int, headers: dict, body: bytes, code: str | None = None) -> dict:
    assert headers["content-type"].startswith("application/json"), (status, headers, body[:200])
    err = json.loads(body)["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if code is not None:
        assert err["code"] == code, err
    return err


def post(path: str, secret: str, body: bytes, extra: str = "") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {secret}\r\nContent-Type: application/json\r\n"
            f"{extra}").encode() + body


def chunked(payload: bytes, size: int = 1000) -> bytes:
    parts = [payload[i:i + size] for i in range(0, len(payload), size)]
    return b"".join(f"{len(p):x}\r\n".encode() + p + b"\r\n" for p in parts) + b"0\r\n\r\n"


@pytest.fixture(scope="module")
def small(gateway_config):
    """A gateway with a small body limit, so that over-limit bodies are cheap to send."""
    from tests.gateway import Gateway
    tmp, cfg = gateway_config()
    cfg["server"]["max_body_bytes"] = MAX_BODY
    gw = Gateway(tmp, cfg).start()
    yield gw
    gw.stop(wait=False)


def assert_untouched(gw, key_id: int, credits: int = 10) -> None:
    assert gw.balance(key_id) == credits * 10**9
    assert gw.usage(key_id) == [] and gw.open_holds(key_id) == 0
    assert gw.flask("audit").returncode == 0


@pytest.mark.parametrize("depth", [100_000, 1_000, 201])
def test_deep_json_is_a_400(small, depth):
    key_id, secret = small.create_key("10")
    body = b'{"model": "gpt-test", "messages": ' + b"[" * depth + b"]" * depth + b"}"
    r = requests.post(f"{small.base_url}/chat/completions", data=body, timeout=30,
                      headers={"Authorization": f"Bearer {secret}", "Content-Type": "application/json"})
    if len(body) > MAX_BODY:
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    else:
        assert r.status_code == 400, r.text
        assert r.json()["error"]["code"] == "invalid_json" and "levels deep" in r.json()["error"]["message"]
    assert_untouched(small, key_id)


def test_deep_json_within_the_body_limit(gateway):
    """100,000 levels deep in 200 kB: Python's parser raises RecursionError, which was a 500."""
    key_id, secret = gateway.create_key("10")
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/images/generations", "/v1/audio/music"):
        body = b'{"model": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
        r = requests.post(f"{gateway.url}{path}", data=body, timeout=30,
                          headers={"Authorization": f"Bearer {secret}", "Content-Type": "application/json"})
        assert r.status_code == 400, (path, r.status_code, r.text[:300])
        assert r.json()["error"]["code"] == "invalid_json"
    assert_untouched(gateway, key_id)


@pytest.mark.parametrize("bad", [
    b"zz\r\n{}\r\n0\r\n\r\n",                     # a chunk size that is not hex
    b"5\r\n{}{}{}{}\r\n0\r\n\r\n",                 # a chunk longer than its size line says
    b"2\r\n{}XX0\r\n\r\n",                          # no CRLF after the chunk
])
def test_malformed_chunked_body_is_a_400(gateway, bad):
    key_id, secret = gateway.create_key("10")
    request = post("/v1/chat/completions", secret, bad, "Transfer-Encoding: chunked\r\n\r\n")
    status, headers, body = raw(gateway, request)
    assert status == 400, body
    openai_error(status, headers, body)
    assert_untouched(gateway, key_id)
    assert requests.get(f"{gateway.url}/health").ok


def test_chunked_body_over_the_limit_is_a_413(small):
    key_id, secret = small.create_key("10")
    payload = json.dumps({"model": "gpt-test", "messages": [{"role": "user", "content": "x" * (2 * MAX_BODY)}]})
    status, headers, body = raw(small, post("/v1/chat/completions", secret, chunked(payload.encode()),
                                            "Transfer-Encoding: chunked\r\n\r\n"))
    assert status == 413, body
    err = openai_error(status, headers, body, "request_too_large")
    assert str(MAX_BODY) in err["message"]
    assert_untouched(small, key_id)
    # a chunked body within the limit still works
    ok = json.dumps({"model": "gpt-test", "messages": [{"role": "user", "content": "hi [usage=10,10]"}]}).encode()
    status, headers, body = raw(small, post("/v1/chat/completions", secret, chunked(ok, 7),
                                            "Transfer-Encoding: chunked\r\n\r\n"))
    assert status == 200, body
    assert json.loads(body)["usage"]["prompt_tokens"] == 10


def test_exactly_the_limit_is_read_whole(small):
    key_id, secret = small.create_key("10")
    payload = json.dumps({"model": "gpt-test", "messages": [{"role": "user", "content": "hi [usage=10,10]"}]})
    payload = payload[:-1] + " " * (MAX_BODY - len(payload)) + "}"
    assert len(payload) == MAX_BODY
    status, _, body = raw(small, post("/v1/chat/completions", secret, chunked(payload.encode()),
                                      "Transfer-Encoding: chunked\r\n\r\n"))
    assert status == 200, body


@pytest.mark.parametrize("request_bytes,status,code", [
    (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414, "request_line_too_long"),
    (b"GET /v1/models HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(150)) + b"\r\n",
     431, "request_headers_too_large"),
    (b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Big: " + b"v" * 9000 + b"\r\n\r\n", 431, "request_headers_too_large"),
    (b"GET /v1/models HTTP/9.9\r\nHost: x\r\n\r\n", 400, "invalid_request"),
    (b"G@T /v1/models HTTP/1.1\r\nHost: x\r\n\r\n", 400, "invalid_request"),
    (b"GET /v1/models HTTP/1.1\r\nHost: x\r\nBad Header: y\r\n\r\n", 400, "invalid_request"),
    (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: br\r\n\r\n", 501,
     "unsupported_transfer_coding"),
])
def test_gunicorn_refusals_are_json(gateway, request_bytes, status, code):
    got, headers, body = raw(gateway, request_bytes)
    assert got == status, body
    err = openai_error(got, headers, body, code)
    assert err["type"] == "invalid_request_error"
    assert b"<html" not in body


def _log_lines(gw, request_id: str) -> list[str]:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        lines = [ln for ln in gw.log().splitlines() if f"request_id={request_id} " in ln]
        if lines:
            return lines
        time.sleep(0.05)
    return []


def test_every_request_gets_one_log_line(small):
    gw = small  # the module's gateway with the small body limit; this test's lines are those after `start`
    start = gw.log_size()
    _, secret = gw.create_key("10", rpm=6)
    _, broke = gw.create_key("0")
    prompt = "a secret prompt [usage=10,10]"
    chat = {"model": "gpt-test", "messages": [{"role": "user", "content": prompt}]}
    auth = {"Authorization": f"Bearer {secret}"}
    cases = [  # (status, error code in the line, request)
        (400, "invalid_json", lambda: requests.post(f"{gw.base_url}/chat/completions", data=b"{", headers=auth)),
        (401, "invalid_api_key", lambda: requests.get(f"{gw.base_url}/models",
                                                      headers={"Authorization": "Bearer sk-notakey0123456789"})),
        (402, "insufficient_credits", lambda: requests.post(f"{gw.base_url}/chat/completions", json=chat,
                                                            headers={"Authorization": f"Bearer {broke}"})),
        (404, "model_not_found", lambda: requests.post(f"{gw.base_url}/chat/completions",
                                                       json={**chat, "model": "nope"}, headers=auth)),
        (404, "not_found", lambda: requests.get(f"{gw.base_url}/nowhere", headers=auth)),
        (413, "request_too_large", lambda: requests.post(f"{gw.base_url}/chat/completions",
                                                         data=b"x" * (MAX_BODY + 1), headers=auth)),
        (200, "-", lambda: requests.get(f"{gw.base_url}/models", headers=auth)),
        (200, None, lambda: requests.post(f"{gw.base_url}/chat/completions", json=chat, headers=auth)),
        (429, "rate_limit_exceeded", lambda: next(r for r in (requests.get(f"{gw.base_url}/models", headers=auth)
                                                              for _ in range(7)) if r.status_code == 429)),
    ]
    for status, code, send in cases:
        r = send()
        assert r.status_code == status, (status, r.text)
        lines = _log_lines(gw, r.headers["x-request-id"])
        assert r.headers["content-type"] == "application/json" or status == 200
        assert len(lines) == 1, (status, lines)
        line = lines[0]
        assert f"status={status}" in line
        if code is not None:
            assert f"error={code}" in line, line
        assert secret not in line and broke not in line and "sk-notakey" not in line and "secret prompt" not in line
        if status in (401, 413):
            assert "key=- " in line
        elif status != 402:
            assert f"key={secret[:8]} " in line
        if status == 402:
            assert "model=gpt-test" in line and "route=chat.completions" in line
    assert "Traceback" not in gw.log()
    assert re.search(r"request_id=req_\w+ key=- route=/v1/chat/completions model=- status=413 error=request_too_large",
                     gw.log_since(start))


@pytest.mark.long(seconds=15)
def test_start_up_is_safe_with_four_workers(make_gateway):
    """Four workers booting at once on a fresh database, five times: every start serves and audits clean.

    The audit is `flask --app app audit`'s own check (billing.audit on a db.cli_connection) run here rather than in
    a CLI subprocess of its own, and each gateway exits while the next one boots: the time goes to the starts."""
    for _ in range(5):
        gw = make_gateway(workers=4)
        key_id, secret = gw.create_key("1")
        for _ in range(8):  # new connections, spread over the workers
            with requests.Session() as s:
                assert s.get(f"{gw.base_url}/models", headers={"Authorization": f"Bearer {secret}"}).ok
        assert "database is locked" not in gw.log() and "Traceback" not in gw.log()
        with db.cli_connection(gw.db_path) as conn:
            assert billing.audit(conn) == []
            assert conn.execute("SELECT COUNT(*) FROM api_keys").fetchone()[0] == 1
        gw.stop(wait=False)
