"""Credits stay exact end to end whatever an upstream reports: bad usage shapes, cached tokens, broken streams,
settlement failures, and holds that belong to live processes."""
from __future__ import annotations

import json
import threading
import time
from decimal import ROUND_CEILING, Decimal

import pytest
import requests

import billing
import tokens
from tests.fake_openai import REPLY
from tests.gateway import Gateway

NANO = 10**9
STREAMED = "tok0 tok1 tok2 tok3 "  # what the fake streams by default (4 chunks)
BAD_USAGE = ["[usage=-1000000000,-1000000000]", "[usage=true,5]", "[usage=1e30,5]", '[usage="12",3]',
             "[usage=100000000000,1]", "[usage=Infinity,1]", "[usage=null,4]", "[usage=5,-1]", "[nousage]"]


def cost(p: int, c: int, cached: int = 0, inp: str = "0.40", out: str = "1.60", cin: str = "0.10") -> int:
    """Expected nano-credits, computed independently of billing.py (prices per million tokens)."""
    exact = (Decimal(p - cached) * Decimal(inp) + Decimal(cached) * Decimal(cin) + Decimal(c) * Decimal(out)) \
        / Decimal(10**6) * NANO
    return int(exact.to_integral_value(rounding=ROUND_CEILING))


def post(gw: Gateway, secret: str, body: dict) -> requests.Response:
    return requests.post(f"{gw.base_url}/chat/completions", headers={"Authorization": f"Bearer {secret}"},
                         json=body, timeout=30)


def events(text: str) -> list[dict]:
    return [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]


def assert_books(gw: Gateway, key_id: int, opening: int, charged: int) -> None:
    assert gw.balance(key_id) == opening - charged
    assert gw.ledger(key_id, "amount", "kind") == [(opening, "grant"), (-charged, "charge")]
    assert gw.open_holds(key_id) == 0


# --- pure functions -------------------------------------------------------------------------------------------

# --- usage an upstream reports ---------------------------------------------------------------------------------

@pytest.mark.parametrize("word", BAD_USAGE)
def test_plain_answer_with_bad_usage_is_counted(gateway, count_tokens, word):
    key_id, secret = gateway.create_key("1")
    messages = [{"role": "user", "content": f"hi {word}"}]
    r = post(gateway, secret, {"model": "gpt-test", "messages": messages})
    assert r.status_code == 200, r.text
    prompt, completion = tokens.chat_prompt({"messages": messages}, True), count_tokens(REPLY)
    expected = cost(prompt, completion)
    usage = r.json()["usage"]
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == (prompt, completion)
    assert r.headers["x-credits-charged"] == billing.format_credits(expected) and expected > 0
    [row] = gateway.usage(key_id)
    assert (row["prompt_tokens"], row["completion_tokens"], row["estimated"], row["cost"], row["status"]) \
        == (prompt, completion, 1, expected, 200)
    assert_books(gateway, key_id, NANO, expected)


@pytest.mark.parametrize("word", BAD_USAGE)
def test_streamed_answer_with_bad_usage_is_counted(gateway, count_tokens, word):
    key_id, secret = gateway.create_key("1")
    messages = [{"role": "user", "content": f"hi {word}"}]
    r = post(gateway, secret, {"model": "gpt-test", "messages": messages, "stream": True,
                               "stream_options": {"include_usage": True}})
    got = events(r.text)
    assert r.text.rstrip().endswith("data: [DONE]")
    assert "".join(e["choices"][0]["delta"].get("content") or "" for e in got if e["choices"]) == STREAMED
    prompt, completion = tokens.chat_prompt({"messages": messages}, True), count_tokens(STREAMED)
    expected = cost(prompt, completion)
    usage = got[-1]["usage"]
    assert got[-1]["choices"] == [] and all("usage" not in e for e in got[:-1])
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == (prompt, completion)
    assert Decimal(json.loads(r.text.split("data: ")[-2])["usage"]["cost"].__str__()) == Decimal(expected) / NANO
    [row] = gateway.usage(key_id)
    assert (row["prompt_tokens"], row["completion_tokens"], row["estimated"], row["cost"], row["status"]) \
        == (prompt, completion, 1, expected, 200)
    assert_books(gateway, key_id, NANO, expected)


@pytest.mark.parametrize("stream", [False, True])
def test_cached_prompt_tokens_are_charged_at_the_cached_price(gateway, stream):
    for word, cached, model, expected in (
            ("[usage=1000,10] [cached=600]", 600, "gpt-test", cost(1000, 10, 600)),
            ("[usage=100,10] [cached=500]", 500, "gpt-test", cost(100, 10, 100)),   # clamped to the prompt
            ("[usage=100,10] [cached=-50]", -50, "gpt-test", cost(100, 10)),        # untrusted: no discount
            ("[usage=1000,10] [cached=600]", 600, "gpt-text", cost(1000, 10, inp="0.50", out="1.50"))):
        key_id, secret = gateway.create_key("1")
        body = {"model": model, "messages": [{"role": "user", "content": word}]}
        if stream:
            body.update(stream=True, stream_options={"include_usage": True})
        r = post(gateway, secret, body)
        assert r.status_code == 200
        usage = events(r.text)[-1]["usage"] if stream else r.json()["usage"]
        assert usage["prompt_tokens_details"]["cached_tokens"] == cached  # relayed as the upstream wrote it
        assert Decimal(str(usage["cost"])) == Decimal(expected) / NANO
        [row] = gateway.usage(key_id)
        assert row["cost"] == expected and row["estimated"] == 0
        assert_books(gateway, key_id, NANO, expected)


