"""Fuzzing every route with generated bodies: the gateway must stay closed whatever a client sends.

Every answer is OpenAI-shaped JSON with a 4xx status, or a 2xx whose charge is exactly what its usage rows say
and exactly what the balance and the ledger moved by; never a 5xx, a hang, a hold left open or a traceback in
the gateway's log. Most bodies are invalid or edge cases (wrong types, huge and negative numbers, NaN, unicode
edge cases, lone surrogates, deep nesting); the valid ones reach the fake upstreams and are billed.

FUZZ_EXAMPLES sets the examples per generated test (default keeps this file at about half a minute on two
cores); `make fuzz` is the long run. Runs are derandomized so CI sees the same bodies every time; FUZZ_SEED=N
explores a different, still reproducible, set.
"""
from __future__ import annotations

import json
import os
import re
import socket
import urllib.parse
from dataclasses import dataclass
from typing import Any

import pytest
import requests
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

import billing
from tests.gateway import Gateway

# Shrinking a failure that holds a 5,000-character string prints large reprs; the warning says nothing new.
pytestmark = pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisWarning")

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "150"))
FUZZ_SEED = os.environ.get("FUZZ_SEED")
RICH = billing.parse_credits("100000")
POOR = billing.parse_credits("0.01")  # pays for a chat reply or a few seconds of music, not for an image
POOR_REFILL_BELOW = billing.parse_credits("0.005")
TINY_PNG = ("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg==")


def fuzz_settings(examples: int = EXAMPLES):
    """Bounded, reproducible, no deadline (a 2-core box shared with other tests is slow at times)."""
    base = settings(max_examples=examples, deadline=None, database=None, derandomize=FUZZ_SEED is None,
                    suppress_health_check=list(HealthCheck), print_blob=False)

    def apply(fn):
        fn = base(fn)
        return seed(int(FUZZ_SEED))(fn) if FUZZ_SEED is not None else fn
    return apply


# ---------------------------------------------------------------------------------------------------------------
# Strategies. Generated text never contains '[', so no fake upstream's magic word ("[error500]", "[503]",
# "[close1011]", ...) can ask for a deliberate failure: every 5xx is then the gateway's own.

EDGE_STRINGS = [
    "", " ", "\x00", "\ud800", "\udfff", "a\ud800b", "\udbff\udc00", "\ufeff", "\u202e", "\u200b", "\uffff",
    "\U0010ffff", "\U0001f600" * 20, "e\u0301" * 30, "\r\n", "\t", "null", "true", "0", "-1", "1e999", "NaN",
    "sk-", "Bearer ", "../../etc/passwd", "%00", "{{}}", "<script>", "a" * 5000, "\U0001d54f" * 2000,
    "gpt-test\x00", " gpt-test", "GPT-TEST",
]
EDGE_INTS = [0, 1, -1, 2, 2**31 - 1, 2**31, -(2**31) - 1, 2**53 + 1, 2**63, -(2**63), 2**64, 10**30, -(10**30),
             10**400, -(10**400), 2**1024]


def _no_bracket(s: str) -> str:
    return s.replace("[", "(")


texts = st.one_of(
    st.text(max_size=40),
    st.text(st.characters(codec="utf-8", categories=["Cs", "Co", "Cc", "Cf", "Zs", "Mn"]), max_size=20),
    st.sampled_from(EDGE_STRINGS),
).map(_no_bracket)
ints = st.one_of(st.integers(), st.integers(-3, 200), st.sampled_from(EDGE_INTS))
floats = st.floats(allow_nan=True, allow_infinity=True)  # json.dumps writes NaN/Infinity, json.loads reads them


@dataclass(frozen=True)
class Deep:
    """A value nested depth deep, kept as this marker until encode() so Hypothesis can print and shrink it."""

    depth: int
    kind: str  # "list" or "object"

    def json(self) -> str:
        if self.kind == "list":
            return "[" * self.depth + "1" + "]" * self.depth
        return '{"a":' * self.depth + "1" + "}" * self.depth


