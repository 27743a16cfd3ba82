"""Sessions are opened under the admin page's cookie path only; every other request gets Flask's NullSession."""
from __future__ import annotations

from flask import session
from flask.sessions import NullSession

import app as app_mod


def _app() -> app_mod.GatewayFlask:
    flask_app = app_mod.GatewayFlask(__name__)
    flask_app.secret_key = "k" * 64
    flask_app.config.update(SESSION_COOKIE_NAME="gateway_admin", SESSION_COOKIE_PATH="/admin")

    @flask_app.get("/admin/who")
    def who() -> str:
        return str(session.get("admin"))

    @flask_app.get("/admin/in")
    def sign_in() -> str:
        session["admin"] = True
        return "ok"

    @flask_app.get("/v1/models")
    def models() -> str:
        return type(session._get_current_object()).__name__

    return flask_app


def test_admin_session_round_trip_and_null_session_elsewhere() -> None:
    client = _app().test_client()
    signed_in = client.get("/admin/in")
    assert signed_in.status_code == 200 and "gateway_admin=" in signed_in.headers["Set-Cookie"]
    assert "Path=/admin" in signed_in.headers["Set-Cookie"]
    assert client.get("/admin/who").get_data(as_text=True) == "True"  # the cookie is read back under /admin
    api = client.get("/v1/models", headers={"Cookie": signed_in.headers["Set-Cookie"].split(";")[0]})
    assert api.get_data(as_text=True) == NullSession.__name__
    assert "Set-Cookie" not in api.headers and "Vary" not in api.headers
