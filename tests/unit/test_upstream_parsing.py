"""Pure functions that read what upstreams send: the SSE parser, the credential scrubber, Retry-After, music numbers."""
from __future__ import annotations

import json

import pytest

import validation
from config import UpstreamConfig
from errors import BadRequestError, UpstreamError
from providers.http import retry_after_seconds, scrub
from providers.openai import SSEParser, scrub_error_event

EVENTS = [b'{"a": 1}', b'{"b": "two words"}', b"line one\nline two", b"", b"[DONE]"]


def _stream(eol: bytes) -> bytes:
    """EVENTS framed with one line ending, plus comments, other fields and a data-less event the parser skips."""
    lines = [b": ping", b"", b"data: " + EVENTS[0], b"",
             b"event: message", b"id: 7", b"data:" + EVENTS[1], b"",  # no space after the colon
             b"data: line one", b"data: line two", b"",
             b"retry: 100", b"",  # no data: not an event
             b"data", b"",  # empty data: not dispatched
             b"data: " + EVENTS[4], b"", b""]
    return eol.join(lines)


EXPECTED = [EVENTS[0], EVENTS[1], EVENTS[2], EVENTS[4]]


def _feed_all(parser: SSEParser, pieces: list[bytes]) -> list[bytes]:
    out: list[bytes] = []
    for piece in pieces:
        out += parser.feed(piece)
    return out


@pytest.mark.parametrize("eol", [b"\n", b"\r\n", b"\r"], ids=["LF", "CRLF", "CR"])
def test_every_split_point_gives_the_same_events(eol):
    stream = _stream(eol)
    assert _feed_all(SSEParser("up", 1 << 20), [stream]) == EXPECTED
    for cut in range(1, len(stream)):
        got = _feed_all(SSEParser("up", 1 << 20), [stream[:cut], stream[cut:]])
        assert got == EXPECTED, f"split at {cut}: {stream[cut - 3:cut]!r}|{stream[cut:cut + 3]!r}"


@pytest.mark.parametrize("eol", [b"\n", b"\r\n", b"\r"], ids=["LF", "CRLF", "CR"])
def test_byte_by_byte(eol):
    stream = _stream(eol)
    assert _feed_all(SSEParser("up", 1 << 20), [stream[i:i + 1] for i in range(len(stream))]) == EXPECTED


def test_every_pair_of_split_points_in_crlf_blank_line():
    # The reported failure: a read ending after the first CR, or after the second, of CR LF CR LF.
    stream = b"data: x\r\n\r\ndata: [DONE]\r\n\r\n"
    for i in range(1, len(stream)):
        for j in range(i + 1, len(stream)):
            got = _feed_all(SSEParser("up", 1024), [stream[:i], stream[i:j], stream[j:]])
            assert got == [b"x", b"[DONE]"], (i, j)


def test_mixed_line_endings_in_one_stream():
    stream = b"data: a\r\n\ndata: b\r\rdata: c\n\r\n"
    assert _feed_all(SSEParser("up", 1024), [stream]) == [b"a", b"b", b"c"]


def test_an_event_past_the_cap_is_an_upstream_error():
    parser = SSEParser("up", 1000)
    parser.feed(b"data: " + b"x" * 900)
    with pytest.raises(UpstreamError, match="larger than 1000 bytes"):
        parser.feed(b"x" * 200)


def test_many_data_lines_count_toward_the_cap():
    parser = SSEParser("up", 1000)
    with pytest.raises(UpstreamError):
        for _ in range(200):
            parser.feed(b"data: 123456789\n")


def test_events_under_the_cap_reset_the_count():
    parser = SSEParser("up", 1000)
    for _ in range(100):  # 100 events of 900 bytes: far past the cap in all, each within it
        assert parser.feed(b"data: " + b"y" * 900 + b"\n\n") == [b"y" * 900]


def test_a_long_unseparated_event_is_scanned_in_linear_time():
    # 64 KiB reads of a 4 MiB line: each byte is looked at once, so this is milliseconds, not seconds.
    parser = SSEParser("up", 4 << 20)
    piece = b"a" * 65536
    parser.feed(b"data: ")
    for _ in range(63):
        assert parser.feed(piece) == []
    assert parser.feed(b"\n\n") == [b"a" * (63 * 65536)]