deep = st.builds(Deep, st.integers(1, 3000), st.sampled_from(["list", "object"]))
scalars = st.one_of(st.none(), st.booleans(), ints, floats, texts)
junk = st.one_of(
    st.recursive(scalars, lambda c: st.one_of(st.lists(c, max_size=4), st.dictionaries(texts, c, max_size=4)),
                 max_leaves=10),
    deep,
)


def field(valid: st.SearchStrategy) -> st.SearchStrategy:
    """A field's value: a valid one about half of the time, else anything at all."""
    return st.one_of(valid, junk)


def body_of(required: dict[str, st.SearchStrategy], optional: dict[str, st.SearchStrategy]) -> st.SearchStrategy:
    """A JSON object with the route's fields (each sometimes missing) and a few unknown ones."""
    fields = {**required, **optional}
    keyed = st.fixed_dictionaries({}, optional=fields)
    extra = st.dictionaries(texts.filter(lambda k: k not in fields), junk, max_size=2)
    return st.tuples(keyed, extra).map(lambda t: {**t[1], **t[0]})


CHAT_MODELS = ["gpt-test", "gpt-text", "gemini-test"]
IMAGE_MODELS = ["gemini-2.5-flash-image", "imagen-4.0-generate-001", "gpt-image-1"]
MUSIC_MODELS = ["lyria-realtime-exp"]
ALL_MODELS = CHAT_MODELS + IMAGE_MODELS + MUSIC_MODELS


def models(mine: list[str]) -> st.SearchStrategy:
    return st.one_of(st.sampled_from(mine), st.sampled_from(mine), st.sampled_from(ALL_MODELS + ["nope", ""]),
                     junk)


# Image URLs only ever name this machine (a closed port, or data: URLs): the gateway fetches some of them.
safe_urls = st.one_of(
    st.just(f"data:image/png;base64,{TINY_PNG}"),
    st.sampled_from(["data:image/png;base64,", "data:image/png;base64,!!!!", "data:text/plain;base64,aGk=",
                     "data:image/png,raw", "data:", "http://127.0.0.1:1/x.png", "https://127.0.0.1:1/x.png",
                     "ftp://127.0.0.1/x.png", "file:///etc/passwd", "http://user:pw@127.0.0.1:1/x.png",
                     "http://[::1]:1/x.png", "http://127.0.0.1:99999/x.png", "http:///x.png", "javascript:1",
                     "http://0x7f.1:1/", ""]),
    st.text(st.characters(exclude_characters=":[/"), max_size=20),
)
content_parts = st.lists(st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": field(texts)}),
    st.fixed_dictionaries({"type": st.just("image_url"),
                           "image_url": field(st.fixed_dictionaries({"url": safe_urls},
                                                                    optional={"detail": field(texts)}))}),
    st.dictionaries(st.sampled_from(["type", "text", "image_url", "input_audio"]), junk, max_size=3),
), max_size=3)
message = st.fixed_dictionaries(
    {"role": field(st.sampled_from(["system", "user", "assistant", "developer", "tool"]))},
    optional={"content": field(st.one_of(texts, content_parts)), "name": field(texts),
              "tool_call_id": field(texts), "tool_calls": junk},
)
small_int = field(st.one_of(st.integers(1, 64), ints))
common_optional = {
    "stream": field(st.booleans()),
    "stream_options": field(st.fixed_dictionaries({}, optional={"include_usage": field(st.booleans())})),
    "max_tokens": small_int, "n": field(st.one_of(st.integers(1, 4), ints)),
    "temperature": field(st.floats(0, 2)), "top_p": junk, "stop": junk, "user": junk, "seed": junk,
    "logprobs": junk, "presence_penalty": junk,
}
_random_chat_bodies = body_of(
    {"model": models(CHAT_MODELS), "messages": field(st.lists(message, min_size=1, max_size=3))},
    {**common_optional, "max_completion_tokens": small_int, "tools": junk, "tool_choice": junk,
     "response_format": junk},
)
_random_completion_bodies = body_of(
    {"model": models(CHAT_MODELS),
     "prompt": field(st.one_of(texts, st.lists(texts, max_size=3), st.lists(st.integers(0, 100_000), max_size=5),
                               st.lists(st.lists(st.integers(0, 100_000), max_size=4), max_size=3)))},
    {**common_optional, "best_of": field(st.integers(1, 3)), "echo": junk, "suffix": junk},
)
_random_image_bodies = body_of(
    {"prompt": field(texts)},
    {"model": models(IMAGE_MODELS), "n": field(st.integers(1, 3)),
     "size": field(st.sampled_from(["auto", "1024x1024", "1536x1024", "1x100000", "0x0", "1024X1024", "999999x1"])),
     "response_format": field(st.sampled_from(["b64_json", "url"])), "stream": junk, "quality": junk,
     "style": junk, "background": junk},
)
weighted = st.lists(st.fixed_dictionaries({"text": field(texts)}, optional={"weight": field(floats)}), max_size=3)
music_config = st.dictionaries(
    st.one_of(st.sampled_from(["temperature", "top_k", "topK", "seed", "guidance", "bpm", "density", "brightness",
                               "scale", "mute_bass", "muteDrums", "only_bass_and_drums", "music_generation_mode"]),
              texts),
    st.one_of(ints, floats, st.booleans(), st.sampled_from(["C_MAJOR_A_MINOR", "QUALITY", "DIVERSITY"]), junk),
    max_size=3,
)
_random_music_bodies = body_of(
    {"prompt": field(texts)},
    {"model": models(MUSIC_MODELS), "weighted_prompts": field(weighted),
     "duration_seconds": field(st.one_of(st.integers(1, 8), st.floats(0, 12), ints)),
     "music_generation_config": field(music_config), "response_format": field(st.sampled_from(["pcm", "wav"]))},
)



