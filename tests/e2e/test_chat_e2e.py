"""End to end with the official openai SDK against gunicorn + gevent: models, chat, completions, errors."""
from __future__ import annotations

import json
import socket

import openai
import pytest
import requests

from routes.relay import FOLD_CHARS
from tests.conformance.validate import validate

NANO = 10**9


def cost(p: int, c: int, inp: str = "0.40", out: str = "1.60") -> int:
    """Expected nano-credits, computed independently of billing.py (prices per million tokens)."""
    from decimal import ROUND_CEILING, Decimal
    exact = (Decimal(p) * Decimal(inp) + Decimal(c) * Decimal(out)) / Decimal(10**6) * NANO
    return int(exact.to_integral_value(rounding=ROUND_CEILING))


def _content_length(data: bytes) -> int:
    for line in data.partition(b"\r\n\r\n")[0].split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":")[1])
    return 1 << 30


def test_models_list_and_retrieve(gateway, key):
    client = gateway.client(key[1])
    models = client.models.list()
    ids = [m.id for m in models.data]
    assert "gpt-test" in ids and "gemini-2.5-flash-image" in ids
    m = client.models.retrieve("gpt-test")
    assert m.owned_by == "violations"
    assert m.model_extra["pricing"]["input_per_million_tokens"] == 0.4
    assert m.model_extra["capabilities"]["vision"] is True
    with pytest.raises(openai.NotFoundError) as exc:
        client.models.retrieve("no-such-model")
    assert exc.value.code == "model_not_found"


def test_chat_charges_exactly(gateway, fake_openai):
    key_id, secret = gateway.create_key("1")
    before = gateway.balance(key_id)
    resp = gateway.client(secret).chat.completions.with_raw_response.create(
        model="gpt-test", messages=[{"role": "user", "content": "hello [usage=1234,567]"}])
    completion = resp.parse()
    assert completion.choices[0].message.content == "Hello from the fake upstream!"
    expected = cost(1234, 567)
    assert completion.usage.model_extra["cost"] == pytest.approx(expected / NANO)
    assert before - gateway.balance(key_id) == expected
    assert resp.headers["x-credits-charged"] == "0.0014008"
    assert resp.headers["x-credits-remaining"] == "0.9985992"
    assert fake_openai.requests[-1]["body"]["model"] == "gpt-4.1-mini"  # upstream_model
    rows = gateway.usage(key_id)
    assert len(rows) == 1 and rows[0]["cost"] == expected and rows[0]["prompt_tokens"] == 1234
    assert gateway.open_holds(key_id) == 0


def test_stream_charges_and_reports_cost(gateway):
    key_id, secret = gateway.create_key("1")
    before = gateway.balance(key_id)
    stream = gateway.client(secret).chat.completions.create(
        model="gpt-test", stream=True, stream_options={"include_usage": True},
        messages=[{"role": "user", "content": "hi [usage=100,50] [chunks=6]"}])
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "".join(f"tok{i} " for i in range(6))
    usage = chunks[-1].usage
    assert usage.prompt_tokens == 100 and usage.model_extra["cost"] == pytest.approx(cost(100, 50) / NANO)
    assert before - gateway.balance(key_id) == cost(100, 50)


def test_stream_strips_usage_when_not_asked(gateway, fake_openai):
    key_id, secret = gateway.create_key("1")
    r = requests.post(f"{gateway.base_url}/chat/completions", headers={"Authorization": f"Bearer {secret}"},
                      json={"model": "gpt-test", "stream": True,
                            "messages": [{"role": "user", "content": "hi [usage=10,4]"}]}, stream=True)
    body = r.text
    assert r.headers["content-type"].startswith("text/event-stream")
    assert '"usage"' not in body
    assert body.rstrip().endswith("data: [DONE]")
    # the gateway asked the upstream for usage anyway, and charged it
    assert fake_openai.requests[-1]["body"]["stream_options"] == {"include_usage": True}
    assert gateway.usage(key_id)[0]["cost"] == cost(10, 4)


def test_stream_usage_on_last_content_chunk(gateway):
    """Some upstreams (Gemini's endpoint) put usage on the finish chunk; without include_usage it is removed."""
    key_id, secret = gateway.create_key("1")
    r = requests.post(f"{gateway.base_url}/chat/completions", headers={"Authorization": f"Bearer {secret}"},
                      json={"model": "gpt-test", "stream": True,
                            "messages": [{"role": "user", "content": "hi [usage=10,4] [usage-in-last]"}]})
    events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    assert all("usage" not in e for e in events)
    assert events[-1]["choices"][0]["finish_reason"] == "stop"
    assert gateway.usage(key_id)[0]["cost"] == cost(10, 4)


