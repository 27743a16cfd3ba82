"""The rest of the OpenAI API end to end: /v1/responses (relayed to a native upstream and translated for a chat-only
one), embeddings, speech, transcription, moderation, the model list and CORS, through the official SDK against
the real gunicorn gateway, each charge checked exactly in the balance, the usage row and the ledger."""
from __future__ import annotations

import base64
import hashlib
import io
import struct
import wave

import openai
import pytest
import requests

from tests.e2e.conftest import API_ORIGIN as ORIGIN
from tests.e2e.fake_media import TRANSCRIPT, audio_bytes
from tests.gateway import Gateway

START = 10 * 10**9  # every key starts with 10 credits


# The deployment (its fakes and config) is tests/e2e/conftest.py's openai_api_gateway, shared with
# tests/e2e/test_ai_sdk_e2e.py: both modules are one xdist group, so it starts once for the two.
pytestmark = pytest.mark.xdist_group("openai-api-deployment")


@pytest.fixture
def fakes(openai_api_fakes):
    return openai_api_fakes


@pytest.fixture
def gw(openai_api_gateway):
    return openai_api_gateway


def books(gw: Gateway, key_id: int) -> tuple[int, list, list, int]:
    """(balance, usage rows, ledger charge amounts, open holds) of a key."""
    conn = gw.db()
    try:
        ledger = [r[0] for r in conn.execute("SELECT amount FROM ledger WHERE key_id = ? AND kind = 'charge' "
                                             "ORDER BY id", (key_id,))]
    finally:
        conn.close()
    return gw.balance(key_id), gw.usage(key_id), ledger, gw.open_holds(key_id)


def assert_charged(gw: Gateway, key_id: int, cost: int, *, route: str, model: str, prompt: int | None = None,
                   completion: int | None = None, estimated: int = 0, units: float | None = None) -> None:
    balance, rows, ledger, holds = books(gw, key_id)
    assert (balance, ledger, holds) == (START - cost, [-cost], 0)
    assert len(rows) == 1
    row = rows[0]
    assert (row["route"], row["model"], row["cost"], row["uncollected"], row["status"], row["estimated"]) == \
        (route, model, cost, 0, 200, estimated)
    if prompt is not None:
        assert (row["prompt_tokens"], row["completion_tokens"]) == (prompt, completion)
    if units is not None:
        assert row["units"] == units


# 800 uncached input tokens at 0.40, 200 cached at 0.10 and 500 output (100 of them reasoning) at 1.60 per million
USAGE_WORDS = "[usage=1000,500][cached=200][reasoning=100]"
USAGE_COST = (800 * 400_000_000 + 200 * 100_000_000 + 500 * 1_600_000_000) // 10**6  # 1_140_000 nano-credits


def test_responses_native_plain(gw, fakes):
    key_id, secret = gw.create_key("10")
    resp = gw.client(secret).responses.create(model="resp-native", input=f"Say hello {USAGE_WORDS}",
                                              max_output_tokens=300)
    assert resp.output_text == "Hello from Responses"
    assert resp.usage.input_tokens == 1000 and resp.usage.output_tokens_details.reasoning_tokens == 100
    sent = fakes[1].requests[-1]
    assert (sent["path"], sent["body"]["model"], sent["body"]["max_output_tokens"]) == \
        ("/v1/responses", "gpt-4.1-mini", 300)
    assert_charged(gw, key_id, USAGE_COST, route="responses", model="resp-native", prompt=1000, completion=500)


def test_responses_native_stream(gw, fakes):
    key_id, secret = gw.create_key("10")
    with gw.client(secret).responses.stream(model="resp-native", input=f"Say hello {USAGE_WORDS}") as stream:
        types = [event.type for event in stream]
        final = stream.get_final_response()
    assert types[0] == "response.created" and types[-1] == "response.completed"
    assert types.count("response.output_text.delta") == 3
    assert final.output_text == "Hello from Responses" and final.usage.output_tokens == 500
    assert isinstance(fakes[1].requests[-1]["body"]["max_output_tokens"], int)  # the cap held is the cap sent
    assert_charged(gw, key_id, USAGE_COST, route="responses", model="resp-native", prompt=1000, completion=500)