def near_valid(valid: st.SearchStrategy, fields: list[str]) -> st.SearchStrategy:
    """A valid body with at most one field replaced by anything at all, so the fuzz reaches past validation
    into hold, upstream call and settlement with edge values (lone surrogates, huge numbers) in valid places."""
    def mutate(t: tuple[dict, str, Any, bool]) -> dict:
        body, name, value, keep = t
        return body if keep else {**body, name: value}
    return st.tuples(valid, st.sampled_from(fields), junk, st.booleans()).map(mutate)


valid_parts = st.lists(st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": texts}),
    st.fixed_dictionaries({"type": st.just("image_url"), "image_url": st.fixed_dictionaries({"url": safe_urls})}),
), min_size=1, max_size=2)
streaming = {"stream": st.booleans(), "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
             "max_tokens": st.integers(1, 64), "n": st.integers(1, 3)}
chat_bodies = st.one_of(_random_chat_bodies, near_valid(st.fixed_dictionaries(
    {"model": st.sampled_from(CHAT_MODELS),
     "messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]),
                                                 "content": st.one_of(texts, valid_parts)}), min_size=1, max_size=3)},
    optional={**streaming, "max_completion_tokens": st.integers(1, 64)}),
    ["model", "messages", "stream", "stream_options", "max_tokens", "max_completion_tokens", "n", "user"]))
completion_bodies = st.one_of(_random_completion_bodies, near_valid(st.fixed_dictionaries(
    {"model": st.sampled_from(CHAT_MODELS),
     "prompt": st.one_of(texts, st.lists(texts, min_size=1, max_size=3),
                         st.lists(st.integers(0, 100_000), min_size=1, max_size=5))},
    optional={**streaming, "best_of": st.integers(1, 3)}),
    ["model", "prompt", "stream", "stream_options", "max_tokens", "n", "best_of", "echo"]))
image_bodies = st.one_of(_random_image_bodies, near_valid(st.fixed_dictionaries(
    {"model": st.sampled_from(IMAGE_MODELS), "prompt": texts},
    optional={"n": st.integers(1, 3), "size": st.sampled_from(["auto", "1024x1024", "1536x1024"]),
              "response_format": st.sampled_from(["b64_json", "url"])}),
    ["model", "prompt", "n", "size", "response_format", "stream", "quality"]))
