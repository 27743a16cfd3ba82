"""The Vercel AI SDK (`ai` with `@ai-sdk/openai`, whose openai('...') speaks the Responses API) against the real
gateway: generateText, streamText and a tool call, for a native Responses upstream and a chat-only one, each
charged exactly. The packages are installed once into ~/.cache/gateway-ai-sdk; the test is skipped only when
Node is missing or npm cannot reach its registry."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.e2e.test_openai_api_e2e import START, books, fakes, gw  # noqa: F401 -- the same deployment

PACKAGES = ("ai@5.0.277", "@ai-sdk/openai@2.0.130")  # the last majors that run on Node 20
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "gateway-ai-sdk"
SCRIPT = Path(__file__).with_name("ai_sdk") / "client.mjs"
UNREACHABLE = ("ENOTFOUND", "EAI_AGAIN", "ETIMEDOUT", "ECONNREFUSED", "ECONNRESET", "network", "proxy")


pytestmark = pytest.mark.xdist_group("openai-api-deployment")  # see tests/e2e/test_openai_api_e2e.py


@pytest.fixture(scope="session")
def ai_sdk() -> Path:
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("Node and npm are not installed")
    CACHE.mkdir(parents=True, exist_ok=True)
    stamp = CACHE / "installed.txt"
    if not stamp.exists() or stamp.read_text() != " ".join(PACKAGES):
        (CACHE / "package.json").write_text('{"name": "gateway-ai-sdk-test", "private": true, "type": "module"}')
        done = subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--loglevel=error", *PACKAGES],
                              cwd=CACHE, capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            if any(word in done.stderr for word in UNREACHABLE):
                pytest.skip("npm cannot reach its registry: " + done.stderr.strip().splitlines()[-1])
            raise AssertionError(f"npm install failed:\n{done.stderr}")
        stamp.write_text(" ".join(PACKAGES))
    shutil.copy(SCRIPT, CACHE / "client.mjs")  # bare imports resolve from the script's folder
    return CACHE / "client.mjs"


def run(script: Path, gw, secret: str, model: str, tools: bool) -> dict:  # noqa: F811
    env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp"), "BASE_URL": gw.base_url,
           "API_KEY": secret, "MODEL": model, **({"TOOLS": "1"} if tools else {})}
    done = subprocess.run(["node", str(script)], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def cost(prompt: int, completion: int) -> int:
    """resp-native and gpt-test both cost 0.40 in and 1.60 out per million tokens."""
    return -(-(prompt * 400_000_000 + completion * 1_600_000_000) // 10**6)


@pytest.mark.parametrize("model, text, tools", [
    ("resp-native", "Hello from Responses", True),  # relayed to an upstream that speaks Responses
    ("gpt-test", "Hello from the fake upstream!", False),  # translated for a chat-only upstream
])
def test_ai_sdk_generate_stream_and_tools(ai_sdk, gw, model, text, tools):  # noqa: F811
    key_id, secret = gw.create_key("10")
    out = run(ai_sdk, gw, secret, model, tools)
    assert out["generate"] == {"text": text, "input": 20, "output": 5}
    assert out["stream"]["input"] == 30 and out["stream"]["output"] == 6 and out["stream"]["text"]
    assert "streamError" not in out
    costs = [cost(20, 5), cost(30, 6)]
    if tools:
        assert out["tool"] == [{"name": "weather", "input": {"city": "Paris"}}]
        costs.append(cost(40, 10))
    balance, rows, ledger, holds = books(gw, key_id)
    assert [(r["route"], r["cost"], r["status"]) for r in rows] == [("responses", c, 200) for c in costs]
    assert (balance, ledger, holds) == (START - sum(costs), [-c for c in costs], 0)
