"""A bad config.toml stops a real gunicorn start (and a CLI command) with one sentence, not a traceback."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import MINIMAL_CONFIG as GOOD
from tests.conftest import ROOT
from tests.gateway import flask_in_process


def start_server(config_path: Path) -> subprocess.CompletedProcess:
    """gunicorn as `make serve` runs it, with this config; it is expected to refuse to start."""
    gunicorn = str(Path(sys.executable).with_name("gunicorn"))
    return subprocess.run([gunicorn, "-c", "gunicorn.conf.py", "app:create_app()"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60,
                          env={"GATEWAY_CONFIG": str(config_path), "PORT": "1", "PATH": "/usr/bin:/bin"})


def test_server_refuses_to_start_with_one_sentence(tmp_path):
    bad = tmp_path / "config.toml"
    bad.write_text(GOOD + "[server]\nmax_body_bytes = \"big\"\n")
    done = start_server(bad)
    assert done.returncode != 0
    assert "gateway: [server].max_body_bytes must be a whole number" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("setting", ['database = "{tmp}"', 'database = "{tmp}/f/gw.db"', "max_body_bytes = 0"])
def test_server_start_refused_with_one_sentence(tmp_path, setting):
    (tmp_path / "f").write_text("a file, not a directory")
    bad = tmp_path / "config.toml"
    bad.write_text(GOOD + "[server]\n" + setting.format(tmp=tmp_path) + "\n")
    done = start_server(bad)
    assert done.returncode != 0
    assert "gateway: [server]." in done.stderr
    assert "Traceback" not in done.stderr
    env = {"GATEWAY_CONFIG": str(bad), "PATH": "/usr/bin:/bin"}
    done = flask_in_process(env, ("keys", "list"))
    assert done.returncode != 0 and "gateway: [server]." in done.stderr and "Traceback" not in done.stderr
    if setting == "max_body_bytes = 0":  # refused by create_app while `flask --app app` finds it: a real process too
        flask = str(Path(sys.executable).with_name("flask"))
        done = subprocess.run([flask, "--app", "app", "keys", "list"], cwd=ROOT, capture_output=True, text=True,
                              timeout=60, env=env)
        assert done.returncode != 0 and "gateway: [server]." in done.stderr and "Traceback" not in done.stderr


