"""Credits as text: the operator's decimal credits and nano-credits convert exactly both ways."""
from __future__ import annotations

import billing

NANO = 10**9


def test_format_and_parse_credits():
    assert billing.format_credits(15600) == "0.0000156"
    assert billing.format_credits(5 * NANO) == "5"
    assert billing.format_credits(0) == "0"
    assert billing.parse_credits("0.5") == NANO // 2
    assert billing.parse_credits("0.000000001") == 1
    for bad in ("-1", "0.0000000001", "abc", "nan"):
        try:
            billing.parse_credits(bad)
        except ValueError:
            continue
        raise AssertionError(f"{bad} was accepted")