UP = UpstreamConfig(name="up", kind="openai", base_url="http://127.0.0.1:1/v1", api_key_env="TEST_SCRUB_KEY")
SECRET = "sk-proj-S3cr3tValue_123456"


@pytest.fixture
def keyed(monkeypatch):
    monkeypatch.setenv("TEST_SCRUB_KEY", SECRET)
    return UP


@pytest.mark.parametrize("text", [
    f"Authorization: Bearer {SECRET}",
    f'{{"authorization": "Bearer {SECRET}"}}',
    f"bad header authorization=Basic {SECRET}",
    f"GET /v1?key={SECRET}&alt=json",
    f"api_key={SECRET}",
    f"x-goog-api-key: {SECRET}",
    f"raw {SECRET} here",
    f"bearer {SECRET}",
])
def test_scrub_removes_the_key_in_every_shape(keyed, text):
    out = scrub(text, keyed)
    assert SECRET not in out and "S3cr3t" not in out
    assert "bearer sk-" not in out.lower() and "key=" not in out.lower()
    assert "[redacted]" in out


def test_scrub_removes_token_shapes_without_knowing_the_key():
    out = scrub("Authorization: Bearer abc.def-ghi and key=AIzaSyA1234567890abcdefghijklmnop and sk-other1234567")
    assert "abc.def" not in out and "AIza" not in out and "sk-other" not in out


def test_scrub_keeps_ordinary_messages_and_caps_length(keyed):
    assert scrub("The model `gpt-x` does not exist.", keyed) == "The model `gpt-x` does not exist."
    assert len(scrub("word " * 1000, keyed)) <= 503


def test_scrub_drops_a_key_cut_by_the_prefix_it_reads(keyed):
    # The scrubber reads a bounded prefix; a key straddling its end must not survive as a fragment.
    # A long bearer token before it shrinks to "[redacted]", which would pull a fragment into the first 500.
    for pad in range(3960, 4000):
        out = scrub("Bearer " + "t" * pad + " " + SECRET, keyed)
        assert "sk-p" not in out and len(out) < 40, out


def test_scrub_error_event(keyed):
    data = json.dumps({"error": {"message": f"echo Authorization: Bearer {SECRET}", "type": "server_error",
                                 "param": None, "code": None}}).encode()
    out = json.loads(scrub_error_event(keyed, data))
    assert SECRET not in out["error"]["message"] and out["error"]["type"] == "server_error"
    plain = b'{"choices": [{"delta": {"content": "an \\"error\\" word"}}]}'
    assert scrub_error_event(keyed, plain) == plain
    assert SECRET not in scrub_error_event(keyed, json.dumps({"error": f"key={SECRET}"}).encode()).decode()


@pytest.mark.parametrize("value, expected", [
    ("7", "7"), ("0.2", "1"), ("-3", "1"), ("inf", None), ("-inf", None), ("nan", None), ("Infinity", None),
    ("1e400", None), ("1e308", "86400"), ("9" * 400, None), ("Wed, 21 Oct 2015 07:28:00 GMT", None), ("", None),
    (None, None),
])
def test_retry_after_seconds(value, expected):
    assert retry_after_seconds(value) == expected


def test_huge_integers_in_music_fields_are_a_400():
    huge = 10**400
    with pytest.raises(BadRequestError) as exc:
        validation.music_seconds(huge, 8.0)
    assert exc.value.param == "duration_seconds"
    for name in ("bpm", "seed", "temperature", "density"):
        with pytest.raises(BadRequestError) as exc:
            validation.music_config({name: huge})
        assert exc.value.param == f"music_generation_config.{name}"
    with pytest.raises(BadRequestError):
        validation.music_prompts({"weighted_prompts": [{"text": "jazz", "weight": huge}]})
    assert validation.music_seconds(10, 8.0) == 10.0 and validation.music_config({"bpm": 120}) == {"bpm": 120}