def test_responses_native_tool_call(gw):
    key_id, secret = gw.create_key("10")
    tools = [{"type": "function", "name": "weather", "parameters": {"type": "object", "properties": {}}}]
    resp = gw.client(secret).responses.create(model="resp-native", input="Weather? [tool=weather][usage=40,10]",
                                              tools=tools)
    call = resp.output[0]
    assert (call.type, call.name, call.arguments) == ("function_call", "weather", '{"city": "Paris"}')
    assert_charged(gw, key_id, (40 * 400_000_000 + 10 * 1_600_000_000) // 10**6, route="responses",
                   model="resp-native", prompt=40, completion=10)


def test_responses_translated_plain(gw, fake_openai):
    """gpt-test's upstream speaks only chat completions: the request is translated, and so is the answer."""
    key_id, secret = gw.create_key("10")
    resp = gw.client(secret).responses.create(model="gpt-test", instructions="Be brief.",
                                              input="Say hello [usage=1000,500][cached=200]", max_output_tokens=50)
    assert resp.output_text == "Hello from the fake upstream!"
    assert resp.usage.input_tokens == 1000 and resp.usage.input_tokens_details.cached_tokens == 200
    sent = fake_openai.requests[-1]
    assert sent["path"] == "/v1/chat/completions"
    assert sent["body"]["messages"][0] == {"role": "system", "content": "Be brief."}
    assert sent["body"]["max_tokens"] == 50 and "max_output_tokens" not in sent["body"]
    cost = (800 * 400_000_000 + 200 * 100_000_000 + 500 * 1_600_000_000) // 10**6
    assert_charged(gw, key_id, cost, route="responses", model="gpt-test", prompt=1000, completion=500)


def test_responses_translated_stream(gw):
    key_id, secret = gw.create_key("10")
    with gw.client(secret).responses.stream(model="gpt-test", input="Hi [usage=30,4][chunks=4]") as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert deltas == ["tok0 ", "tok1 ", "tok2 ", "tok3 "]
    assert final.status == "completed" and final.usage.output_tokens == 4
    assert_charged(gw, key_id, (30 * 400_000_000 + 4 * 1_600_000_000) // 10**6, route="responses",
                   model="gpt-test", prompt=30, completion=4)


def test_responses_untranslatable_is_400_before_any_credit_moves(gw, fake_openai):
    key_id, secret = gw.create_key("10")
    before = len(fake_openai.requests)
    with pytest.raises(openai.BadRequestError) as exc:
        gw.client(secret).responses.create(model="gpt-test", input="Search", tools=[{"type": "web_search"}])
    assert exc.value.body["param"] == "tools[0].type"
    with pytest.raises(openai.BadRequestError) as exc:
        gw.client(secret).responses.create(model="gpt-test", input="Again", previous_response_id="resp_1")
    assert exc.value.body["param"] == "previous_response_id"
    assert len(fake_openai.requests) == before
    assert books(gw, key_id) == (START, [], [], 0)


@pytest.mark.parametrize("model", ["resp-native", "gpt-test"])
def test_responses_image_urls_to_internal_addresses_are_refused(gw, fakes, fake_openai, model):
    """An upstream that fetches image URLs itself must not be sent one that points inside: refused before the
    hold, naming the part, and nothing reaches the upstream."""
    key_id, secret = gw.create_key("10")
    native = fakes[1]
    sent = len(fake_openai.requests) + len(native.requests)
    for url in ("http://169.254.169.254/latest/meta-data/x.png", "http://192.0.0.8/a.png", "http://10.0.0.1/a.png",
                "file:///etc/passwd"):
        with pytest.raises(openai.BadRequestError) as exc:
            gw.client(secret).responses.create(model=model, input=[{"role": "user", "content": [
                {"type": "input_text", "text": "What is this?"}, {"type": "input_image", "image_url": url}]}])
        assert exc.value.body["param"] == "input[0].content[1].image_url"
        assert exc.value.body["code"] == "invalid_image_url"
    assert len(fake_openai.requests) + len(native.requests) == sent
    assert books(gw, key_id) == (START, [], [], 0)


