"""A fake Lyria RealTime server (docs/protocols.md, "Lyria RealTime"): a real websocket server on 127.0.0.1
in a background thread.

Behaviour is chosen by magic words in the prompt text:
  [filter]     answer the prompts with filteredPrompt and play nothing
  [warn]       send a warning frame first, then play normally
  [close1011]  close with 1011 "internal error" after the first chunk (at least 1 s) of audio
  [stall]      accept PLAY but never send audio
  [echo-close] close with 1011 and a reason repeating the key (as x-goog-api-key: and key=) after the first
               chunk (at least 1 s)
  [echo-warn]  send a warning frame repeating the key, then play normally
  [nosetup]    never answer setup; since prompts only follow setupComplete, this word is read from the setup
               model name (e.g. "lyria-realtime-exp[nosetup]") or given to the constructor as `behaviour`.
  [pace=S]     sleep S s between chunks in this session instead of the constructor's chunk_delay (a test that
               compares one clip's time with ten concurrent ones needs waiting, not CPU, to dominate)
"""
from __future__ import annotations

import base64
import json
import math
import re
import sys
import threading
from array import array
from http import HTTPStatus
from typing import Any, Self
from urllib.parse import parse_qs, urlsplit

from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response
from websockets.sync.server import Server, ServerConnection, serve

RATE, CHANNELS, WIDTH = 48000, 2, 2
MAGIC = ("[filter]", "[warn]", "[close1011]", "[stall]", "[nosetup]", "[echo-close]", "[echo-warn]")
MIME = "audio/l16;rate=48000;channels=2"


def sine_pcm(seconds: float, freq: int = 480) -> bytes:
    """16-bit little-endian stereo sine; 480 Hz repeats every 100 frames, so 0.01 s multiples join seamlessly."""
    frames = round(seconds * RATE)
    samples = array("h")
    for i in range(frames):
        v = int(8000 * math.sin(2 * math.pi * freq * i / RATE))
        samples.extend((v, v))
    if sys.byteorder == "big":
        samples.byteswap()  # big-endian host: the wire format is little-endian
    return samples.tobytes()


def _get(obj: dict, camel: str, snake: str) -> Any:
    """A client field in either casing: google-genai sends camelCase, the cookbook's raw client snake_case."""
    return obj[camel] if camel in obj else obj.get(snake)


def _new_session(request: Request, status: int) -> dict:
    """A session record: what the client sent and how the fake answered."""
    return {"path": request.path, "headers": {k.lower(): v for k, v in request.headers.raw_items()},
            "status": status, "messages": [], "sent_seconds": 0.0, "closed": None}


