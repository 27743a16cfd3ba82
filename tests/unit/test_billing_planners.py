"""billing.py's hold planners and costs on their own (the books themselves are tested end to end)."""
from __future__ import annotations

from decimal import Decimal

import pytest

import billing
from config import ModelConfig
from errors import InsufficientCreditsError

MODEL = ModelConfig(id="m", upstream="u", upstream_model="m", input_price=Decimal("0.40"),
                    output_price=Decimal("1.60"), per_image=Decimal("0.039"), per_second=Decimal("0.001"),
                    max_output_tokens=1000)


def test_client_cap_is_held_in_full_or_refused():
    plan = billing.token_planner(MODEL, prompt_tokens=100, mult=2, client_cap=50)
    assert plan(10**9) == (billing.ceil_div(2 * (100 * 400_000_000 + 50 * 1_600_000_000), 10**6), 50)
    with pytest.raises(InsufficientCreditsError):
        plan(1000)


def test_uncapped_request_sends_what_the_balance_affords_and_holds_a_share():
    plan = billing.token_planner(MODEL, prompt_tokens=10, mult=1, client_cap=None)
    amount, cap = plan(10**9)
    assert cap == MODEL.max_output_tokens and amount == billing.token_cost(MODEL, 10, 1000)
    small = 10 * 400 + 300 * 1600  # nano-credits: 10 prompt tokens and exactly 300 output tokens
    amount, cap = plan(small)
    assert cap == 300 and amount <= small


def test_prompt_tokens_to_hold_counts_exactly_only_when_it_matters():
    exact_calls = []

    def exact() -> int:
        exact_calls.append(1)
        return 42
    assert billing.prompt_tokens_to_hold(MODEL, 10**12, 100, exact, 1) == 100 and not exact_calls
    assert billing.prompt_tokens_to_hold(MODEL, 1, 100, exact, 1) == 42 and exact_calls
    assert billing.prompt_tokens_to_hold(MODEL, 1, billing.EXACT_MAX_TOKENS + 1, exact, 1) \
        == 3 * (billing.EXACT_MAX_TOKENS + 1)


def test_fixed_prices_are_exact_integers():
    assert billing.images_cost(MODEL, 3) == 3 * 39_000_000
    assert billing.seconds_cost(MODEL, 4.5) == 4_500_000
    assert billing.seconds_cost(MODEL, 1 / 3) == 333_334  # rounded up to a whole nano-credit
    assert isinstance(billing.seconds_cost(MODEL, 7.25), int)


def test_dumps_with_cost_writes_a_plain_decimal():
    usage = {"prompt_tokens": 1}
    text = billing.dumps_with_cost({"usage": usage}, usage, 15600)
    assert text == '{"usage":{"prompt_tokens":1,"cost":0.0000156}}'
