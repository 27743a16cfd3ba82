"""config.toml validation: a bad file stops start-up with one sentence that names the key and the fix."""
from __future__ import annotations

import tomllib
from decimal import Decimal

import pytest

import config
from tests.conftest import MINIMAL_CONFIG as GOOD
from tests.conftest import ROOT


def parse(text: str) -> config.Config:
    return config.parse(tomllib.loads(text, parse_float=Decimal))


def test_shipped_config_is_valid():
    cfg = config.load(str(ROOT / "config.toml"))
    assert cfg.models["gpt-4.1-mini"].input_npm == 400_000_000  # 0.40 credits per million tokens, exact
    assert cfg.server.owner == "violations"
    assert cfg.limits.storage_uri == "memory://"


def test_defaults_and_exact_prices():
    cfg = parse(GOOD)
    model = cfg.models["m"]
    assert model.upstream_model == "m"
    assert model.input_npm == 75_000_000 and model.output_npm == 300_000_000
    assert cfg.server.max_body_bytes == 20 * 1024 * 1024
    assert cfg.limits.default_rpm == 60


@pytest.mark.parametrize("text,words", [
    (GOOD + "[server]\nport = 1\n", "[server].port is not a setting"),
    (GOOD.replace('upstream = "u"', 'upstream = "v"'), "which is not an [upstreams.NAME] table"),
    (GOOD.replace('kind = "openai"', 'kind = "grpc"'), "kind must be one of"),
    (GOOD.replace("0.075", "0.0000000001"), "at most 9 decimal places"),
    (GOOD.replace("0.075", '"cheap"'), "must be a number"),
    (GOOD.replace("0.075", "-1"), "zero or more"),
    (GOOD + "[limits]\ndefault_rpm = -5\n", "[limits].default_rpm must be a whole number"),
    (GOOD + "[vision]\nbridge_model = \"m\"\n", "with vision = true"),
    (GOOD + "[nonsense]\n", "[nonsense] is not a section"),
    (GOOD.replace('base_url = "http://127.0.0.1:1/v1"\n', ""), "needs base_url"),
    (GOOD.replace('kind = "openai"', 'kind = "lyria"').replace("http://", "ws://"),
     "its upstream must be of kind openai"),
])
def test_bad_config_names_the_key(text, words):
    with pytest.raises(config.ConfigError) as exc:
        parse(text)
    assert words in str(exc.value)


@pytest.mark.parametrize("text,words", [
    (GOOD.replace("0.075", "inf"), "input_price must be a price of zero or more"),
    (GOOD.replace("0.075", "nan"), "input_price must be a price of zero or more"),
    (GOOD.replace("0.075", "1e400"), "input_price must be a price of zero or more"),
    (GOOD + '[limits]\nstorage_uri = "postgres://x"\n', "[limits].storage_uri 'postgres://x' must start with"),
    (GOOD + '[limits]\nstorage_uri = "redis"\n', "[limits].storage_uri 'redis' must start with"),
    (GOOD + "[server]\nmax_body_bytes = 0\n", "[server].max_body_bytes must be a whole number from 1024"),
    (GOOD + "[server]\nheartbeat_seconds = 1e400\n", "[server].heartbeat_seconds must be a number"),
    (GOOD + "[server]\nheartbeat_seconds = nan\n", "[server].heartbeat_seconds must be a number"),
    (GOOD + "[server]\nheartbeat_seconds = -inf\n", "[server].heartbeat_seconds must be a number"),
    (GOOD.replace('api_key_env = "X"', 'api_key_env = "X"\npool_size = 0'),
     "[upstreams.u].pool_size must be a whole number from 1"),
    (GOOD.replace('api_key_env = "X"', "api_key_env = \"X\"\ntimeout_seconds = inf"),
     "[upstreams.u].timeout_seconds must be a number"),
    (GOOD + "[limits]\ndefault_rpm = 73786976294838206464\n", "[limits].default_rpm must be a whole number from 0"),
    (GOOD.replace("http://127.0.0.1:1/v1", "ftp://127.0.0.1/v1"), "must be a http:// or https:// URL"),
    (GOOD.replace("http://127.0.0.1:1/v1", "127.0.0.1:1/v1"), "must be a http:// or https:// URL"),
    (GOOD.replace("http://127.0.0.1:1/v1", "http://127.0.0.1:99999/v1"), "must be a http:// or https:// URL"),
    (GOOD.replace("http://127.0.0.1:1/v1", "wss://example.com/x"), "must be a http:// or https:// URL"),
    (GOOD.replace('kind = "openai"', 'kind = "lyria"'), "must be a ws:// or wss:// URL"),
])
def test_harmful_or_crashing_values_are_one_sentence(text, words):
    with pytest.raises(config.ConfigError) as exc:
        parse(text)
    assert words in str(exc.value)
    assert str(exc.value).endswith(".") and "\n" not in str(exc.value)


def test_bounds_accept_sane_values():
    cfg = parse(GOOD.replace('api_key_env = "X"', 'api_key_env = "X"\npool_size = 1')
                + '[server]\nmax_body_bytes = 1024\nheartbeat_seconds = 0.5\n[limits]\nstorage_uri = "redis://h:1/0"\n')
    assert cfg.upstreams["u"].pool_size == 1 and cfg.server.heartbeat_seconds == 0.5
    lyria = parse(GOOD.replace('kind = "openai"', 'kind = "lyria"').replace("http://", "wss://")
                  .replace('[models."m"]\nupstream = "u"', '[models."m"]\nupstream = "u"\nmode = "music"'))
    assert lyria.upstreams["u"].base_url.startswith("wss://")


@pytest.mark.parametrize("where", ["directory", "under_a_file"])
def test_unusable_database_path_is_one_sentence(tmp_path, where):
    import db
    path = tmp_path / "data" if where == "directory" else tmp_path / "plain.txt" / "sub" / "gateway.db"
    if where == "directory":
        path.mkdir()
    else:
        (tmp_path / "plain.txt").write_text("x")
    with pytest.raises(config.ConfigError) as exc:
        db.init(str(path))
    assert str(exc.value).startswith(f"[server].database = '{path}'")
    assert ("is a directory" if where == "directory" else "cannot be created") in str(exc.value)


def test_storage_without_its_driver_is_refused_before_start():
    import importlib.util
    assert importlib.util.find_spec("pymongo") is None, "this test needs a storage driver that is not installed"
    with pytest.raises(config.ConfigError) as exc:
        parse(GOOD + '[limits]\nstorage_uri = "mongodb://127.0.0.1:1"\n')
    assert "needs the Python package 'pymongo'" in str(exc.value)
