"""A fake OpenAI upstream for the non-chat endpoints, in their exact wire formats, on 127.0.0.1:

  POST /v1/embeddings        JSON; float arrays or base64 of little-endian float32, `dimensions` long (default 8);
                             usage.prompt_tokens = words of the text inputs + length of the token arrays
  POST /v1/audio/speech      raw audio bytes (100 per input character, starting "FAKEAUDIO") with the format's
                             content type, chunked; with stream_format "sse": speech.audio.delta events of base64
                             audio and a speech.audio.done event with usage (input_tokens = words of the input,
                             output_tokens = audio bytes / 50)
  POST /v1/audio/transcriptions and /translations   multipart; the duration is read from the WAV header (else
                             bytes / 16000); json, text, srt, vtt, verbose_json answered as OpenAI does: whisper-*
                             models report usage {"type": "duration", "seconds": ceil(duration)}, the others
                             {"type": "tokens", ...} with input_tokens = 10 per second and output_tokens = words
  POST /v1/moderations       one result per input, flagged when the text contains "[flag]"
Magic words in the text input: [usage=N] reports N prompt tokens (embeddings); [nousage] reports none;
[error400] / [error500] answer that error.
"""
from __future__ import annotations

import base64
import hashlib
import io
import json
import math
import re
import struct
import wave
from typing import Any

from tests.fake_http import FakeHandler, FakeUpstream

TRANSCRIPT = "The quick brown fox jumps over the lazy dog."
AUDIO_TYPES = {"mp3": "audio/mpeg", "opus": "audio/opus", "aac": "audio/aac", "flac": "audio/flac",
               "wav": "audio/wav", "pcm": "audio/pcm"}
CATEGORIES = ("harassment", "harassment/threatening", "hate", "hate/threatening", "illicit", "illicit/violent",
              "self-harm", "self-harm/instructions", "self-harm/intent", "sexual", "sexual/minors", "violence",
              "violence/graphic")