music_bodies = st.one_of(_random_music_bodies, near_valid(st.fixed_dictionaries(
    {"model": st.sampled_from(MUSIC_MODELS), "prompt": texts},
    optional={"duration_seconds": st.integers(4, 6), "response_format": st.sampled_from(["pcm", "wav"]),
              "music_generation_config": st.fixed_dictionaries({}, optional={
                  "bpm": st.integers(60, 200), "temperature": st.floats(0, 3), "scale": st.just("C_MAJOR_A_MINOR")})}),
    ["model", "prompt", "weighted_prompts", "duration_seconds", "music_generation_config", "response_format"]))

# ---------------------------------------------------------------------------------------------------------------
# The gateway under fuzz, its keys, and the checks made after every exchange.

@dataclass
class Account:
    key_id: int
    secret: str
    refill: int  # a poor key is topped up to its starting balance so it keeps reaching the upstream


class Fuzz:
    """One gateway for the whole file, reached over one keep-alive session, checked after each request."""

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw
        self.http = self.session()
        self.conn = gw.db()
        rich_id, rich = gw.create_key("100000", name="fuzz-rich")
        poor_id, poor = gw.create_key("0.01", name="fuzz-poor")
        self.accounts = [Account(rich_id, rich, 0), Account(poor_id, poor, POOR)]
        self.log_offset = 0

    @staticmethod
    def session() -> requests.Session:
        """A keep-alive session that ignores proxy variables: every request goes straight to 127.0.0.1, and
        requests no longer scans the environment for proxies on each of the thousand requests."""
        http = requests.Session()
        http.trust_env = False
        return http

    def state(self, key_id: int) -> tuple[int, int, int, int]:
        """(balance, open holds, ledger sum, ledger rows) of a key."""
        return tuple(self.conn.execute(
            "SELECT (SELECT balance FROM api_keys WHERE id = :k), (SELECT COUNT(*) FROM holds WHERE key_id = :k),"
            " (SELECT COALESCE(SUM(amount), 0) FROM ledger WHERE key_id = :k),"
            " (SELECT COUNT(*) FROM ledger WHERE key_id = :k)", {"k": key_id}).fetchone())

    def refill(self, acct: Account) -> None:
        balance = self.state(acct.key_id)[0]
        if acct.refill and balance < POOR_REFILL_BELOW:
            self.conn.execute("BEGIN IMMEDIATE")
            billing.credit(self.conn, acct.key_id, acct.refill - balance, "topup")
            self.conn.execute("COMMIT")

    def new_log(self) -> str:
        with open(self.gw.log_path, "rb") as f:
            f.seek(self.log_offset)
            data = f.read()
        self.log_offset += len(data)
        return data.decode("utf-8", "replace")

    def send(self, method: str, path: str, data: bytes | None, acct: Account,
             headers: dict[str, str] | None = None) -> None:
        """One request, then every check of the module docstring for it."""
        self.refill(acct)
        before = self.state(acct.key_id)
        self.new_log()  # whatever was logged before this request is not its doing
        hdrs = {"Authorization": f"Bearer {acct.secret}", "Content-Type": "application/json", **(headers or {})}
        try:
            resp = self.http.request(method, self.gw.url + path, data=data, headers=hdrs, timeout=30)
            raw = resp.content
        except requests.RequestException as exc:
            self.http = self.session()
            pytest.fail(f"no answer to {method} {path}: {type(exc).__name__}: {exc}\nlog: {self.new_log()[-2000:]}")
        log = self.new_log()
        assert "Traceback" not in log, f"the gateway logged a traceback:\n{log[-4000:]}"
        status = resp.status_code
        assert status == 200 or 400 <= status < 500, f"status {status}: {raw[:500]!r}"
        rid = resp.headers.get("x-request-id", "")
        rows = self.conn.execute("SELECT cost, uncollected, status, request_id FROM usage "
                                 "WHERE request_id = ? OR parent_request_id = ?", (rid, rid)).fetchall()
        after = self.state(acct.key_id)
        charged = sum(r["cost"] - r["uncollected"] for r in rows)
        assert after[1] == 0, f"a hold was left open ({after[1]}) after status {status}"
        assert after[0] == after[2], f"balance {after[0]} != ledger {after[2]}"
        if status == 200 and method == "GET":
            doc = as_json(raw, status)
            assert isinstance(doc, dict) and doc.get("object") == "model", f"a 200 answered {raw[:200]!r}"
            assert before == after and not rows, "reading a model moved credits"
        elif status == 200:
            if resp.headers.get("Content-Type", "").startswith("text/event-stream"):
                check_stream(raw)
            else:
                doc = as_json(raw, status)
                assert isinstance(doc, dict), f"a 200 answered {raw[:200]!r}"
                assert resp.headers.get("x-credits-charged") == billing.format_credits(charged), (
                    f"x-credits-charged {resp.headers.get('x-credits-charged')} but the usage rows say {charged}")
            assert any(r["request_id"] == rid and r["status"] == 200 for r in rows), f"no usage row for {rid}"
            assert before[0] - after[0] == charged, (
                f"balance moved by {before[0] - after[0]} but the usage rows charged {charged}")
            assert after[2] - before[2] == -charged, f"the ledger moved by {after[2] - before[2]}, not {-charged}"
        else:
            doc = as_json(raw, status)
            check_error(doc, status)
            assert charged == 0, f"status {status} charged {charged}"
            assert before[0] == after[0] and before[2:] == after[2:], (
                f"status {status} moved the balance or ledger: {before} -> {after}")


