"""Billing end to end: exact charges, disconnects, overage, concurrency without overdraft, crash recovery."""
from __future__ import annotations

import json
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import requests

import billing
from tests.e2e.conftest import fence_env
from tests.gateway import Gateway

NANO = 10**9


@pytest.fixture(scope="module")
def two_patient_workers(gateway_config, fence_log):
    """Two workers, and a 'fake' upstream given 10 s: the overdraft race needs both workers, the heartbeat case a
    stream that the shared gateway's 2 s upstream timeout would end first. One start-up serves both (each test
    uses its own key)."""
    tmp, cfg = gateway_config()
    cfg["upstreams"]["fake"]["timeout_seconds"] = 10
    gw = Gateway(tmp, cfg, workers=2, env=fence_env(fence_log)).start()
    yield gw
    gw.stop(wait=False)


def wait_for(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def open_raw_stream(gateway, secret: str, content: str) -> socket.socket:
    """A streamed chat request sent over a bare socket, so the test can vanish the way a killed client does."""
    body = json.dumps({"model": "gpt-test", "stream": True,
                       "messages": [{"role": "user", "content": content}]}).encode()
    sock = socket.create_connection(("127.0.0.1", gateway.port), timeout=10)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 + f"Authorization: Bearer {secret}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
    return sock


def test_disconnect_is_charged_for_what_was_delivered(gateway, fake_openai):
    key_id, secret = gateway.create_key("1")
    sock = open_raw_stream(gateway, secret, "long [chunks=200] [delay=0.02]")
    received = b""
    while received.count(b"tok") < 5:
        received += sock.recv(4096)
    sock.close()  # vanish without reading further, as a killed client would
    assert wait_for(lambda: len(gateway.usage(key_id)) == 1), "the gateway never settled the cut stream"
    row = gateway.usage(key_id)[0]
    assert row["status"] == 499 and row["estimated"] == 1
    assert 5 <= row["completion_tokens"] < 200 * 2  # "tokN " is two tokens; far fewer than 200 chunks went out
    assert row["cost"] == billing.ceil_div(row["prompt_tokens"] * 400_000_000 + row["completion_tokens"]
                                           * 1_600_000_000, 10**6)
    assert gateway.balance(key_id) == NANO - row["cost"]
    assert gateway.open_holds(key_id) == 0


def test_overage_is_collected_down_to_zero_and_recorded(gateway):
    key_id, secret = gateway.create_key("0.0002")
    gateway.client(secret).chat.completions.create(
        model="gpt-test", max_tokens=10, messages=[{"role": "user", "content": "x [usage=10,1000]"}])
    row = gateway.usage(key_id)[0]
    assert gateway.balance(key_id) == 0
    assert row["cost"] == 10 * 400 + 1000 * 1600
    assert row["uncollected"] == row["cost"] - 200_000
    assert gateway.flask("audit").returncode == 0


@pytest.mark.long(seconds=8)
def test_concurrent_requests_never_overdraw(two_patient_workers):
    gw = two_patient_workers
    key_id, secret = gw.create_key("0.001")  # each request holds ~0.000166 and costs 0.000164
    client = gw.client(secret)

    def one(_):
        try:
            client.chat.completions.create(model="gpt-test", max_tokens=100,
                                           messages=[{"role": "user", "content": "x [usage=10,100]"}])
            return 200
        except openai.APIStatusError as exc:
            return exc.status_code

    with ThreadPoolExecutor(24) as pool:
        statuses = list(pool.map(one, range(40)))
    ok = statuses.count(200)
    assert set(statuses) <= {200, 402}
    assert 1 <= ok <= 6
    assert gw.balance(key_id) == NANO // 1000 - ok * 164_000 >= 0
    assert gw.open_holds(key_id) == 0
    audit = gw.flask("audit")
    assert audit.returncode == 0, audit.stdout + audit.stderr


@pytest.mark.long(seconds=5)
def test_holds_of_a_killed_process_come_back_on_restart(make_gateway):
    gw = make_gateway()
    key_id, secret = gw.create_key("1")

    def slow_stream():
        try:
            _ = requests.post(f"{gw.base_url}/chat/completions", headers={"Authorization": f"Bearer {secret}"},
                          json={"model": "gpt-test", "stream": True, "max_tokens": 500,
                                "messages": [{"role": "user", "content": "x [chunks=100] [delay=0.2]"}]},
                          timeout=30).content
        except requests.RequestException:
            pass

    threading.Thread(target=slow_stream, daemon=True).start()
    assert wait_for(lambda: gw.open_holds(key_id) == 1)
    held = NANO - gw.balance(key_id)
    assert held > 0
    gw.stop(signal.SIGKILL)  # no finally runs: the hold stays open
    assert gw.open_holds(key_id) == 1 and gw.balance(key_id) == NANO - held
    again = Gateway(gw.tmp, gw.cfg).start()
    try:
        assert gw.open_holds(key_id) == 0
        assert gw.balance(key_id) == NANO
        assert again.flask("audit").returncode == 0
        assert "returned 1 hold" in again.log()
    finally:
        again.stop()


def test_heartbeat_notices_a_vanished_client_while_the_upstream_is_silent(two_patient_workers):
    """The upstream waits 4 s per chunk; pings every heartbeat (0.2 s in the tests) reveal the closed client long
    before that."""
    gateway = two_patient_workers  # its upstream timeout is 10 s: the shared gateway's 2 s would end the stream first
    key_id, secret = gateway.create_key("1")
    sock = open_raw_stream(gateway, secret, "think [chunks=3] [delay=4]")
    received = b""
    while b"\r\n\r\n" not in received:  # the stream has started (its first event came at once)
        received += sock.recv(4096)
    assert received.startswith(b"HTTP/1.1 200")
    started = time.monotonic()
    sock.close()
    assert wait_for(lambda: len(gateway.usage(key_id)) == 1, timeout=3.8), "vanished client not noticed"
    assert time.monotonic() - started < 3.8  # before the upstream's first chunk would have arrived
    assert gateway.usage(key_id)[0]["status"] == 499
    assert gateway.open_holds(key_id) == 0


def test_silent_upstream_gets_pings(gateway):
    _, secret = gateway.create_key("1")
    r = requests.post(f"{gateway.base_url}/chat/completions", headers={"Authorization": f"Bearer {secret}"},
                      json={"model": "gpt-test", "stream": True,
                            "messages": [{"role": "user", "content": "x [chunks=2] [delay=0.5]"}]}, timeout=30)
    assert ": ping" in r.text
    assert r.text.rstrip().endswith("data: [DONE]")


def test_slow_first_event_gets_headers_early(gateway):
    """An upstream slower than 50 ms to its first event: headers go out at once with an SSE comment."""
    _, secret = gateway.create_key("1")
    r = requests.post(f"{gateway.base_url}/completions", headers={"Authorization": f"Bearer {secret}"},
                      json={"model": "gpt-test", "stream": True, "prompt": "x [chunks=2] [delay=0.4]"},
                      stream=True, timeout=30)
    started = time.monotonic()
    lines = r.iter_lines()
    assert next(lines) == b": connected" and time.monotonic() - started < 0.3
    rest = b"\n".join(lines)
    assert rest.rstrip().endswith(b"data: [DONE]")
