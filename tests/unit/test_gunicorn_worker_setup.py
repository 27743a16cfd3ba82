"""The worker's per-process shortcuts in gunicorn.conf.py give gunicorn the same values it computes itself."""
from __future__ import annotations

import importlib.util
import logging
import sys

from gunicorn.config import Config
from gunicorn.http import wsgi

from tests.conftest import ROOT


def _conf():
    spec = importlib.util.spec_from_file_location("gateway_gunicorn_conf", ROOT / "gunicorn.conf.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_frozen_settings_are_gunicorns_values() -> None:
    conf = _conf()
    cfg = Config()
    cfg.set("keepalive", 75)
    cfg.set("workers", 3)
    expected = {name: getattr(cfg, name) for name in cfg.settings}
    properties = {name: getattr(cfg, name) for name in ("is_ssl", "address", "worker_class_str", "sendfile")}
    conf.freeze_settings(cfg)
    assert {name: getattr(cfg, name) for name in cfg.settings} == expected
    assert cfg.keepalive == 75 and cfg.workers == 3 and "keepalive" in vars(cfg)
    # Config's own properties still compute, from the frozen values.
    assert {name: getattr(cfg, name) for name in properties} == properties


def test_shared_errors_stream_writes_where_gunicorns_does(monkeypatch) -> None:
    conf = _conf()
    original = wsgi.base_environ
    monkeypatch.setattr(wsgi, "base_environ", original)  # restored after the test: share_base_environ replaces it
    cfg = Config()
    cfg.set("errorlog", "-")

    class Sink:
        def __init__(self) -> None:
            self.parts: list[str] = []

        def write(self, data: str) -> None:
            self.parts.append(data)

        def flush(self) -> None:
            pass

    errlog = logging.getLogger("gunicorn.error")
    stderr_sink, file_sink = Sink(), Sink()
    first, second = logging.StreamHandler(stderr_sink), logging.StreamHandler(file_sink)
    monkeypatch.setattr(errlog, "handlers", [first, second])
    monkeypatch.setattr(sys, "stderr", Sink())
    expected = original(cfg)
    conf.share_base_environ(cfg)
    env_a, env_b = wsgi.base_environ(cfg), wsgi.base_environ(cfg)
    assert env_a is not env_b and env_a["wsgi.errors"] is env_b["wsgi.errors"]
    assert {k: v for k, v in env_a.items() if k != "wsgi.errors"} == {
        k: v for k, v in expected.items() if k != "wsgi.errors"}
    assert env_a["wsgi.errors"].streams == expected["wsgi.errors"].streams == [sys.stderr, file_sink]
    env_a["wsgi.errors"].write("oops\n")
    assert sys.stderr.parts == ["oops\n"] and file_sink.parts == ["oops\n"] and stderr_sink.parts == []


def test_several_workers_listen_on_sockets_of_their_own(monkeypatch) -> None:
    # gunicorn then binds one SO_REUSEPORT socket per worker (its arbiter skips the shared one), and the kernel
    # spreads new connections over them; one worker keeps gunicorn's single shared socket.
    monkeypatch.setenv("WORKERS", "2")
    assert _conf().reuse_port is True
    monkeypatch.setenv("WORKERS", "1")
    assert _conf().reuse_port is False