# --- broken streams and the usage chunk --------------------------------------------------------------------------

@pytest.mark.parametrize("client_usage", [False, True])
def test_stream_with_usage_but_no_done_is_charged_the_reported_usage(gateway, client_usage):
    key_id, secret = gateway.create_key("1")
    body = {"model": "gpt-test", "stream": True, "messages": [{"role": "user", "content": "x [usage=100,50] [nodone]"}]}
    if client_usage:
        body["stream_options"] = {"include_usage": True}
    r = post(gateway, secret, body)
    got = events(r.text)
    assert "[DONE]" not in r.text
    assert got[-1]["error"]["code"] == "upstream_error"  # the client still learns the stream broke
    if client_usage:
        assert got[-2]["usage"]["completion_tokens"] == 50
        assert Decimal(str(got[-2]["usage"]["cost"])) == Decimal(cost(100, 50)) / NANO
    [row] = gateway.usage(key_id)
    assert (row["status"], row["estimated"], row["prompt_tokens"], row["completion_tokens"], row["cost"]) \
        == (502, 0, 100, 50, cost(100, 50))
    assert_books(gateway, key_id, NANO, cost(100, 50))


def test_usage_chunk_shows_the_cost_actually_charged(gateway):
    """1000 output tokens cost 0.0016 but the key has 0.0002: the chunk says 0.0002, the uncollected is recorded."""
    key_id, secret = gateway.create_key("0.0002")
    r = post(gateway, secret, {"model": "gpt-test", "stream": True, "max_tokens": 10,
                               "stream_options": {"include_usage": True},
                               "messages": [{"role": "user", "content": "x [usage=10,1000]"}]})
    usage = events(r.text)[-1]["usage"]
    assert Decimal(str(usage["cost"])) == Decimal("0.0002")
    [row] = gateway.usage(key_id)
    assert row["cost"] == cost(10, 1000) and row["uncollected"] == cost(10, 1000) - 200_000
    assert gateway.balance(key_id) == 0 and gateway.open_holds(key_id) == 0
    assert gateway.ledger(key_id, "amount", "kind") == [(200_000, "grant"), (-200_000, "charge")]


# --- malformed answers and hostile input ------------------------------------------------------------------------

@pytest.mark.parametrize("word", ["[bad-choice]", "[bad-message]", "[bad-toolcalls]", "[bad-choices]"])
@pytest.mark.parametrize("usage", ["[nousage]", "[usage=5,5]", "[usage=\"x\",5]"])
def test_malformed_plain_choices_are_502_and_free(gateway, word, usage):
    key_id, secret = gateway.create_key("1")
    r = post(gateway, secret, {"model": "gpt-test", "messages": [{"role": "user", "content": f"{word} {usage}"}]})
    assert r.status_code == 502, r.text
    assert r.json()["error"]["type"] == "api_error" and "upstream" in r.json()["error"]["message"]
    [row] = gateway.usage(key_id)
    assert row["status"] == 502 and row["cost"] == 0
    assert gateway.balance(key_id) == NANO
    assert gateway.ledger(key_id, "amount", "kind") == [(NANO, "grant"), (0, "charge")]
    assert gateway.open_holds(key_id) == 0


@pytest.mark.parametrize("word", ["[bad-choice]", "[bad-message]", "[bad-toolcalls]", "[bad-choices]"])
def test_malformed_stream_chunk_ends_the_stream_and_charges_what_was_delivered(gateway, count_tokens, word):
    key_id, secret = gateway.create_key("1")
    messages = [{"role": "user", "content": f"x {word} [nousage]"}]
    r = post(gateway, secret, {"model": "gpt-test", "stream": True, "messages": messages})
    got = events(r.text)
    assert got[-1]["error"]["code"] == "upstream_error"
    assert "".join(e["choices"][0]["delta"].get("content") or "" for e in got[:-1] if e["choices"]) == "tok0 "
    prompt, completion = tokens.chat_prompt({"messages": messages}, True), count_tokens("tok0 ")
    [row] = gateway.usage(key_id)
    assert (row["status"], row["estimated"], row["prompt_tokens"], row["completion_tokens"], row["cost"]) \
        == (502, 1, prompt, completion, cost(prompt, completion))
    assert_books(gateway, key_id, NANO, cost(prompt, completion))