def test_stream_without_usage_counts_delivered_tokens(gateway):
    key_id, secret = gateway.create_key("1")
    chunks = list(gateway.client(secret).chat.completions.create(
        model="gpt-test", stream=True, messages=[{"role": "user", "content": "count me [nousage] [chunks=5]"}]))
    assert chunks
    row = gateway.usage(key_id)[0]
    assert row["estimated"] == 1
    assert row["completion_tokens"] >= 5  # "tok0 tok1 ..." counted with tiktoken
    assert row["cost"] == cost(row["prompt_tokens"], row["completion_tokens"])


def test_legacy_completions_plain_and_streamed(gateway):
    key_id, secret = gateway.create_key("1")
    client = gateway.client(secret)
    c = client.completions.create(model="gpt-test", prompt="Once upon a time [usage=5,7]")
    assert c.choices[0].text == "Hello from the fake upstream!"
    assert c.usage.model_extra["cost"] == pytest.approx(cost(5, 7) / NANO)
    parts = list(client.completions.create(model="gpt-test", prompt="Once [usage=5,3]", stream=True,
                                           stream_options={"include_usage": True}))
    assert "".join(p.choices[0].text for p in parts if p.choices) == "tok0 tok1 tok2 tok3 "
    assert gateway.balance(key_id) == NANO - cost(5, 7) - cost(5, 3)


def test_passthrough_of_unknown_parameters(gateway, key, fake_openai):
    gateway.client(key[1]).chat.completions.create(
        model="gpt-test", messages=[{"role": "user", "content": "hi"}], temperature=0.3, seed=7,
        extra_body={"my_custom_flag": {"nested": [1, 2]}, "top_k": 5})
    sent = fake_openai.requests[-1]["body"]
    assert sent["temperature"] == 0.3 and sent["seed"] == 7
    assert sent["my_custom_flag"] == {"nested": [1, 2]} and sent["top_k"] == 5


def test_output_cap_sent_when_client_names_none(gateway, fake_openai):
    # 0.0005 credits: prompt ~12 tokens at 0.4/M leaves room for about 309 output tokens at 1.6/M
    key_id, secret = gateway.create_key("0.0005")
    gateway.client(secret).chat.completions.create(model="gpt-test",
                                                   messages=[{"role": "user", "content": "hi [usage=1,1]"}])
    cap = fake_openai.requests[-1]["body"]["max_tokens"]
    assert 250 < cap < 312
    # the client's own cap is held and sent as it is, in the one field this upstream reads
    gateway.client(secret).chat.completions.create(model="gpt-test", max_completion_tokens=20,
                                                   messages=[{"role": "user", "content": "hi [usage=1,1]"}])
    sent = fake_openai.requests[-1]["body"]
    assert sent["max_tokens"] == 20 and "max_completion_tokens" not in sent


def test_revoked_key_is_401(gateway):
    key_id, secret = gateway.create_key("1")
    assert gateway.flask("keys", "revoke", str(key_id)).returncode == 0
    with pytest.raises(openai.AuthenticationError):
        gateway.client(secret).models.list()


def test_key_revoked_after_use_is_401_on_its_next_request(gateway):
    # The worker caches the key it looked up; the CLI's revocation must still apply to the very next request.
    key_id, secret = gateway.create_key("1")
    assert [m.id for m in gateway.client(secret).models.list()]
    assert gateway.flask("keys", "revoke", str(key_id)).returncode == 0
    with pytest.raises(openai.AuthenticationError):
        gateway.client(secret).models.list()


def test_bad_json_route_method_and_size(gateway, key):
    auth = {"Authorization": f"Bearer {key[1]}", "Content-Type": "application/json"}
    r = requests.post(f"{gateway.base_url}/chat/completions", headers=auth, data=b"{not json")
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = requests.post(f"{gateway.base_url}/chat/completions", headers=auth, data=b"[1, 2]")
    assert r.status_code == 400
    r = requests.get(f"{gateway.base_url}/nowhere", headers=auth)
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = requests.get(f"{gateway.base_url}/chat/completions", headers=auth)
    assert r.status_code == 405 and validate("ErrorResponse", r.json()) == []
    # Content-Length says 30 MiB but only the headers are sent: the 413 comes before any body is read.
    head, body = _exchange(gateway.port, (f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                                          f"{key[1]}\r\nContent-Type: application/json\r\n"
                                          f"Content-Length: {30 << 20}\r\n\r\n").encode(), timeout=5)
    assert head[0].startswith(b"HTTP/1.1 413")
    assert validate("ErrorResponse", json.loads(body)) == []


