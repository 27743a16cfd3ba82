"""In-process fixtures: the gateway's Flask app from `create_app(cfg)`, driven by Flask's (Werkzeug's) test client.

The app talks to the same fake upstreams on 127.0.0.1 as the end-to-end tier, over real sockets; only the client
side skips the network. The `gateway` fixture here has the end-to-end Gateway's test API (create_key, balance,
usage, open_holds, log, client), so an assertion moved from tests/e2e reads the same. Without gunicorn there is
no gevent monkey patching: the relay's greenlet and db.write's gevent thread pool still run, from the main thread.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest
import requests
from requests.adapters import BaseAdapter
from requests.structures import CaseInsensitiveDict
from werkzeug.test import Client

import config
import db
from tests.conftest import GEMINI_KEY, UPSTREAM_KEY, to_toml
from tests.gateway import Books

HOST = "http://inproc.test"  # never resolved: every request under it goes to the WSGI app, not a socket


class WSGIAdapter(BaseAdapter):
    """requests' transport replaced by Flask's test client, so `http.post(url, json=...)` reads as it does e2e."""

    def __init__(self, app: Any) -> None:
        super().__init__()
        self.client = Client(app)

    def send(self, request: requests.PreparedRequest, **_: Any) -> requests.Response:
        url = requests.utils.urlparse(request.url)
        body = request.body.encode() if isinstance(request.body, str) else request.body
        got = self.client.open(url.path, method=request.method, query_string=url.query,
                               headers=dict(request.headers), data=body or b"", buffered=True)
        resp = requests.Response()
        resp.status_code = got.status_code
        resp.headers = CaseInsensitiveDict(got.headers.items())
        resp._content = got.get_data()
        resp.raw = io.BytesIO(resp._content)
        resp.url = request.url
        resp.request = request
        resp.encoding = requests.utils.get_encoding_from_headers(resp.headers) or "utf-8"
        resp.reason = got.status.partition(" ")[2]
        return resp

    def close(self) -> None:
        pass


class InProcGateway(Books):
    """The app of one test deployment, in this process, with the e2e Gateway's helpers."""

    def __init__(self, tmp: Path, cfg: dict) -> None:
        from app import create_app  # after the environment holds the upstream keys the providers read

        self.tmp = tmp
        self.cfg = cfg
        self.db_path = cfg["server"]["database"]
        self.config_path = tmp / "config.toml"
        self.config_path.write_text(to_toml(cfg))
        self.log_path = tmp / "gateway.log"
        loaded = config.load(str(self.config_path))
        db.init(loaded.server.database)  # gunicorn's on_starting does this before any worker exists
        self.app = create_app(loaded)
        self.url = HOST
        self.base_url = f"{HOST}/v1"
        self.http = requests.Session()
        self.http.mount(HOST, WSGIAdapter(self.app))

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def client(self, key: str, **kw: Any):
        """The official SDK, its HTTP transport being the WSGI app (httpx's WSGITransport), not a socket."""
        import openai
        http_client = httpx2.Client(transport=httpx2.WSGITransport(app=self.app), base_url=self.base_url)
        return openai.OpenAI(base_url=self.base_url, api_key=key, http_client=http_client,
                             **{"max_retries": 0, **kw})


@pytest.fixture(scope="session")
def upstream_keys():
    """The providers read their keys from the environment, as under gunicorn; TEST_MISSING_KEY stays unset."""
    saved = {k: os.environ.get(k) for k in ("TEST_UPSTREAM_KEY", "TEST_GEMINI_KEY", "TEST_MISSING_KEY")}
    os.environ.update(TEST_UPSTREAM_KEY=UPSTREAM_KEY, TEST_GEMINI_KEY=GEMINI_KEY)
    os.environ.pop("TEST_MISSING_KEY", None)
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@contextlib.contextmanager
def _logging_to(path: Path) -> Iterator[None]:
    """The gateway's own logger and the root one (libraries: urllib3, websockets) into `path`, so that a log check
    here sees what gunicorn's log file would hold."""
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    loggers = [logging.getLogger("gateway"), logging.getLogger()]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
        handler.close()


@pytest.fixture(scope="session")
def gateway(gateway_config, upstream_keys):
    """One in-process app of the test deployment, shared by the tier (tests make their own keys)."""
    tmp, cfg = gateway_config()
    gw = InProcGateway(tmp, cfg)
    with _logging_to(gw.log_path):
        yield gw


@pytest.fixture
def make_gateway(gateway_config, upstream_keys, monkeypatch):
    """Apps of a changed config: make_gateway(lambda cfg: ..., env={...}), the in-process twin of the e2e fixture
    for tests that only check what the app answers under a config variant (no server, no start-up to pay). env
    is set in this process for the test, as the e2e one is in the gateway's; each app logs to its own file."""
    with contextlib.ExitStack() as stack:
        def make(change=None, env: dict[str, str] | None = None) -> InProcGateway:
            for name, value in (env or {}).items():
                monkeypatch.setenv(name, value)
            tmp, cfg = gateway_config()
            if change:
                change(cfg)
            gw = InProcGateway(tmp, cfg)
            stack.enter_context(_logging_to(gw.log_path))
            make.made.append(gw)
            return gw
        make.made = []  # for the failure report
        yield make


@pytest.fixture
def key(gateway):
    """A fresh funded key on the shared in-process app: (id, secret)."""
    return gateway.create_key("10")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_call(item: pytest.Item) -> None:  # fixtures are set up by now
    gw = _live(item)
    item.stash[_OFFSET] = gw.log_path.stat().st_size if gw and gw.log_path.exists() else 0


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """A failing test's report carries what the app logged during it (a 500's traceback is logged, not raised):
    the shared app's lines since the test began, and the whole log of each app it made with make_gateway."""
    outcome = yield
    report = outcome.get_result()
    if report.when != "call" or not report.failed:
        return
    shared = _live(item)
    logs = [(shared, item.stash.get(_OFFSET, 0))] if shared else []
    logs += [(gw, 0) for gw in getattr(getattr(item, "funcargs", {}).get("make_gateway"), "made", [])]
    for gw, offset in logs:
        if not gw.log_path.exists():
            continue
        with open(gw.log_path, "rb") as f:
            f.seek(offset)
            text = f.read().decode(errors="replace")
        if text.strip():
            report.sections.append((f"gateway log (in process, {gw.tmp.name}, during this test)", text[-6000:]))


def _live(item: pytest.Item) -> InProcGateway | None:
    fixture = getattr(item, "funcargs", {}).get("gateway")
    return fixture if isinstance(fixture, InProcGateway) else None


_OFFSET = pytest.StashKey[int]()