def audio_bytes(text: str) -> bytes:
    """The fake's audio for an input: deterministic, so a test can compare what it received."""
    size = 100 * len(text)
    seed = (b"FAKEAUDIO" + text.encode()) * (size // (9 + len(text.encode())) + 1)
    return seed[:size]


def parse_multipart(content_type: str, raw: bytes) -> tuple[dict[str, list[str]], dict[str, tuple[str, str, bytes]]]:
    """Fields and files of a multipart/form-data body, parsed strictly: each part's headers, a blank line, data."""
    m = re.search(r'boundary="?([^";]+)"?', content_type)
    if not m:
        raise ValueError("no boundary")
    delim = b"--" + m.group(1).encode()
    if not raw.startswith(delim) or not raw.endswith(b"\r\n" + delim + b"--\r\n"):
        raise ValueError("the body does not start and end with the boundary")
    fields: dict[str, list[str]] = {}
    files: dict[str, tuple[str, str, bytes]] = {}
    for part in raw[len(delim):-len(delim) - 6].split(b"\r\n" + delim):
        if not part.startswith(b"\r\n"):
            raise ValueError("a part does not start with CRLF")
        head, _, data = part[2:].partition(b"\r\n\r\n")
        headers = dict(line.split(": ", 1) for line in head.decode().split("\r\n"))
        disp = headers["Content-Disposition"]
        name = re.search(r'name="([^"]*)"', disp).group(1)
        filename = re.search(r'filename="([^"]*)"', disp)
        if filename:
            files[name] = (filename.group(1), headers.get("Content-Type", ""), data)
        else:
            fields.setdefault(name, []).append(data.decode())
    return fields, files


def duration_of(data: bytes) -> float:
    try:
        with wave.open(io.BytesIO(data)) as w:
            return w.getnframes() / w.getframerate()
    except (wave.Error, EOFError):
        return len(data) / 16000


def _stamp(seconds: float, sep: str) -> str:
    ms = round(seconds * 1000)
    return f"{ms // 3600000:02d}:{ms // 60000 % 60:02d}:{ms // 1000 % 60:02d}{sep}{ms % 1000:03d}"


class _Handler(FakeHandler):
    def _error(self, status: int, message: str, param: str | None = None) -> None:
        type_ = "invalid_request_error" if status < 500 else "server_error"
        self._json(status, {"error": {"message": message, "type": type_, "param": param, "code": None}})

    def do_POST(self) -> None:
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        record: dict[str, Any] = {"path": self.path, "headers": {k.lower(): v for k, v in self.headers.items()},
                                  "size": len(raw)}
        self.server.requests.append(record)
        if self.headers.get("Authorization") != f"Bearer {self.server.key}":
            return self._error(401, "Incorrect API key provided.")
        path = self.path.rstrip("/")
        if path in ("/v1/audio/transcriptions", "/v1/audio/translations"):
            try:
                fields, files = parse_multipart(self.headers.get("Content-Type", ""), raw)
            except (ValueError, KeyError, AttributeError) as exc:
                return self._error(400, f"Malformed multipart body: {exc}")
            record["fields"] = fields
            record["files"] = {k: (v[0], v[1], hashlib.sha256(v[2]).hexdigest()) for k, v in files.items()}
            return self._transcribe(fields, files, path.endswith("translations"))
        try:
            body = json.loads(raw)
        except ValueError:
            return self._error(400, "We could not parse the JSON body of your request.")
        record["body"] = body
        text = json.dumps(body.get("input"))
        for status in (400, 500):
            if f"[error{status}]" in text:
                return self._error(status, f"Fake media error {status}.")
        if path == "/v1/embeddings":
            return self._embeddings(body, text)
        if path == "/v1/audio/speech":
            return self._speech(body)
        if path == "/v1/moderations":
            return self._moderations(body)
        self._error(404, f"Unknown request URL: POST {self.path}.")

    def _embeddings(self, body: dict, text: str) -> None:
        value = body["input"]
        items = [value] if isinstance(value, str) or (value and isinstance(value[0], int)) else value
        dims = body.get("dimensions") or 8
        data, tokens = [], 0
        for i, item in enumerate(items):
            tokens += len(item.split()) if isinstance(item, str) else len(item)
            vector = [round(math.sin(i + j + 1), 6) for j in range(dims)]
            embedding: Any = vector
            if body.get("encoding_format") == "base64":
                embedding = base64.b64encode(struct.pack(f"<{dims}f", *vector)).decode()
            data.append({"object": "embedding", "index": i, "embedding": embedding})
        m = re.search(r"\[usage=(\d+)\]", text)
        tokens = int(m.group(1)) if m else tokens
        doc: dict[str, Any] = {"object": "list", "data": data, "model": body["model"]}
        if "[nousage]" not in text:
            doc["usage"] = {"prompt_tokens": tokens, "total_tokens": tokens}
        self._json(200, doc)

    def _chunked(self, content_type: str, pieces: list[bytes]) -> None:
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for piece in [*pieces, b""]:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            self.wfile.flush()

    def _speech(self, body: dict) -> None:
        audio = audio_bytes(body["input"])
        pieces = [audio[i:i + 1000] for i in range(0, len(audio), 1000)]
        if body.get("stream_format") == "sse":
            events = [{"type": "speech.audio.delta", "audio": base64.b64encode(p).decode()} for p in pieces]
            words = len(body["input"].split())
            events.append({"type": "speech.audio.done", "usage": {
                "input_tokens": words, "output_tokens": len(audio) // 50, "total_tokens": words + len(audio) // 50}})
            return self._chunked("text/event-stream", [b"data: " + json.dumps(e).encode() + b"\n\n" for e in events])
        self._chunked(AUDIO_TYPES[body.get("response_format") or "mp3"], pieces)

    def _transcribe(self, fields: dict[str, list[str]], files: dict, translate: bool) -> None:
        if "file" not in files or "model" not in fields:
            return self._error(400, "Missing required parameter: 'file' or 'model'.")
        model = fields["model"][0]
        fmt = (fields.get("response_format") or ["json"])[0]
        seconds = duration_of(files["file"][2])
        if model.startswith("whisper"):
            usage: dict = {"type": "duration", "seconds": math.ceil(seconds)}
        else:
            words = len(TRANSCRIPT.split())
            audio_tokens = math.ceil(seconds * 10)
            usage = {"type": "tokens", "input_tokens": audio_tokens, "output_tokens": words,
                     "total_tokens": audio_tokens + words,
                     "input_token_details": {"text_tokens": 0, "audio_tokens": audio_tokens}}
        if fmt == "json":
            return self._json(200, {"text": TRANSCRIPT, "usage": usage})
        if fmt == "verbose_json":
            return self._json(200, {"task": "translate" if translate else "transcribe", "language": "english",
                                    "duration": seconds, "text": TRANSCRIPT, "usage": usage,
                                    "segments": [{"id": 0, "seek": 0, "start": 0.0, "end": seconds,
                                                  "text": TRANSCRIPT, "tokens": [1, 2], "temperature": 0.0,
                                                  "avg_logprob": -0.2, "compression_ratio": 1.0,
                                                  "no_speech_prob": 0.01}]})
        if fmt == "text":
            return self._send(200, (TRANSCRIPT + "\n").encode(), "text/plain; charset=utf-8")
        if fmt == "srt":
            text = f"1\n{_stamp(0, ',')} --> {_stamp(seconds, ',')}\n{TRANSCRIPT}\n\n"
            return self._send(200, text.encode(), "application/x-subrip; charset=utf-8")
        if fmt == "vtt":
            text = f"WEBVTT\n\n{_stamp(0, '.')} --> {_stamp(seconds, '.')}\n{TRANSCRIPT}\n\n"
            return self._send(200, text.encode(), "text/vtt; charset=utf-8")
        self._error(400, f"Unsupported response_format {fmt}.", "response_format")

    def _moderations(self, body: dict) -> None:
        value = body["input"]
        items = value if isinstance(value, list) else [value]
        results = []
        for item in items:
            flagged = "[flag]" in (item if isinstance(item, str) else json.dumps(item))
            results.append({"flagged": flagged, "categories": {c: flagged and c == "violence" for c in CATEGORIES},
                            "category_scores": {c: 0.9 if flagged and c == "violence" else 0.001 for c in CATEGORIES},
                            "category_applied_input_types": {c: ["text"] for c in CATEGORIES}})
        self._json(200, {"id": "modr-fake", "model": body["model"], "results": results})


class FakeMedia(FakeUpstream):
    handler = _Handler
