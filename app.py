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

from flask import Flask

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


def _setup_logging() -> None:
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
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
    app = Flask(__name__)
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
