"""The gateway as users run it (gunicorn + gevent on a free port of 127.0.0.1), for the end-to-end tier."""
from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import requests

import billing
import keys
from tests.conftest import GEMINI_KEY, GUNICORN, ROOT, UPSTREAM_KEY, free_port, to_toml

LIVE: list[Gateway] = []  # gateways started and not yet stopped, whose logs a failing test report shows
LOG_TAIL = 6000
STOPPING: list[subprocess.Popen] = []  # gateways signalled by stop(wait=False) and not yet reaped


def _reap(proc: subprocess.Popen) -> None:
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def reap_stopped() -> None:
    """Wait for every gateway stopped with wait=False (SIGKILL after 15 s), so none outlives the test run."""
    while STOPPING:
        _reap(STOPPING.pop())


class Books:
    """A test deployment's database as the tests read it: keys, balances, usage rows, open holds (needs db_path)."""

    db_path: str

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

    def ledger(self, key_id: int, *columns: str) -> list[tuple]:
        """The key's ledger rows in order, as tuples of the named columns (kind, amount, reason, ...)."""
        assert columns and all(c.isidentifier() for c in columns), columns  # column names only, never a value
        names = ", ".join(columns)
        conn = self.db()
        try:
            return [tuple(r) for r in conn.execute(f"SELECT {names} FROM ledger WHERE key_id = ? ORDER BY id",
                                                   (key_id,))]
        finally:
            conn.close()

    def open_holds(self, key_id: int) -> int:
        conn = self.db()
        try:
            return conn.execute("SELECT COUNT(*) FROM holds WHERE key_id = ?", (key_id,)).fetchone()[0]
        finally:
            conn.close()


class Gateway(Books):
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
        # No control socket: its default path is one per user, so the many gateways a test run starts (and the
        # other runs on the machine) would each replace and then unlink the same socket file.
        self.proc = subprocess.Popen([GUNICORN, "-c", "gunicorn.conf.py", "--no-control-socket", "app:create_app()"],
                                     cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited: {self.log()}")
            try:
                if requests.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return self
            except requests.RequestException:
                # Refused until the master binds (a connection after that waits for the worker's answer): a short
                # poll, since a start-up takes about a second and every test that starts a gateway waits for it.
                time.sleep(0.02)
        raise RuntimeError(f"gateway did not start: {self.log()}")

    def stop(self, sig: int = signal.SIGINT, wait: bool = True) -> None:
        """Signal the gateway's process group. wait=False is for fixture teardown: gunicorn takes about half a
        second to reap its workers and exit, time the next test need not spend idle; reap_stopped() collects
        those processes (the e2e conftest calls it when the session ends)."""
        if self in LIVE:
            LIVE.remove(self)
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            if not wait:
                STOPPING.append(self.proc)
                return
            _reap(self.proc)

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

    def flask(self, *args: str, in_process: bool = True) -> subprocess.CompletedProcess:
        """Run an operator command (`flask --app app ...`) against this gateway's config.

        In process by default (flask_in_process): a CLI subprocess costs about 0.4 s of CPU in imports alone, and
        the tests run dozens. in_process=False runs the real `flask` executable, for tests where the process
        itself (its start-up output, app discovery, several processes at once) is what is checked.
        """
        if in_process:
            return flask_in_process(self.env, args)
        return subprocess.run([str(Path(sys.executable).with_name("flask")), "--app", "app", *args], cwd=ROOT,
                              env=self.env, capture_output=True, text=True, timeout=60)

    def client(self, key: str, **kw: Any):
        import openai
        return openai.OpenAI(base_url=self.base_url, api_key=key, **{"max_retries": 0, "http_client": sdk_http(), **kw})


_SDK_HTTP: Any = None


def sdk_http() -> Any:
    """One HTTP client under every SDK client of this test process. The SDK builds its own otherwise, and that
    loads the CA bundle into a new TLS context: 27 ms of CPU per client, for gateways on plain http. Never closed
    by a test (no test closes an SDK client); a pooled connection to a stopped gateway is dropped on reuse."""
    global _SDK_HTTP
    if _SDK_HTTP is None:
        from openai import DefaultHttpxClient  # the SDK's own defaults: timeouts, pool limits, redirects
        _SDK_HTTP = DefaultHttpxClient()
    return _SDK_HTTP


class _CurrentStderr:
    """A stream that writes to whatever sys.stderr is when a record is written (CliRunner swaps it per command)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def flask_in_process(env: dict[str, str], args: tuple[str, ...]) -> subprocess.CompletedProcess:
    """`flask --app app ARGS` run by click's test runner in this process, as the real command runs it.

    The same entry point (flask.cli.cli with --app app: the module imported, create_app() found and called with no
    argument, so the config comes from GATEWAY_CONFIG), the exact environment of the subprocess for the duration,
    stdout and stderr apart, the exit code as the process's. The gateway logger is set up as in a fresh process
    (app._setup_logging), writing to this command's stderr; it, the tokens module's cache directory (create_app
    sets it) and sys.path are put back afterwards. An exception no command handles is raised here (a real run
    would print its traceback and exit 1), so the calling test fails on it.
    """
    import logging

    import flask.cli
    from click.testing import CliRunner

    import tokens

    # Variables the subprocess would not have are unset (None), and flask's own FLASK_RUN_FROM_CLI put back.
    run_env: dict[str, str | None] = {name: None for name in os.environ}
    run_env["FLASK_RUN_FROM_CLI"] = None
    run_env.update(env)
    log = logging.getLogger("gateway")
    handlers, level, propagate, cache_dir = log.handlers[:], log.level, log.propagate, tokens._cache_dir
    path = sys.path[:]  # flask's --app puts the working directory first
    handler = logging.StreamHandler(_CurrentStderr())
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    log.handlers = [handler]
    log.setLevel(env.get("GATEWAY_LOG_LEVEL", "INFO"))
    log.propagate = False
    try:
        result = CliRunner(env=run_env, catch_exceptions=False).invoke(
            flask.cli.cli, ["--app", "app", *args], prog_name="flask")
    finally:
        log.handlers, log.propagate, tokens._cache_dir, sys.path[:] = handlers, propagate, cache_dir, path
        log.setLevel(level)
    return subprocess.CompletedProcess(["flask", "--app", "app", *args], result.exit_code, result.stdout,
                                       result.stderr)