class FakeLyria:
    """Run with `with FakeLyria(key="k") as fake:`; point an upstream's base_url at `fake.url`."""

    def __init__(self, key: str = "test-key", *, chunk_seconds: float = 2.0, chunk_delay: float = 0.005,
                 max_seconds: float = 60.0, behaviour: str | None = None) -> None:
        self.key = key
        self.chunk = sine_pcm(chunk_seconds)
        self._chunk_b64 = base64.b64encode(self.chunk).decode()  # encoded once: many sessions share the CPU
        self.chunk_seconds = chunk_seconds
        # Sleep between chunks: far faster than real time by default (a 30 s clip is 15 chunks in about 0.1 s of
        # sleeping), yet chunks still arrive as separate frames over time rather than in one burst.
        self.chunk_delay = chunk_delay
        self.max_seconds = max_seconds      # stop streaming here even without STOP
        self.behaviour = behaviour          # one of MAGIC, applied to every session
        self.sessions: list[dict] = []      # {"path", "headers", "status", "messages", "sent_seconds", "closed"}
        self.url = ""
        self._server: Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> Self:
        """Listen on a free port and serve in a daemon thread."""
        self._server = serve(self._session, "127.0.0.1", 0, process_request=self._check_key,
                             max_size=None, compression=None)
        port = self._server.socket.getsockname()[1]
        self.url = f"ws://127.0.0.1:{port}/ws/google.ai.generativelanguage.v1alpha.GenerativeService.BidiGenerateMusic"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Close the listener and every open session, then wait for the thread."""
        if self._server is not None:
            self._server.shutdown()
            self._thread.join(5)
            self._server = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _check_key(self, conn: ServerConnection, request: Request) -> Response | None:
        """Reject the upgrade with 403 unless x-goog-api-key (or ?key=, as the cookbook sends) is right."""
        key = request.headers.get("x-goog-api-key") or parse_qs(urlsplit(request.path).query).get("key", [None])[0]
        if key == self.key:
            return None
        self.sessions.append(_new_session(request, 403))
        return conn.respond(HTTPStatus.FORBIDDEN, "API key not valid. Please pass a valid API key.\n")

    def _recv(self, ws: ServerConnection, session: dict, timeout: float | None) -> dict | None:
        """The next client frame, recorded; None on timeout."""
        try:
            raw = ws.recv(timeout=timeout)
        except TimeoutError:
            return None
        try:
            msg = json.loads(raw)
        except ValueError:
            msg = {"_invalid": raw}
        session["messages"].append(msg)
        return msg

    def _session(self, ws: ServerConnection) -> None:
        session = _new_session(ws.request, 101)
        self.sessions.append(session)
        try:
            self._play(ws, session)
        except ConnectionClosed:
            pass

    def _close(self, ws: ServerConnection, session: dict, code: int, reason: str) -> None:
        session["closed"] = (code, reason)
        ws.close(code, reason)

    def _play(self, ws: ServerConnection, session: dict) -> None:
        """The protocol: setup, setupComplete, then prompts/config/playback until the client leaves."""
        first = self._recv(ws, session, None)
        if not isinstance(first, dict) or set(first) != {"setup"}:
            return self._close(ws, session, 1007, "The first message must be setup.")
        model = str((first["setup"] or {}).get("model", ""))
        if not model.startswith("models/"):
            return self._close(ws, session, 1008, f"Model name {model!r} must start with models/.")
        mode = self.behaviour or next((m for m in MAGIC if m in model), None)
        if mode == "[nosetup]":
            while True:  # swallow everything until the client gives up
                self._recv(ws, session, None)
        ws.send(json.dumps({"setupComplete": {}}))
        prompts: list[dict] = []
        playing = filtered = False
        delay = self.chunk_delay
        while True:
            msg = self._recv(ws, session, delay if playing else None)
            if msg is not None:
                if not isinstance(msg, dict) or len(msg) != 1:
                    return self._close(ws, session, 1007, "Each message must be a JSON object with one key.")
                content = _get(msg, "clientContent", "client_content")
                control = _get(msg, "playbackControl", "playback_control")
                if content is not None:
                    prompts = _get(content, "weightedPrompts", "weighted_prompts") or []
                    if any(not p.get("text") or not p.get("weight", 1) for p in prompts):
                        return self._close(ws, session, 1007, "Each prompt needs text and a non-zero weight.")
                    text = " ".join(p["text"] for p in prompts)
                    mode = self.behaviour or mode or next((m for m in MAGIC if m in text), None)
                    pace = re.search(r"\[pace=([\d.]+)\]", text)
                    delay = float(pace.group(1)) if pace else delay
                    if mode == "[filter]":
                        filtered = True
                        ws.send(json.dumps({"filteredPrompt": {
                            "text": prompts[0]["text"], "filteredReason": "The prompt was filtered for safety."}}))
                    elif mode == "[warn]":
                        ws.send(json.dumps({"warning": "Prompt is very short; results may vary."}))
                    elif mode == "[echo-warn]":
                        warning = f"Deprecated auth x-goog-api-key: {self.key} (send it as a header)"
                        ws.send(json.dumps({"warning": warning}))
                elif control == "PLAY":
                    if not prompts:
                        return self._close(ws, session, 1007, "Send weighted prompts before PLAY.")
                    playing = not filtered and mode != "[stall]"
                elif control in ("STOP", "PAUSE"):
                    playing = False
                elif control == "RESET_CONTEXT" or set(msg) & {"musicGenerationConfig", "music_generation_config"}:
                    pass
                else:
                    return self._close(ws, session, 1007, f"Unknown message {next(iter(msg))!r}.")
            if playing:
                chunk = {"data": self._chunk_b64, "mimeType": MIME}
                ws.send(json.dumps({"serverContent": {"audioChunks": [chunk]}}))
                session["sent_seconds"] += self.chunk_seconds
                if mode == "[close1011]" and session["sent_seconds"] >= 1.0:
                    return self._close(ws, session, 1011, "internal error")
                if mode == "[echo-close]" and session["sent_seconds"] >= 1.0:
                    return self._close(ws, session, 1011, f"quota for x-goog-api-key: {self.key} key={self.key}")
                if session["sent_seconds"] >= self.max_seconds:
                    playing = False
