"""A stream's delivered text is kept bounded (counted and dropped as it goes), and still counted exactly."""
from __future__ import annotations

import random

import tokens
from routes.relay import FOLD_CHARS, DeliveredText


def _exact(text: str) -> int:
    tokens.count("x")  # loads the encoding
    return len(tokens._encoding.encode_ordinary(text))


def _feed(text: str, piece: int) -> tuple[DeliveredText, int]:
    d, kept = DeliveredText(), 0
    for i in range(0, len(text), piece):
        d.add(text[i:i + piece])
        kept = max(kept, d.size)
    return d, kept


def test_long_english_answer_is_bounded_and_exact():
    rng = random.Random(7)
    words = ["the", "gateway", "counts", "tokens", "1234", "(maybe)", "isn't", "x" * 40, "end.", "\n\n", "  ",
             "café", "🙂", "naïve", "--", "\t"]
    text = " ".join(rng.choice(words) for _ in range(300_000))  # about 2 MB
    d, kept = _feed(text, 7)
    assert kept <= FOLD_CHARS + 7  # never more than the fold size plus one piece, whatever the length
    assert d.counted > 0
    assert d.tokens() == _exact(text)


def test_text_without_spaces_is_bounded_and_nearly_exact():
    text = "漢字かな交じり文" * 40_000  # 320,000 characters, no space to cut at
    d, kept = _feed(text, 5)
    assert kept <= 4 * FOLD_CHARS + 5
    cuts = len(text) // (4 * FOLD_CHARS - FOLD_CHARS // 4) + 1
    assert abs(d.tokens() - _exact(text)) <= cuts  # a cut inside a piece miscounts it by at most a token


def test_short_answer_is_never_counted_in_flight():
    d, _ = _feed("tok0 tok1 tok2 " * 100, 5)
    assert d.counted == 0 and d.tokens() == _exact("tok0 tok1 tok2 " * 100)