def test_lone_surrogates_and_deep_prompts(gateway):
    key_id, secret = gateway.create_key("1")
    auth = {"Authorization": f"Bearer {secret}", "Content-Type": "application/json"}
    for path, body in (("chat/completions", '{"model": "gpt-test", "messages": [{"role": "user", '
                                            '"content": "hi \\ud800 [usage=3,4]"}]}'),
                       ("chat/completions", '{"model": "gpt-test", "stream": true, "messages": [{"role": "user", '
                                            '"content": [{"type": "text", "text": "\\udfff [usage=3,4]"}]}]}'),
                       ("completions", '{"model": "gpt-test", "prompt": ["a \\ud800 [usage=3,4]"]}')):
        r = requests.post(f"{gateway.base_url}/{path}", headers=auth, data=body.encode(), timeout=30)
        assert r.status_code == 200, r.text
    assert [row["cost"] for row in gateway.usage(key_id)] == [cost(3, 4)] * 3
    deep: list = [1]
    for _ in range(50):  # deeper than any prompt shape, within the body parser's own depth limit
        deep = [deep]
    r = requests.post(f"{gateway.base_url}/completions", headers=auth, timeout=30,
                      data=json.dumps({"model": "gpt-test", "prompt": deep}).encode())
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "prompt" and r.json()["error"]["type"] == "invalid_request_error"
    assert gateway.balance(key_id) == NANO - 3 * cost(3, 4) and gateway.open_holds(key_id) == 0


# --- settlement and holds ----------------------------------------------------------------------------------------

def test_a_settlement_that_keeps_failing_returns_the_hold(gateway):
    """A real SQLite trigger makes every usage insert of this request fail: the answer is free, nothing stuck."""
    key_id, secret = gateway.create_key("1")
    conn = gateway.db()
    conn.execute("CREATE TRIGGER fail_settle BEFORE INSERT ON usage WHEN NEW.prompt_tokens = 424242 "
                 "BEGIN SELECT RAISE(ABORT, 'injected settlement failure'); END")
    try:
        r = post(gateway, secret, {"model": "gpt-test", "messages": [{"role": "user", "content": "[usage=424242,5]"}]})
    finally:
        conn.execute("DROP TRIGGER fail_settle")
        conn.close()
    assert r.status_code == 200 and r.headers["x-credits-charged"] == "0"
    assert gateway.balance(key_id) == NANO and gateway.open_holds(key_id) == 0
    assert gateway.usage(key_id) == [] and gateway.ledger(key_id, "amount", "kind") == [(NANO, "grant")]
    assert "could not be settled" in gateway.log() and "injected settlement failure" in gateway.log()
    assert gateway.flask("audit").returncode == 0


@pytest.mark.long(seconds=6)
def test_cli_commands_and_other_workers_never_release_a_live_stream(make_gateway, fake_openai):
    """hold_ttl_seconds is 2; the stream lasts until the test is done: `keys list`, `audit` and a second gateway
    starting on the same database run meanwhile, after the hold is older than the ttl. The stream is charged in
    full afterwards."""
    def short_ttl(cfg: dict) -> None:
        cfg["server"]["hold_ttl_seconds"] = 2
        for upstream_cfg in cfg["upstreams"].values():  # the ttl may not be shorter than any upstream timeout
            upstream_cfg["timeout_seconds"] = min(upstream_cfg.get("timeout_seconds", 2), 2)
    gw = make_gateway(short_ttl)
    key_id, secret = gw.create_key("1")
    result: dict = {}

    def stream() -> None:
        # the fake streams an event every 0.1 s until the test releases it below
        result["r"] = post(gw, secret, {"model": "gpt-test", "stream": True, "max_tokens": 100, "messages": [
            {"role": "user", "content": "x [usage=100,50] [until=money-live-stream]"}]})

    t = threading.Thread(target=stream)
    t.start()
    try:
        deadline = time.monotonic() + 10
        while gw.open_holds(key_id) != 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        held = NANO - gw.balance(key_id)
        time.sleep(2.2)  # the hold is now older than hold_ttl_seconds
        assert gw.flask("keys", "list").returncode == 0
        audit = gw.flask("audit")
        assert audit.returncode == 0, audit.stdout + audit.stderr  # the books balance; the old hold is reported
        assert "older than hold_ttl_seconds (2)" in audit.stdout and f"of key {key_id} " in audit.stdout
        other = Gateway(gw.tmp, gw.cfg).start()  # its worker start sweeps orphans: this hold's owner is alive
        other.stop()
        assert t.is_alive(), "the stream ended before the test was done with it"
        assert gw.open_holds(key_id) == 1 and gw.balance(key_id) == NANO - held > 0
    finally:
        fake_openai.release("money-live-stream")
        t.join(timeout=60)
    assert result["r"].text.rstrip().endswith("data: [DONE]")
    [row] = gw.usage(key_id)
    assert (row["status"], row["cost"], row["estimated"]) == (200, cost(100, 50), 0)
    assert_books(gw, key_id, NANO, cost(100, 50))


