"""The app factory under gunicorn: CLI commands print no warnings, and start-up warns once per upstream without
its key."""
from __future__ import annotations

import os


def test_cli_commands_print_no_warnings(gateway) -> None:
    """The test deployment has an upstream without its key and loopback image hosts on: both used to print a
    warning line before every command's output. A real `flask` process: its whole start-up output is checked."""
    done = gateway.flask("keys", "list", in_process=False)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert "WARNING" not in done.stdout


def test_missing_keys_are_logged_once_per_upstream_at_start(gateway) -> None:
    lines = [ln for ln in gateway.log().splitlines() if "has no key" in ln]
    assert len(lines) == 1, lines  # only "nokey" lacks its key (TEST_MISSING_KEY is unset); one line for it
    assert "upstream nokey has no key; set TEST_MISSING_KEY" in lines[0] and "gpt-nokey" in lines[0]
    assert os.environ.get("TEST_MISSING_KEY") is None


