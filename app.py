"""The gateway's Flask app, assembled: `create_app()` and nothing else.

A request's path: auth.authenticate (the key), ratelimit (the key's budget), the route's view in routes/ (its body
read and checked by validation.py), billing.Ticket (the hold), a provider in providers/ (the upstream call),
billing again (settlement), errors.render for anything that fails. gunicorn serves `app:create_app()`;
`flask --app app` finds create_app by itself. Importing this module changes nothing: no database file, no
environment variable, no GC setting, no log line.
"""
from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable
from typing import Any

from flask import Flask, Request
from flask.sessions import SecureCookieSessionInterface, SessionMixin

import admin
import auth
import cli
import config as config_mod
import cors
import errors
import metrics
import ratelimit
import routes
import selfservice
import tokens

log = logging.getLogger("gateway")

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"


class LineFormatter(logging.Formatter):
    """logging.Formatter(LOG_FORMAT), with the same output for every record, made with less work.

    The settled request's log line is written once per request; the base class builds its time with strftime
    and fills LOG_FORMAT from the record's __dict__, where this makes the date and time once a second and joins
    the four fields directly: 13.1 -> 9.3 us per line (docs/performance.md, issue 14 round 3).
    """

    def __init__(self) -> None:
        super().__init__(LOG_FORMAT)
        self._second = -1
        self._stamp = ""

    def format(self, record: logging.LogRecord) -> str:
        record.message = record.getMessage()
        second = int(record.created)
        if second != self._second:  # formatTime's own conversion, once per second
            self._stamp = time.strftime(self.default_time_format, self.converter(record.created))
            self._second = second
        record.asctime = asctime = self.default_msec_format % (self._stamp, record.msecs)
        s = f"{asctime} {record.levelname} {record.name} {record.message}"
        # The rest is logging.Formatter.format's own tail: the traceback and stack, when the record has them.
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            if s[-1:] != "\n":
                s = s + "\n"
            s = s + record.exc_text
        if record.stack_info:
            if s[-1:] != "\n":
                s = s + "\n"
            s = s + self.formatStack(record.stack_info)
        return s


class AdminPathSessions(SecureCookieSessionInterface):
    """Flask's signed-cookie sessions, opened only for requests under the session cookie's path (/admin).

    With an admin token set, Flask would build a signing serializer, parse the cookies and make an empty session
    on every API request, and check it again after: 15 us of a request (micro, issue 14 round 3). A browser
    sends the cookie only under its path, and nothing outside it reads or writes the session, so every other
    request gets Flask's NullSession as it does without a secret key: the same answers, no Set-Cookie, no Vary.
    """

    def open_session(self, app: Flask, request: Request) -> SessionMixin | None:
        if not request.path.startswith(self.get_cookie_path(app)):
            return None  # Flask then makes its NullSession, and saves nothing after the response
        return super().open_session(app, request)


class GatewayFlask(Flask):
    """Flask, with sessions only under the admin page's path (AdminPathSessions) and ensure_sync's answer kept
    per function.

    Flask asks inspect.iscoroutinefunction of every before/after_request hook and the view on every request
    (five checks on a chat request). The hooks and views are registered once, so the answer is kept; a
    per-request function (after_this_request) past the first 256 functions is checked as before.
    """

    session_interface = AdminPathSessions()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._sync: dict[Callable, Callable] = {}

    def ensure_sync(self, func: Callable) -> Callable:
        sync = self._sync.get(func)
        if sync is None:
            sync = super().ensure_sync(func)
            if len(self._sync) < 256:
                self._sync[func] = sync
        return sync


def _setup_logging() -> None:
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(LineFormatter())
        log.addHandler(handler)
        log.setLevel(os.environ.get("GATEWAY_LOG_LEVEL", "INFO"))
        log.propagate = False


def create_app(cfg: config_mod.Config | None = None) -> Flask:
    """Build the app from a Config (default: config.toml or $GATEWAY_CONFIG)."""
    _setup_logging()
    if cfg is None:
        try:
            cfg = config_mod.load()
        except config_mod.ConfigError as exc:
            print(f"gateway: {exc}", file=sys.stderr)
            # 3 is gunicorn's "worker failed to boot": the master stops with this sentence instead of respawning.
            raise SystemExit(3) from None
    app = GatewayFlask(__name__)
    app.config["GATEWAY"] = cfg
    # A body with a Content-Length is checked against this before it is read (auth.authenticate) and by
    # Werkzeug; a chunked one has none, and routes.json_body counts it instead.
    app.config["MAX_CONTENT_LENGTH"] = cfg.server.max_body_bytes
    app.config["GATEWAY_STARTED"] = (int(os.path.getmtime(cfg.path)) if cfg.path and os.path.exists(cfg.path)
                                     else int(time.time()))
    tokens.set_cache_dir(os.path.join(os.path.dirname(cfg.server.database), ".tiktoken"))
    errors.register(app)
    cors.register(app)  # before auth: a browser's preflight carries no key
    auth.register(app)  # before the limiter: bad keys never spend anyone's budget
    ratelimit.register(app)  # /health has no key, so the limiter never counts it
    routes.register(app)
    cli.register(app)
    admin.register(app)  # policy hook: /admin/api and the /admin page
    selfservice.register(app)  # policy hook: /v1/key and the dashboard/billing endpoints
    metrics.register(app)  # metrics hook: /metrics
    return app
