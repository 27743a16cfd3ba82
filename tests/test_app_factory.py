"""The app factory only assembles: importing app.py changes nothing, CLI commands print no warnings, start-up warns
once per upstream, and every provider implements what it declares it can serve."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import providers
from providers.base import CAPABILITIES
from tests.conftest import ROOT

PROBE = """
import gc, os, sys
before = (gc.get_threshold(), gc.get_freeze_count(), os.environ.get("TIKTOKEN_CACHE_DIR"))
import app
after = (gc.get_threshold(), gc.get_freeze_count(), os.environ.get("TIKTOKEN_CACHE_DIR"))
assert before == after, (before, after)
assert not hasattr(app, "app"), "a module-level app would be built (and its side effects run) on import"
"""


def test_import_app_creates_no_file_and_prints_nothing(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text((ROOT / "config.toml").read_text().replace('"data/gateway.db"',
                                                                 f'"{tmp_path / "data" / "gateway.db"}"'))
    work = tmp_path / "cwd"
    work.mkdir()
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "GATEWAY_CONFIG": str(config),
           "PYTHONDONTWRITEBYTECODE": "1"}
    done = subprocess.run([sys.executable, "-c", PROBE], cwd=work, env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert (done.stdout, done.stderr) == ("", "")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.toml", "cwd"]
    assert list(work.iterdir()) == []


def test_cli_commands_print_no_warnings(gateway) -> None:
    """The test deployment has an upstream without its key and loopback image hosts on: both used to print a
    warning line before every command's output."""
    done = gateway.flask("keys", "list")
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert "WARNING" not in done.stdout


def test_missing_keys_are_logged_once_per_upstream_at_start(gateway) -> None:
    lines = [ln for ln in gateway.log().splitlines() if "has no key" in ln]
    assert len(lines) == 1, lines  # only "nokey" lacks its key (TEST_MISSING_KEY is unset); one line for it
    assert "upstream nokey has no key; set TEST_MISSING_KEY" in lines[0] and "gpt-nokey" in lines[0]
    assert os.environ.get("TEST_MISSING_KEY") is None


def test_every_provider_implements_what_it_declares() -> None:
    for kind, declared in providers.KINDS.items():
        provider = providers.for_kind(kind)
        for mode in declared.modes:
            assert isinstance(provider, CAPABILITIES[mode]), (kind, mode)


def test_routes_never_branch_on_an_upstream_kind() -> None:
    for path in (ROOT / "routes").glob("*.py"):
        assert not re.search(r"\.kind\b", path.read_text()), path