def as_json(raw: bytes, status: int) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        pytest.fail(f"status {status} answered something that is not JSON: {raw[:300]!r}")


def check_error(doc: Any, status: int) -> None:
    """OpenAI's error shape: {"error": {"message": str, "type": str, "param": ..., "code": ...}}."""
    assert isinstance(doc, dict) and isinstance(doc.get("error"), dict), f"status {status}: {doc!r:.300}"
    err = doc["error"]
    assert set(err) >= {"message", "type", "param", "code"}, f"error without OpenAI's fields: {err!r:.300}"
    assert isinstance(err["message"], str) and err["message"], err
    assert isinstance(err["type"], str) and err["type"], err
    assert err["param"] is None or isinstance(err["param"], str), err
    assert err["code"] is None or isinstance(err["code"], str), err


def check_stream(raw: bytes) -> None:
    """A 200 stream is SSE whose data events are JSON objects without an error, ending in [DONE]."""
    events = [line[6:] for line in raw.split(b"\n") if line.startswith(b"data: ")]
    assert events and events[-1] == b"[DONE]", f"the stream did not end in [DONE]: {raw[-300:]!r}"
    for data in events[:-1]:
        obj = json.loads(data)
        assert isinstance(obj, dict) and "error" not in obj, f"error event in a 200 stream: {data[:300]!r}"


_DEEP = re.compile(r'"@@deep-(list|object)-(\d+)@@"')


def encode(body: Any) -> bytes:
    # ensure_ascii keeps lone surrogates as \ud800 escapes, which is how a client's JSON library sends them.
    text = json.dumps(body, default=lambda d: f"@@deep-{d.kind}-{d.depth}@@")
    return _DEEP.sub(lambda m: Deep(int(m[2]), m[1]).json(), text).encode()


@pytest.fixture(scope="module")
def fuzz(gateway_config):
    tmp, cfg = gateway_config()
    for name in ("gpt-nokey", "gpt-dead", "lyria-nosetup"):  # they fail with a 5xx on purpose
        del cfg["models"][name]
    # A music body without duration_seconds gets the shortest clip validation allows: the default path is fuzzed
    # the same, and each such clip costs half as much to stream and encode as the documented 8 s default.
    cfg["music"] = {"default_duration_seconds": 4}
    gw = Gateway(tmp, cfg).start()
    f = Fuzz(gw)
    yield f
    f.conn.close()
    gw.stop()


accounts = st.sampled_from([0, 0, 1])  # index into Fuzz.accounts: mostly the rich key


# ---------------------------------------------------------------------------------------------------------------
# Generated bodies, one test per route.

@fuzz_settings()
@given(body=chat_bodies, who=accounts)
def test_fuzz_chat_completions(fuzz, body, who):
    fuzz.send("POST", "/v1/chat/completions", encode(body), fuzz.accounts[who])


@fuzz_settings()
@given(body=completion_bodies, who=accounts)
def test_fuzz_completions(fuzz, body, who):
    fuzz.send("POST", "/v1/completions", encode(body), fuzz.accounts[who])


