"""Shared by every tier: the fake upstreams on 127.0.0.1 and the test deployment's config.

The gunicorn gateway and its fixtures are in tests/gateway.py and tests/e2e/conftest.py; the in-process app in
tests/inproc/conftest.py.
"""
from __future__ import annotations

import socket
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.fake_gemini import FakeGemini  # noqa: E402
from tests.fake_lyria import FakeLyria  # noqa: E402
from tests.fake_openai import FakeOpenAI  # noqa: E402

# The smallest valid config.toml: one upstream and one model (the config tests change it one line at a time).
MINIMAL_CONFIG = """
[upstreams.u]
kind = "openai"
base_url = "http://127.0.0.1:1/v1"
api_key_env = "X"
[models."m"]
upstream = "u"
input_price = 0.075
output_price = 0.3
"""
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
        "server": {"database": str(tmp / "gateway.db"), "heartbeat_seconds": 0.2},
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
            # For tests whose fake never answers: a short wait for the answer that never comes, while connecting
            # keeps the margin a healthy fake needs on a loaded machine. Healthy requests use the upstreams above.
            "fake-short": {"kind": "openai", "base_url": openai_url, "api_key_env": "TEST_UPSTREAM_KEY",
                           "timeout_seconds": 0.5, "connect_timeout_seconds": 2},
            "lyria-short": {"kind": "lyria", "base_url": lyria_url, "api_key_env": "TEST_GEMINI_KEY",
                            "timeout_seconds": 0.5, "connect_timeout_seconds": 2},
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
            "gpt-short": {"upstream": "fake-short", "upstream_model": "gpt-test", "input_price": Raw("0.40"),
                          "output_price": Raw("1.60"), "max_output_tokens": 1000},
            "lyria-short": {"upstream": "lyria-short", "upstream_model": "lyria-realtime-exp", "mode": "music",
                            "per_second": Raw("0.001")},
            "lyria-nosetup": {"upstream": "lyria-short", "upstream_model": "lyria-realtime-exp[nosetup]",
                              "mode": "music", "per_second": Raw("0.001")},
        },
        "vision": {"bridge_model": "gpt-test", "allow_loopback_image_hosts": True},
    }


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
def count_tokens(tmp_path_factory):
    """tokens.count in the test process, from the BPE files shipped in the wheel (no network)."""
    import tokens
    tokens.seed_cache(str(tmp_path_factory.mktemp("tiktoken")))
    return tokens.count


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `long` run first, longest first. pytest-xdist hands out its first tests one at a time,
    round-robin, so each worker starts on a long test and short ones fill the time around it, instead of a long
    one starting last and running alone at the end. Then the xdist groups (below)."""
    def weight(item: pytest.Item) -> float:
        mark = item.get_closest_marker("long")
        return -mark.kwargs.get("seconds", 1) if mark else 0
    items.sort(key=weight)  # stable: the order of everything else stays
    for item in items:
        # A module's own module-scoped fixtures (a gateway started with that module's config, an image server)
        # are set up once per xdist worker that runs one of its tests: keeping such tests on one worker
        # (`--dist loadgroup`) starts each of them once.
        module = item.nodeid.split("::")[0]
        fixtures = getattr(item, "_fixtureinfo", None)
        defs = fixtures.name2fixturedefs.values() if fixtures else ()
        if any(d[-1].scope == "module" and d[-1].baseid.split("::")[0] == module for d in defs if d):
            item.add_marker(pytest.mark.xdist_group(module))
    if getattr(config.option, "loadgroup", False):
        _tag_groups(items)


def _tag_groups(items: list[pytest.Item]) -> None:
    """`--dist loadgroup` for pytest 9.2: pytest-xdist 3.8 tags a grouped test by assigning `item._nodeid`, which
    pytest 9.2 no longer reads (a node's id is `item._id`), so every xdist_group was ignored and a module's own
    gateway started on each worker that ran one of its tests. The same "<nodeid>@<group>" tag, set where pytest
    9.2 keeps it, once (a later xdist that sets it itself is left alone). Runs last (trylast), after xdist's own
    hook, and also covers the groups added above, which xdist's hook did not see."""
    from _pytest.nodeid import NodeId
    for item in items:
        names = sorted({str(m.args[0] if m.args else m.kwargs.get("name", "default"))
                        for m in item.iter_markers("xdist_group")})
        if names and "@" not in item.nodeid.rpartition("]")[2]:
            item._id = NodeId.parse(f"{item.nodeid}@{'_'.join(names)}")
