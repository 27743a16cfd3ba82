"""Shared fixtures: fake upstreams on 127.0.0.1 and the gateway as a real gunicorn + gevent server."""
from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import billing  # noqa: E402
import keys  # noqa: E402
from tests.fake_gemini import FakeGemini  # noqa: E402
from tests.fake_lyria import FakeLyria  # noqa: E402
from tests.fake_openai import FakeOpenAI  # noqa: E402

UPSTREAM_KEY = "sk-upstream-test"
GEMINI_KEY = "gemini-test-key"
GUNICORN = str(Path(sys.executable).with_name("gunicorn"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, Raw):
        return str(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


class Raw(str):
    """A TOML value written as it is (exact decimal prices)."""


def to_toml(cfg: dict) -> str:
    """config.toml text from {section: {key: value}} and {"upstreams"/"models": {name: {key: value}}}."""
    out = []
    for section, table in cfg.items():
        if section in ("upstreams", "models"):
            for name, sub in table.items():
                out.append(f'[{section}."{name}"]')
                out += [f"{k} = {_toml_value(v)}" for k, v in sub.items()]
        else:
            out.append(f"[{section}]")
            out += [f"{k} = {_toml_value(v)}" for k, v in table.items()]
    return "\n".join(out) + "\n"


def base_config(tmp: Path, openai_url: str, gemini_url: str, lyria_url: str) -> dict:
    """The test deployment: every model kind, each pointed at its fake."""
    return {
        "server": {"database": str(tmp / "gateway.db"), "heartbeat_seconds": 1},
        "limits": {"default_rpm": 0, "default_rpd": 0},
        "upstreams": {
            "fake": {"kind": "openai", "base_url": openai_url, "api_key_env": "TEST_UPSTREAM_KEY",
                     "timeout_seconds": 2},
            "fake-gemini-openai": {"kind": "openai", "base_url": openai_url, "api_key_env": "TEST_UPSTREAM_KEY",
                                   "timeout_seconds": 2, "fetches_image_urls": False},
            "nokey": {"kind": "openai", "base_url": openai_url, "api_key_env": "TEST_MISSING_KEY"},
            "dead": {"kind": "openai", "base_url": f"http://127.0.0.1:{free_port()}/v1",
                     "api_key_env": "TEST_UPSTREAM_KEY", "timeout_seconds": 2},
            "gemini": {"kind": "gemini", "base_url": gemini_url, "api_key_env": "TEST_GEMINI_KEY",
                       "timeout_seconds": 2},
            "lyria": {"kind": "lyria", "base_url": lyria_url, "api_key_env": "TEST_GEMINI_KEY",
                      "timeout_seconds": 3, "connect_timeout_seconds": 2},
        },
        "models": {
            "gpt-test": {"upstream": "fake", "upstream_model": "gpt-4.1-mini", "input_price": Raw("0.40"),
                         "output_price": Raw("1.60"), "cached_input_price": Raw("0.10"), "vision": True,
                         "max_output_tokens": 1000},
            "gpt-text": {"upstream": "fake", "input_price": Raw("0.50"), "output_price": Raw("1.50"),
                         "max_output_tokens": 1000},
            "gemini-test": {"upstream": "fake-gemini-openai", "input_price": Raw("0.30"),
                            "output_price": Raw("2.50"), "vision": True, "max_output_tokens": 1000},
            "gpt-nokey": {"upstream": "nokey", "input_price": Raw("1"), "output_price": Raw("1")},
            "gpt-dead": {"upstream": "dead", "input_price": Raw("1"), "output_price": Raw("1")},
            "gemini-2.5-flash-image": {"upstream": "gemini", "mode": "image", "per_image": Raw("0.039")},
            "imagen-4.0-generate-001": {"upstream": "gemini", "mode": "image", "per_image": Raw("0.04")},
            "gpt-image-1": {"upstream": "fake", "mode": "image", "per_image": Raw("0.042")},
            "lyria-realtime-exp": {"upstream": "lyria", "mode": "music", "per_second": Raw("0.001")},
            "lyria-nosetup": {"upstream": "lyria", "upstream_model": "lyria-realtime-exp[nosetup]",
                              "mode": "music", "per_second": Raw("0.001")},
        },
        "vision": {"bridge_model": "gpt-test", "allow_loopback_image_hosts": True},
    }


LIVE: list[Gateway] = []  # gateways started and not yet stopped, whose logs a failing test report shows
LOG_TAIL = 6000


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


class Gateway:
    """The gateway run as users run it: gunicorn with the gevent worker, on a free port of 127.0.0.1."""

    def __init__(self, tmp: Path, cfg: dict, workers: int = 1, env: dict[str, str] | None = None) -> None:
        self.tmp = tmp
        self.cfg = cfg
        self.db_path = cfg["server"]["database"]
        self.config_path = tmp / "config.toml"
        self.config_path.write_text(to_toml(cfg))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.base_url = f"{self.url}/v1"
        self.log_path = tmp / f"gateway-{self.port}.log"
        self.env = {**os.environ, "GATEWAY_CONFIG": str(self.config_path), "PORT": str(self.port),
                    "WORKERS": str(workers), "TEST_UPSTREAM_KEY": UPSTREAM_KEY, "TEST_GEMINI_KEY": GEMINI_KEY,
                    **(env or {})}
        self.env.pop("TEST_MISSING_KEY", None)
        self.proc: subprocess.Popen | None = None

    def start(self) -> Gateway:
        LIVE.append(self)
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([GUNICORN, "-c", "gunicorn.conf.py", "app:create_app()"], cwd=ROOT, env=self.env,
                                     stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited: {self.log()}")
            try:
                if requests.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return self
            except requests.RequestException:
                time.sleep(0.1)
        raise RuntimeError(f"gateway did not start: {self.log()}")

    def stop(self, sig: int = signal.SIGINT) -> None:
        if self in LIVE:
            LIVE.remove(self)
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    def log_size(self) -> int:
        return self.log_path.stat().st_size if self.log_path.exists() else 0

    def log_since(self, offset: int) -> str:
        if not self.log_path.exists():
            return ""
        with open(self.log_path, "rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def db(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.db_path, isolation_level=None, timeout=10)
        conn.row_factory = sqlite3.Row
        return conn

    def create_key(self, credits: str = "10", rpm: int | None = None, rpd: int | None = None,
                   name: str = "test") -> tuple[int, str]:
        conn = self.db()
        try:
            return keys.create(conn, name, billing.parse_credits(credits), rpm, rpd)
        finally:
            conn.close()

    def balance(self, key_id: int) -> int:
        conn = self.db()
        try:
            return conn.execute("SELECT balance FROM api_keys WHERE id = ?", (key_id,)).fetchone()[0]
        finally:
            conn.close()

    def usage(self, key_id: int) -> list[sqlite3.Row]:
        conn = self.db()
        try:
            return conn.execute("SELECT * FROM usage WHERE key_id = ? ORDER BY id", (key_id,)).fetchall()
        finally:
            conn.close()

    def open_holds(self, key_id: int) -> int:
        conn = self.db()
        try:
            return conn.execute("SELECT COUNT(*) FROM holds WHERE key_id = ?", (key_id,)).fetchone()[0]
        finally:
            conn.close()

    def flask(self, *args: str) -> subprocess.CompletedProcess:
        """Run an operator command (`flask --app app ...`) against this gateway's config."""
        return subprocess.run([str(Path(sys.executable).with_name("flask")), "--app", "app", *args], cwd=ROOT,
                              env=self.env, capture_output=True, text=True, timeout=60)

    def client(self, key: str, **kw: Any):
        import openai
        return openai.OpenAI(base_url=self.base_url, api_key=key, **{"max_retries": 0, **kw})


@pytest.fixture(scope="session")
def fake_openai():
    with FakeOpenAI(UPSTREAM_KEY) as fake:
        yield fake


@pytest.fixture(scope="session")
def fake_gemini():
    with FakeGemini(GEMINI_KEY) as fake:
        yield fake


@pytest.fixture(scope="session")
def fake_lyria():
    with FakeLyria(GEMINI_KEY) as fake:
        yield fake


@pytest.fixture(scope="session")
def gateway_config(tmp_path_factory, fake_openai, fake_gemini, fake_lyria):
    """A factory for a test deployment's config dict (each call gets a fresh database)."""
    def make() -> tuple[Path, dict]:
        tmp = tmp_path_factory.mktemp("gw")
        return tmp, base_config(tmp, fake_openai.base_url, fake_gemini.base_url, fake_lyria.url)
    return make


@pytest.fixture(scope="session")
def gateway(gateway_config):
    tmp, cfg = gateway_config()
    gw = Gateway(tmp, cfg).start()
    yield gw
    gw.stop()


@pytest.fixture
def make_gateway(gateway_config):
    """Start extra gateways with changed config: make_gateway(lambda cfg: ..., workers=1, env=None)."""
    started: list[Gateway] = []

    def make(change=None, workers: int = 1, env: dict[str, str] | None = None) -> Gateway:
        tmp, cfg = gateway_config()
        if change:
            change(cfg)
        gw = Gateway(tmp, cfg, workers, env).start()
        started.append(gw)
        return gw
    yield make
    for gw in started:
        gw.stop()


@pytest.fixture(scope="session")
def count_tokens(tmp_path_factory):
    """tokens.count in the test process, from the BPE files shipped in the wheel (no network)."""
    import tokens
    tokens.seed_cache(str(tmp_path_factory.mktemp("tiktoken")))
    return tokens.count


@pytest.fixture
def key(gateway):
    """A fresh funded key on the shared gateway: (id, secret)."""
    return gateway.create_key("10")
