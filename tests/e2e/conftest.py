"""End-to-end fixtures: the gateway as a real gunicorn + gevent server (tests.gateway.Gateway)."""
from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

import db
from tests.conftest import Raw
from tests.e2e.fake_media import FakeMedia
from tests.fake_responses import FakeResponses
from tests.gateway import LIVE, LOG_TAIL, Gateway, reap_stopped

API_ORIGIN = "https://app.example.com"  # the origin openai_api_gateway allows (CORS)
FENCE_SITE = str(Path(__file__).resolve().parents[1] / "netguard_site")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    item.stash[_OFFSETS] = {id(gw): gw.log_size() for gw in LIVE}


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """A failing test's report carries what each gateway logged during it: its own error, not only the client's."""
    outcome = yield
    report = outcome.get_result()
    if report.when != "call" or not report.failed:
        return
    offsets = item.stash.get(_OFFSETS, {})
    for gw in LIVE:
        text = gw.log_since(offsets.get(id(gw), 0))
        if text.strip():
            at = text.find("Traceback")
            shown = text[max(at - 500, 0):][:LOG_TAIL] if at >= 0 else text[-LOG_TAIL:]
            report.sections.append((f"gateway log {gw.url} (during this test)", shown))


_OFFSETS = pytest.StashKey[dict]()



@pytest.fixture(scope="session", autouse=True)
def _reap_gateways() -> Iterator[None]:
    """Gateways stopped without waiting (fixture teardowns) are collected once, when the session ends."""
    yield
    reap_stopped()


@pytest.fixture(scope="session")
def fence_log(tmp_path_factory) -> Path:
    """Where the fenced gateways note any connect to an address off this machine (none may; tests that fetch
    URLs, such as tests/e2e/test_vision_e2e.py, assert the file stays empty)."""
    return tmp_path_factory.mktemp("fence") / "off-box.log"


def fence_env(log: Path) -> dict[str, str]:
    """Test harness for the gateway subprocess: tests/netguard_site makes every off-box connect fail and log."""
    path = os.pathsep.join(p for p in (FENCE_SITE, os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": path, "NETGUARD_LOG": str(log)}


# Models priced and sized like gpt-4.1 and gpt-4.1-mini (32,768 output tokens), on the shared gateway for
# tests/e2e/test_holds.py: other tests use their own models, so these change nothing for them and cost no start-up.
BIG_MODELS = {
    "big": {"upstream": "fake", "input_price": 2, "output_price": 8, "max_output_tokens": 32768},
    "big-mini": {"upstream": "fake", "input_price": 0.4, "output_price": 1.6, "max_output_tokens": 32768},
}


@pytest.fixture(scope="session")
def gateway(gateway_config, fence_log):
    """The shared gateway: behind the test fence, admin API and /metrics off (no admin token), the big models."""
    tmp, cfg = gateway_config()
    cfg["models"].update(BIG_MODELS)
    gw = Gateway(tmp, cfg, env={**fence_env(fence_log), "GATEWAY_ADMIN_TOKEN": ""}).start()
    yield gw
    gw.stop(wait=False)


@pytest.fixture
def make_gateway(gateway_config, fence_log):
    """Start extra gateways with changed config: make_gateway(lambda cfg: ..., workers=1, env=None). Each is
    behind the test fence, as the shared one is. start=False gives it unstarted (its config written, no database
    yet), for a test that prepares the database before the first start."""
    started: list[Gateway] = []

    def make(change=None, workers: int = 1, env: dict[str, str] | None = None, start: bool = True) -> Gateway:
        tmp, cfg = gateway_config()
        if change:
            change(cfg)
        gw = Gateway(tmp, cfg, workers, {**fence_env(fence_log), **(env or {})})
        started.append(gw)
        return gw.start() if start else gw
    yield make
    for gw in started:
        gw.stop(wait=False)


@pytest.fixture(scope="session")
def openai_api_fakes():
    with FakeMedia("sk-upstream-test") as media, FakeResponses("sk-upstream-test") as native:
        yield media, native


@pytest.fixture(scope="session")
def openai_api_gateway(gateway_config, openai_api_fakes, fence_log):
    """The deployment of tests/e2e/test_openai_api_e2e.py and test_ai_sdk_e2e.py: /v1/responses relayed to a native
    upstream, the media routes on their fake, CORS for API_ORIGIN."""
    media, native = openai_api_fakes
    tmp, cfg = gateway_config()
    cfg["server"]["cors_origins"] = Raw(f'["{API_ORIGIN}"]')
    up = {"api_key_env": "TEST_UPSTREAM_KEY", "timeout_seconds": 2, "kind": "openai"}
    cfg["upstreams"]["native"] = {**up, "base_url": native.base_url, "responses_api": True,
                                  "max_tokens_field": "max_completion_tokens"}
    cfg["upstreams"]["media"] = {**up, "base_url": media.base_url}
    cfg["models"].update({
        "resp-native": {"upstream": "native", "upstream_model": "gpt-4.1-mini", "input_price": Raw("0.40"),
                        "output_price": Raw("1.60"), "cached_input_price": Raw("0.10"), "max_output_tokens": 1000},
        "emb": {"upstream": "media", "mode": "embedding", "upstream_model": "text-embedding-3-small",
                "input_price": Raw("0.02")},
        "tts-chars": {"upstream": "media", "mode": "speech", "upstream_model": "tts-1",
                      "per_million_characters": Raw("15.00")},
        "tts-tokens": {"upstream": "media", "mode": "speech", "upstream_model": "gpt-4o-mini-tts",
                       "input_price": Raw("0.60"), "output_price": Raw("12.00"), "max_output_tokens": 8192},
        "whisper-1": {"upstream": "media", "mode": "transcription", "per_minute": Raw("0.006")},
        "gpt-4o-transcribe": {"upstream": "media", "mode": "transcription", "input_price": Raw("2.50"),
                              "output_price": Raw("10.00")},
        "omni-moderation-latest": {"upstream": "media", "mode": "moderation"},
        "mod-priced": {"upstream": "media", "mode": "moderation", "input_price": Raw("1.00")},
    })
    gateway = Gateway(tmp, cfg, env=fence_env(fence_log)).start()
    yield gateway
    gateway.stop(wait=False)


@pytest.fixture
def key(gateway):
    """A fresh funded key on the shared gateway: (id, secret)."""
    return gateway.create_key("10")


@pytest.fixture
def make_deployment(gateway_config):
    """A test deployment for operator commands only (gw.flask, gw.db): its config and a ready database, and no
    server process, which `flask --app app ...` never needs. Starting gunicorn for these cost a start-up each."""
    def make(change=None) -> Gateway:
        tmp, cfg = gateway_config()
        if change:
            change(cfg)
        db.init(cfg["server"]["database"])  # what gunicorn's on_starting does before a server exists
        return Gateway(tmp, cfg)
    return make
