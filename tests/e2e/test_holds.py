"""Holds: one output cap sent as held, exact prompt counts where an estimate could miss, small keys in parallel."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from tests.fake_openai import _tiktoken_usage

NANO = 10**9


def cost(prompt: int, completion: int, input_npm: int = 400_000_000, output_npm: int = 1_600_000_000) -> int:
    return -(-(prompt * input_npm + completion * output_npm) // 10**6)


def ask(client, text: str, **kw):
    return client.chat.completions.create(model=kw.pop("model", "gpt-test"),
                                          messages=[{"role": "user", "content": text}], **kw)


def test_both_caps_become_the_smaller_one_in_the_upstreams_field(gateway, fake_openai):
    key_id, secret = gateway.create_key("0.0001")  # 100,000 nano: 1 token of output is 1,600
    ask(gateway.client(secret), "hi [usage=2,1]", max_tokens=100_000, extra_body={"max_completion_tokens": 1})
    sent = fake_openai.requests[-1]["body"]
    assert sent["max_tokens"] == 1 and "max_completion_tokens" not in sent
    assert gateway.balance(key_id) == 100_000 - cost(2, 1)
    assert gateway.usage(key_id)[0]["uncollected"] == 0


def test_a_client_cap_above_the_models_maximum_is_sent_as_the_maximum(gateway, fake_openai):
    _, secret = gateway.create_key("1")
    ask(gateway.client(secret), "hi [usage=2,1]", max_completion_tokens=5000)  # gpt-test allows 1000
    sent = fake_openai.requests[-1]["body"]
    assert sent["max_tokens"] == 1000 and "max_completion_tokens" not in sent


ADVERSARIAL = {
    "spaced digits": "1 2 3 4 5 6 7 8 9 " * 40,
    "CJK extension B": "".join(chr(0x20000 + i) for i in range(300)),
    "control characters": "".join(chr(1 + i % 30) for i in range(600)),
}


@pytest.mark.parametrize("name", list(ADVERSARIAL))
def test_prompts_that_beat_the_estimate_are_counted_exactly_on_a_small_key(gateway, name):
    text = ADVERSARIAL[name] + " [usage=tiktoken]"
    prompt = _tiktoken_usage({"messages": [{"role": "user", "content": text}]})["prompt_tokens"]
    assert prompt > 2.5 * (len(text.encode()) + 2) // 3  # the bytes/3 estimate misses by about three times
    need = cost(prompt, 1)
    # One nano-credit short: refused before any call, nothing moves.
    key_id, secret = gateway.create_key(f"{(need - 1) / NANO:.9f}")
    with pytest.raises(openai.APIStatusError) as exc:
        ask(gateway.client(secret), text, max_tokens=1)
    assert exc.value.status_code == 402 and exc.value.code == "insufficient_credits"
    assert gateway.balance(key_id) == need - 1 and gateway.usage(key_id) == []
    # Exactly enough: served and charged in full, nothing left uncollected.
    key_id, secret = gateway.create_key(f"{need / NANO:.9f}")
    ask(gateway.client(secret), text, max_tokens=1)
    row = gateway.usage(key_id)[0]
    assert (row["prompt_tokens"], row["completion_tokens"], row["cost"], row["uncollected"]) == (prompt, 1, need, 0)
    assert gateway.balance(key_id) == 0 and gateway.open_holds(key_id) == 0


def _parallel(gw, secret: str, model: str, count: int) -> list[int]:
    client = gw.client(secret, timeout=30)

    def one(_: int) -> int:
        try:
            ask(client, "hi [usage=20,30] [wait=0.5]", model=model)
            return 200
        except openai.APIStatusError as exc:
            return exc.status_code

    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(one, range(count)))


@pytest.mark.parametrize("model,credits,count", [("big", "0.5", 5), ("big-mini", "1", 50)])
def test_a_small_key_serves_parallel_requests_without_a_cap(gateway, model, credits, count):
    """A LangChain batch of 5 on gpt-4.1 with 0.5 credits, and 50 at once on gpt-4.1-mini with 1 credit: each
    request once held the model's whole max_output_tokens, so all but the first two or twenty got 402. The shared
    gateway has these two models (tests/e2e/conftest.py, BIG_MODELS)."""
    gw = gateway
    key_id, secret = gw.create_key(credits)
    statuses = _parallel(gw, secret, model, count)
    assert statuses == [200] * count, gw.log()[-2000:]
    each = cost(20, 30, *((2 * NANO, 8 * NANO) if model == "big" else (400_000_000, 1_600_000_000)))
    assert gw.balance(key_id) == int(float(credits) * NANO) - count * each
    rows = gw.usage(key_id)
    assert len(rows) == count and all(r["cost"] == each and r["uncollected"] == 0 for r in rows)
    assert gw.open_holds(key_id) == 0
    audit = gw.flask("audit")
    assert audit.returncode == 0, audit.stdout + audit.stderr


def test_the_402_says_what_requests_in_flight_hold(gateway):
    key_id, secret = gateway.create_key("0.0016")  # a 1000-token cap is 0.0016 and the prompt is on top
    client = gateway.client(secret, timeout=30)
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(ask, client, "x [usage=1,1] [wait=1]", max_tokens=900)
        import time
        deadline = time.monotonic() + 10
        while gateway.open_holds(key_id) == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        with pytest.raises(openai.APIStatusError) as exc:
            ask(client, "x", max_tokens=900)
        first.result()
    message = exc.value.message
    assert exc.value.status_code == 402
    assert "reserved by 1 request in flight" in message and "retry" in message
    assert gateway.balance(key_id) == 1_600_000 - cost(1, 1)