def test_responses_broken_stream_charges_what_was_delivered(gw, count_tokens):
    """The native upstream drops the connection after one delta: its text is charged, the client gets an error
    event."""
    key_id, secret = gw.create_key("10")
    prompt = "Say hello [cut]"
    with gw.client(secret).responses.stream(model="resp-native", input=prompt) as stream:
        events = [event for event in stream]
    # The Responses API's own mid-stream error event, as OpenAI sends it.
    assert [e.type for e in events][-2:] == ["response.output_text.delta", "error"]
    assert "broke off" in events[-1].message
    balance, rows, ledger, holds = books(gw, key_id)
    cost = (count_tokens(prompt) * 400_000_000 + count_tokens("Hello ") * 1_600_000_000 + 10**6 - 1) // 10**6
    assert (rows[0]["status"], rows[0]["estimated"], rows[0]["cost"]) == (502, 1, cost)
    assert (balance, ledger, holds) == (START - cost, [-cost], 0)


def test_embeddings_float_and_base64(gw, fakes):
    key_id, secret = gw.create_key("10")
    client = gw.client(secret)
    floats = client.embeddings.create(model="emb", input=["hello world", "foo bar baz"], encoding_format="float")
    assert [len(d.embedding) for d in floats.data] == [8, 8] and floats.usage.prompt_tokens == 5
    b64 = client.embeddings.create(model="emb", input="one two [usage=12345]", encoding_format="base64",
                                   dimensions=4)
    vector = struct.unpack("<4f", base64.b64decode(b64.data[0].embedding))
    assert len(vector) == 4
    assert fakes[0].requests[-1]["body"] == {"model": "text-embedding-3-small", "input": "one two [usage=12345]",
                                            "encoding_format": "base64", "dimensions": 4}
    costs = [5 * 20_000_000 // 10**6, 12345 * 20_000_000 // 10**6]  # 100 and 246_900 nano-credits
    balance, rows, ledger, holds = books(gw, key_id)
    assert [(r["prompt_tokens"], r["cost"], r["estimated"]) for r in rows] == [(5, costs[0], 0), (12345, costs[1], 0)]
    assert (balance, ledger, holds) == (START - sum(costs), [-c for c in costs], 0)


def test_speech_character_priced(gw):
    key_id, secret = gw.create_key("10")
    text = "Hello there world"
    audio = gw.client(secret).audio.speech.create(model="tts-chars", voice="alloy", input=text)
    assert audio.content == audio_bytes(text)
    assert audio.response.headers["content-type"] == "audio/mpeg"
    cost = len(text) * 15_000_000_000 // 10**6  # 255_000 nano-credits
    assert_charged(gw, key_id, cost, route="audio.speech", model="tts-chars", units=len(text))


def test_speech_streamed_token_priced(gw, fakes):
    """Token-priced: the gateway asks the upstream for SSE, relays the decoded audio and charges its usage."""
    key_id, secret = gw.create_key("10")
    text = "one two three four"
    with gw.client(secret).audio.speech.with_streaming_response.create(
            model="tts-tokens", voice="alloy", input=text, response_format="wav") as resp:
        assert resp.headers["content-type"] == "audio/wav"
        data = b"".join(resp.iter_bytes())
    assert data == audio_bytes(text)
    assert fakes[0].requests[-1]["body"]["stream_format"] == "sse"
    out = len(audio_bytes(text)) // 50
    cost = (4 * 600_000_000 + out * 12_000_000_000) // 10**6
    assert_charged(gw, key_id, cost, route="audio.speech", model="tts-tokens", prompt=4, completion=out)


def wav_file(seconds: float, rate: int = 16000) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(b"\x01\x00" * int(seconds * rate))
    return buf.getvalue()


def test_transcription_duration_priced(gw, fakes, tmp_path):
    key_id, secret = gw.create_key("10")
    path = tmp_path / "speech.wav"
    path.write_bytes(wav_file(2.5))
    with open(path, "rb") as f:
        result = gw.client(secret).audio.transcriptions.create(model="whisper-1", file=f, language="en")
    assert result.text == TRANSCRIPT
    sent = fakes[0].requests[-1]
    assert sent["fields"] == {"model": ["whisper-1"], "language": ["en"]}
    name, _, digest = sent["files"]["file"]
    assert (name, digest) == ("speech.wav", hashlib.sha256(path.read_bytes()).hexdigest())  # relayed byte for byte
    cost = 3 * 6_000_000 // 60  # usage.seconds = 3 at 0.006 per minute: 300_000 nano-credits
    assert_charged(gw, key_id, cost, route="audio.transcriptions", model="whisper-1", units=3)


@pytest.mark.filterwarnings("ignore:deprecated:DeprecationWarning")  # the SDK deprecates translations
def test_transcription_formats_and_their_charges(gw, tmp_path):
    """srt is charged by its last cue's end (2.5 s), text (no usage, no duration) by the hold's size estimate."""
    key_id, secret = gw.create_key("10")
    audio = wav_file(2.5)
    client = gw.client(secret)
    vtt = client.audio.transcriptions.create(model="whisper-1", file=("a.wav", audio), response_format="vtt")
    assert vtt.startswith("WEBVTT") and "00:00:02.500" in vtt
    srt = client.audio.translations.create(model="whisper-1", file=("a.wav", audio), response_format="srt")
    assert "00:00:02,500" in srt and TRANSCRIPT in srt
    text = client.audio.transcriptions.create(model="whisper-1", file=("a.wav", audio), response_format="text")
    assert text.strip() == TRANSCRIPT
    verbose = client.audio.transcriptions.create(model="whisper-1", file=("a.wav", audio),
                                                 response_format="verbose_json")
    assert verbose.duration == 2.5
    per_second = 6_000_000 // 60
    estimate_seconds = -(-len(audio) // 2000)  # the size estimate: 2000 bytes a second at least
    expected = [(250_000, 1, 2.5, "audio.transcriptions"), (250_000, 1, 2.5, "audio.translations"),
                (estimate_seconds * per_second, 1, estimate_seconds, "audio.transcriptions"),
                (3 * per_second, 0, 3, "audio.transcriptions")]
    balance, rows, ledger, holds = books(gw, key_id)
    assert [(r["cost"], r["estimated"], r["units"], r["route"]) for r in rows] == expected
    assert (balance, ledger, holds) == (START - sum(e[0] for e in expected), [-e[0] for e in expected], 0)


def test_transcription_token_priced(gw):
    key_id, secret = gw.create_key("10")
    result = gw.client(secret).audio.transcriptions.create(model="gpt-4o-transcribe",
                                                           file=("a.wav", wav_file(2.5)))
    assert result.text == TRANSCRIPT
    cost = (25 * 2_500_000_000 + 9 * 10_000_000_000) // 10**6  # 25 audio tokens in, 9 words out
    assert_charged(gw, key_id, cost, route="audio.transcriptions", model="gpt-4o-transcribe", prompt=25,
                   completion=9)


def test_transcription_refusals_cost_nothing(gw):
    key_id, secret = gw.create_key("10")
    client = gw.client(secret)
    with pytest.raises(openai.BadRequestError) as exc:
        client.audio.transcriptions.create(model="whisper-1", file=("a.wav", b""))
    assert exc.value.body["param"] == "file"
    with pytest.raises(openai.BadRequestError) as exc:
        client.audio.transcriptions.create(model="whisper-1", file=("a.wav", b"x"), response_format="mp3")
    assert exc.value.body["param"] == "response_format"
    with pytest.raises(openai.BadRequestError) as exc:
        client.audio.transcriptions.create(model="emb", file=("a.wav", b"x"))
    assert exc.value.body["code"] == "model_not_supported"
    assert books(gw, key_id) == (START, [], [], 0)


def test_moderations_free_and_priced(gw, count_tokens):
    key_id, secret = gw.create_key("10")
    client = gw.client(secret)
    free = client.moderations.with_raw_response.create(input=["fine", "bad [flag]"])
    assert [r.flagged for r in free.parse().results] == [False, True]
    assert free.headers["x-credits-charged"] == "0"
    priced = client.moderations.create(model="mod-priced", input="hello world")
    assert priced.results[0].flagged is False
    cost = count_tokens("hello world") * 1_000_000_000 // 10**6
    balance, rows, ledger, holds = books(gw, key_id)
    assert [(r["model"], r["cost"], r["route"]) for r in rows] == [("omni-moderation-latest", 0, "moderations"),
                                                                   ("mod-priced", cost, "moderations")]
    assert (balance, ledger, holds) == (START - cost, [0, -cost], 0)


def test_models_list_modes(gw):
    _, secret = gw.create_key("10")
    modes = {m.id: m.mode for m in gw.client(secret).models.list()}
    assert (modes["emb"], modes["tts-chars"], modes["whisper-1"], modes["omni-moderation-latest"],
            modes["resp-native"]) == ("embedding", "speech", "transcription", "moderation", "chat")


def test_cors_preflight_and_headers(gw):
    _, secret = gw.create_key("10")
    pre = requests.options(f"{gw.base_url}/chat/completions", timeout=5, headers={
        "Origin": ORIGIN, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type"})
    assert pre.status_code == 204
    assert pre.headers["Access-Control-Allow-Origin"] == ORIGIN
    assert "POST" in pre.headers["Access-Control-Allow-Methods"]
    assert pre.headers["Access-Control-Allow-Headers"] == "authorization,content-type"
    assert pre.headers["Access-Control-Max-Age"] == "600"
    real = requests.post(f"{gw.base_url}/embeddings", timeout=5, json={"model": "emb", "input": "hi"},
                         headers={"Origin": ORIGIN, "Authorization": f"Bearer {secret}"})
    assert real.status_code == 200 and real.headers["Access-Control-Allow-Origin"] == ORIGIN
    assert "Origin" in real.headers["Vary"]
    exposed = real.headers["Access-Control-Expose-Headers"]
    for name in ("x-credits-remaining", "x-ratelimit-remaining-requests", "x-request-id", "retry-after"):
        assert name in exposed
    other = requests.options(f"{gw.base_url}/chat/completions", timeout=5, headers={
        "Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
    assert other.status_code == 401 and "Access-Control-Allow-Origin" not in other.headers


def test_transcription_large_upload_is_relayed_whole_and_the_cap_holds(gw, fakes):
    """A 3 MB file (spooled to disk by Werkzeug) arrives byte for byte; a file past 25 MiB is 413 and costs nothing."""
    key_id, secret = gw.create_key("10")
    audio = wav_file(100.0)  # 3.2 MB
    result = gw.client(secret).audio.transcriptions.create(model="whisper-1", file=("long.wav", audio))
    assert result.text == TRANSCRIPT
    assert fakes[0].requests[-1]["files"]["file"][2] == hashlib.sha256(audio).hexdigest()
    assert_charged(gw, key_id, 100 * 100_000, route="audio.transcriptions", model="whisper-1", units=100)
    other_id, other = gw.create_key("10")
    too_big = requests.post(f"{gw.base_url}/audio/transcriptions", timeout=30,
                            headers={"Authorization": f"Bearer {other}"}, data={"model": "whisper-1"},
                            files={"file": ("big.wav", b"\0" * (25 * 1024 * 1024 + 1))})
    assert too_big.status_code == 413 and too_big.json()["error"]["code"] == "request_too_large"
    assert books(gw, other_id) == (START, [], [], 0)
