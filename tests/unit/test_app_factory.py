"""The app factory only assembles: importing app.py changes nothing, and every provider implements what it
declares it can serve."""
from __future__ import annotations

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


def test_every_provider_implements_what_it_declares() -> None:
    for kind, declared in providers.KINDS.items():
        provider = providers.for_kind(kind)
        for mode in declared.modes:
            assert isinstance(provider, CAPABILITIES[mode]), (kind, mode)


def test_routes_never_branch_on_an_upstream_kind() -> None:
    for path in (ROOT / "routes").glob("*.py"):
        assert not re.search(r"\.kind\b", path.read_text()), path