@pytest.mark.parametrize("word", ["[cut]", "[malformed]", "[midstream-error]"])
def test_broken_streams_end_with_an_error_event(gateway, word, count_tokens):
    key_id, secret = gateway.create_key("1")
    stream = gateway.client(secret).chat.completions.create(
        model="gpt-test", stream=True, messages=[{"role": "user", "content": f"go {word}"}])
    got = []
    with pytest.raises(openai.APIError):
        for chunk in stream:
            got.append(chunk)
    assert got  # something was relayed before the failure
    # What was delivered is charged, counted by the gateway (this reverses the old "a failed stream is free").
    delivered = "".join(c.choices[0].delta.content or "" for c in got if c.choices)
    assert delivered in ("tok0 ", "tok0 tok1 ")
    [row] = gateway.usage(key_id)
    assert row["status"] == 502 and row["estimated"] == 1
    assert row["completion_tokens"] == count_tokens(delivered) > 0
    assert row["cost"] == cost(row["prompt_tokens"], row["completion_tokens"]) > 0
    assert gateway.balance(key_id) == NANO - row["cost"]
    assert gateway.open_holds(key_id) == 0


def test_upstream_key_never_reaches_client_or_log(gateway, key):
    from tests.conftest import UPSTREAM_KEY
    r = requests.post(f"{gateway.base_url}/chat/completions", headers={"Authorization": f"Bearer {key[1]}"},
                      json={"model": "gpt-test", "messages": [{"role": "user", "content": "[error401]"}]})
    assert UPSTREAM_KEY not in r.text
    assert UPSTREAM_KEY not in gateway.log()
    assert key[1] not in gateway.log()


def test_long_stream_without_usage_is_charged_its_exact_count(gateway, count_tokens):
    """5,000 chunks (about 39,000 characters, folded twice) through the real relay: the charge is the count of
    everything the client received."""
    key_id, secret = gateway.create_key("1")
    chunks = list(gateway.client(secret).chat.completions.create(
        model="gpt-test", stream=True, messages=[{"role": "user", "content": "long [nousage] [chunks=5000]"}]))
    delivered = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(delivered) > 2 * FOLD_CHARS
    row = gateway.usage(key_id)[0]
    assert row["estimated"] == 1 and row["status"] == 200
    assert row["completion_tokens"] == count_tokens(delivered)


def _exchange(port: int, request: bytes, half_close: bool = False,
              timeout: float = 10) -> tuple[list[bytes], bytes]:
    """One request on a raw socket; the answer's head lines and its body (read to its Content-Length)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(request)
        if half_close:
            s.shutdown(socket.SHUT_WR)
        data = b""
        while b"\r\n\r\n" not in data or len(data.partition(b"\r\n\r\n")[2]) < _content_length(data):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return head.split(b"\r\n"), body


def test_answer_head_keeps_gunicorns_default_headers(gateway, key):
    """gunicorn.conf.py builds the status line and default headers itself (a Date line cached per second)."""
    import email.utils
    import time

    body = json.dumps({"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]}).encode()
    request = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key[1]}\r\n"
               f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body
    for _ in range(2):  # the second answer may reuse the first one's Date line
        before = time.time()
        lines, answer = _exchange(gateway.port, request)
        after = time.time()
        headers = {k.lower(): v.strip() for k, _, v in (line.decode().partition(":") for line in lines[1:])}
        assert lines[0] == b"HTTP/1.1 200 OK"
        assert headers["server"].startswith("gunicorn")
        assert headers["connection"] == "keep-alive"
        date = email.utils.parsedate_to_datetime(headers["date"]).timestamp()
        assert int(before) <= date <= after and headers["date"].endswith(" GMT")
        assert "transfer-encoding" not in headers and json.loads(answer)["object"] == "chat.completion"


def test_a_body_cut_short_is_a_400_and_no_hold(gateway):
    """The client hangs up after half of its declared body: refused before any credit moves."""
    key_id, secret = gateway.create_key("1")
    body = json.dumps({"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]}).encode()
    request = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {secret}\r\n"
               f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body[:20]
    lines, answer = _exchange(gateway.port, request, half_close=True)
    assert lines[0].startswith(b"HTTP/1.1 400"), lines  # the client only half-closed: it can still read
    assert json.loads(answer)["error"]["code"] == "invalid_body"
    assert gateway.balance(key_id) == NANO and gateway.usage(key_id) == [] and gateway.open_holds(key_id) == 0