@fuzz_settings()
@given(body=image_bodies, who=accounts)
def test_fuzz_images(fuzz, body, who):
    fuzz.send("POST", "/v1/images/generations", encode(body), fuzz.accounts[who])


@fuzz_settings(max(10, EXAMPLES // 2))  # a valid one generates up to 30 s of audio; fewer keep the run short
@given(body=music_bodies, who=accounts)
def test_fuzz_music(fuzz, body, who):
    fuzz.send("POST", "/v1/audio/music", encode(body), fuzz.accounts[who])


@fuzz_settings()
# Ids past ~1,300 characters quote to a request line longer than gunicorn's 4,094-byte limit, which gunicorn
# answers itself (414, HTML) before the app runs; no model id is that long.
@given(model_id=st.one_of(st.sampled_from(ALL_MODELS), texts.filter(lambda t: 0 < len(t) <= 300)),
       quote_slash=st.booleans())
def test_fuzz_get_model(fuzz, model_id, quote_slash):
    try:
        path = urllib.parse.quote(model_id, safe="" if quote_slash else "/")
    except UnicodeEncodeError:  # a lone surrogate has no UTF-8 form, so no client can put it in a URL
        path = urllib.parse.quote(model_id.encode("utf-8", "surrogatepass"), safe="")
    fuzz.send("GET", f"/v1/models/{path}", None, fuzz.accounts[0])


ROUTES = ["/v1/chat/completions", "/v1/completions", "/v1/images/generations", "/v1/audio/music"]


@fuzz_settings()
@given(route=st.sampled_from(ROUTES),
       data=st.one_of(st.binary(max_size=200), st.binary(max_size=60).map(lambda b: b'{"model": ' + b)))
def test_fuzz_raw_bytes(fuzz, route, data):
    fuzz.send("POST", route, data, fuzz.accounts[0])


# ---------------------------------------------------------------------------------------------------------------
# Hand-written hostile bodies on every POST route.

def _valid(route: str) -> dict:
    return {"/v1/chat/completions": {"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]},
            "/v1/completions": {"model": "gpt-test", "prompt": "hi"},
            "/v1/images/generations": {"model": "gpt-image-1", "prompt": "a cat"},
            "/v1/audio/music": {"model": "lyria-realtime-exp", "prompt": "piano", "duration_seconds": 4}}[route]


def _text_field(route: str) -> tuple[str, ...]:
    return ("messages", 0, "content") if route == "/v1/chat/completions" else ("prompt",)


def _with(route: str, value: Any, where: tuple | None = None) -> bytes:
    body = _valid(route)
    where = where or _text_field(route)
    target: Any = body
    for step in where[:-1]:
        target = target[step]
    target[where[-1]] = value
    return encode(body)


HUGE = 10**400
RAW_CASES: list[tuple[str, Any]] = [
    ("empty", lambda r: b""),
    ("truncated", lambda r: encode(_valid(r))[:-3]),
    ("not-an-object", lambda r: b"[1, 2, 3]"),
    ("null", lambda r: b"null"),
    ("bom", lambda r: b"\xef\xbb\xbf" + encode(_valid(r))),
    ("utf16", lambda r: json.dumps(_valid(r)).encode("utf-16")),
    ("invalid-utf8", lambda r: b'{"model": "\xff\xfe"}'),
    ("nan", lambda r: b'{"model": NaN, "prompt": Infinity}'),
    ("duplicate-keys", lambda r: b'{"model": 1, "model": "gpt-test", "model": null}'),
    ("5000-digit-int", lambda r: b'{"n": ' + b"9" * 5000 + b"}"),
    ("deep-100000-list", lambda r: b"[" * 100_000 + b"]" * 100_000),
    ("deep-100000-object", lambda r: b'{"a":' * 100_000 + b"1" + b"}" * 100_000),
    ("deep-100000-in-text-field", lambda r: _with(r, "@@").replace(b'"@@"', b"[" * 100_000 + b"]" * 100_000)),
    ("deep-100000-in-extra-field", lambda r: encode(_valid(r))[:-1] + b', "x": ' + b"[" * 100_000
     + b"]" * 100_000 + b"}"),
    ("lone-surrogate-text", lambda r: _with(r, "hi \ud800 there")),
    ("lone-low-surrogate-text", lambda r: _with(r, "\udfff")),
    ("surrogate-model", lambda r: _with(r, "gpt-test\ud800", ("model",))),
    ("nul-text", lambda r: _with(r, "a\x00b")),
    ("text-nested-900", lambda r: _with(r, Deep(900, "list"))),
    ("text-nested-2000", lambda r: _with(r, Deep(2000, "list"))),
    ("huge-int-text", lambda r: _with(r, HUGE)),
    ("huge-int-n", lambda r: _with(r, HUGE, ("n",))),
    ("negative-huge-int-n", lambda r: _with(r, -HUGE, ("n",))),
    ("huge-int-max-tokens", lambda r: _with(r, HUGE, ("max_tokens",))),
    ("huge-int-duration", lambda r: _with(r, HUGE, ("duration_seconds",))),
    ("negative-huge-int-duration", lambda r: _with(r, -HUGE, ("duration_seconds",))),
    ("huge-int-model", lambda r: _with(r, HUGE, ("model",))),
    ("huge-float", lambda r: _with(r, 1e308, ("n",))),
    ("huge-int-music-config", lambda r: _with(r, {"bpm": HUGE, "seed": -HUGE, "temperature": HUGE},
                                              ("music_generation_config",))),
    ("huge-int-weight", lambda r: _with(r, [{"text": "piano", "weight": HUGE}], ("weighted_prompts",))
     if r == "/v1/audio/music" else _with(r, [HUGE], ("stop",))),
]


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("name,make", RAW_CASES, ids=[c[0] for c in RAW_CASES])
def test_hostile_raw_body(fuzz, route, name, make):
    fuzz.send("POST", route, make(route), fuzz.accounts[0])


def _raw_exchange(fuzz: Fuzz, request: bytes) -> bytes:
    """Send bytes as they are on a new connection and read until the gateway closes or 10 s pass."""
    with socket.create_connection(("127.0.0.1", fuzz.gw.port), timeout=10) as s:
        s.sendall(request)
        s.shutdown(socket.SHUT_WR)
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
        except TimeoutError:
            pass
    return out


CHUNKED_CASES = {
    "bad-size": b"zz\r\n{}\r\n0\r\n\r\n",
    "negative-size": b"-5\r\n{}\r\n0\r\n\r\n",
    "size-too-long": b"2\r\n{}}}}}\r\n0\r\n\r\n",
    "no-terminator": b"2\r\n{}",
    "huge-size": b"ffffffffffffffffffff\r\n{}\r\n0\r\n\r\n",
}


@pytest.mark.parametrize("case", list(CHUNKED_CASES))
def test_malformed_chunked_body(fuzz, case):
    acct = fuzz.accounts[0]
    before = fuzz.state(acct.key_id)
    fuzz.new_log()
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {acct.secret}\r\n"
            "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n").encode()
    out = _raw_exchange(fuzz, head + CHUNKED_CASES[case])
    log = fuzz.new_log()
    assert "Traceback" not in log, f"the gateway logged a traceback:\n{log[-4000:]}"
    assert out.startswith(b"HTTP/1.1 4"), f"answered {out[:300]!r}"
    _, _, payload = out.partition(b"\r\n\r\n")
    check_error(as_json(payload, 400), 400)
    assert fuzz.state(acct.key_id) == before


def test_after_fuzzing_the_books_balance(fuzz):
    """The run as a whole: audit OK, no hold left, every balance equals its ledger, no traceback logged."""
    audit = fuzz.gw.flask("audit")
    assert audit.returncode == 0 and "audit OK" in audit.stdout, audit.stdout + audit.stderr
    assert fuzz.conn.execute("SELECT COUNT(*) FROM holds").fetchone()[0] == 0
    for acct in fuzz.accounts:
        balance, holds, ledger, _ = fuzz.state(acct.key_id)
        assert holds == 0 and balance == ledger
    assert "Traceback" not in fuzz.gw.log()

