"""config.toml validation: a bad file stops start-up with one sentence that names the key and the fix."""
from __future__ import annotations

import subprocess
import sys
import tomllib
from decimal import Decimal
from pathlib import Path

import pytest

import config

ROOT = Path(__file__).resolve().parent.parent
GOOD = """
[upstreams.u]
kind = "openai"
base_url = "http://127.0.0.1:1/v1"
api_key_env = "X"
[models."m"]
upstream = "u"
input_price = 0.075
output_price = 0.3
"""


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


def test_server_refuses_to_start_with_one_sentence(tmp_path):
    bad = tmp_path / "config.toml"
    bad.write_text(GOOD + "[server]\nmax_body_bytes = \"big\"\n")
    gunicorn = str(Path(sys.executable).with_name("gunicorn"))
    done = subprocess.run([gunicorn, "-c", "gunicorn.conf.py", "app:app"], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, env={"GATEWAY_CONFIG": str(bad), "PORT": "1", "PATH": "/usr/bin:/bin"})
    assert done.returncode != 0
    assert "gateway: [server].max_body_bytes must be a whole number" in done.stderr
    assert "Traceback" not in done.stderr
