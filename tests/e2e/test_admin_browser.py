"""The admin page in a real headless Chromium (Debian's `chromium`), driven over the DevTools protocol with the
`websockets` package the gateway already uses: sign in, create a key, use it, top up, see the balance change,
revoke. A screenshot of each page is written to tests/artifacts/."""
from __future__ import annotations

import base64
import itertools
import json
import os
import shutil
import subprocess
import time
from decimal import Decimal
from pathlib import Path

import openai
import pytest
import requests
from websockets.sync.client import connect

from tests.conftest import free_port

TOKEN = "browser-admin-token-42"
ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

if CHROMIUM is None and not os.environ.get("CI"):
    pytest.skip("chromium is not installed (apt-get install chromium); CI installs it", allow_module_level=True)


class Page:
    """One Chromium tab over the DevTools protocol: just what this test needs."""

    def __init__(self, ws) -> None:
        self.ws = ws
        self.ids = itertools.count(1)

    def send(self, method: str, **params) -> dict:
        msg_id = next(self.ids)
        self.ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv(timeout=30))
            if msg.get("id") == msg_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    def js(self, expression: str):
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait(self, expression: str, timeout: float = 15) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if self.js(f"document.readyState === 'complete' && !!({expression})"):
                    return
            except RuntimeError:
                pass  # the page is navigating: its context is gone for a moment
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {expression}; page: {self.js('location.href')}")

    def goto(self, url: str, ready: str) -> None:
        self.send("Page.navigate", url=url)
        self.wait(ready)

    def submit(self, form: str, values: dict[str, str], ready: str) -> None:
        fill = ";".join(f"document.querySelector({json.dumps(f'{form} [name={name}]')}).value = {json.dumps(v)}"
                        for name, v in values.items())
        self.js(f"window.__before = performance.timeOrigin; {fill}; "
                f"document.querySelector({json.dumps(form + ' button[type=submit]')}).click(); true")
        self.wait(f"performance.timeOrigin !== window.__before && ({ready})")

    def text(self, selector: str) -> str:
        return self.js(f"document.querySelector({json.dumps(selector)}).textContent.trim()")

    def screenshot(self, name: str) -> Path:
        ARTIFACTS.mkdir(exist_ok=True)
        data = self.send("Page.captureScreenshot", format="png", captureBeyondViewport=True)["data"]
        path = ARTIFACTS / f"{name}.png"
        path.write_bytes(base64.b64decode(data))
        return path


@pytest.fixture
def browser(tmp_path):
    port = free_port()
    proc = subprocess.Popen([CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
                             "--disable-dev-shm-usage", f"--remote-debugging-port={port}",
                             "--remote-debugging-address=127.0.0.1", f"--user-data-dir={tmp_path / 'chrome'}",
                             "--window-size=1440,1000", "about:blank"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                targets = requests.get(f"http://127.0.0.1:{port}/json/list", timeout=2).json()
                pages = [t for t in targets if t.get("type") == "page"]
                if pages:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("chromium did not start")
            time.sleep(0.2)
        with connect(pages[0]["webSocketDebuggerUrl"], max_size=64 * 1024 * 1024, open_timeout=10) as ws:
            page = Page(ws)
            page.send("Page.enable")
            yield page
    finally:
        os.killpg(proc.pid, 9)
        proc.wait(timeout=10)


def test_sign_in_create_use_top_up_revoke(make_gateway, browser):
    gw = make_gateway(env={"GATEWAY_ADMIN_TOKEN": TOKEN})
    gw.create_key("12.5", name="team-research")
    gw.create_key("3", name="intern", rpm=10)
    admin = f"{gw.url}/admin/"

    browser.goto(admin, "document.querySelector('#login')")
    browser.screenshot("admin-login")
    browser.submit("#login", {"token": "wrong"}, "document.querySelector('#error')")
    assert "not the admin token" in browser.text("#error")
    browser.submit("#login", {"token": TOKEN}, "document.querySelector('#keys')")

    cookies = browser.send("Network.getAllCookies")["cookies"]
    session = next(c for c in cookies if c["name"] == "gateway_admin")
    assert session["httpOnly"] is True and session["sameSite"] == "Strict" and session["path"] == "/admin"
    # A form posted without the session's CSRF token is refused, even with the session cookie.
    r = requests.post(f"{gw.url}/admin/keys", data={"name": "x", "credits": "1"},
                      cookies={"gateway_admin": session["value"]}, timeout=10, allow_redirects=False)
    assert r.status_code == 403
    assert gw.db().execute("SELECT COUNT(*) FROM api_keys WHERE name = 'x'").fetchone()[0] == 0

    browser.submit("#create", {"name": "web-app", "credits": "5", "daily_cap": "2", "allowed_models": "gpt-test"},
                   "document.querySelector('#secret')")
    secret = browser.text("#secret")
    assert secret.startswith("sk-")
    browser.screenshot("admin-key-created")
    key_id = int(browser.js("[...document.querySelectorAll('#keys tbody tr')].pop().id.split('-')[1]"))
    assert gw.balance(key_id) == 5 * 10**9

    client = gw.client(secret)
    for _ in range(3):
        client.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "hello"}])
    browser.goto(admin, "document.querySelector('#keys')")
    shown = Decimal(browser.text(f"#key-{key_id} .balance"))
    assert shown == Decimal(gw.balance(key_id)) / 10**9 < 5  # the balance fell on the page
    browser.screenshot("admin-keys")

    browser.goto(f"{admin}keys/{key_id}", "document.querySelector('#topup')")
    browser.submit("#topup", {"credits": "2.5"}, "document.querySelector('#message')")
    after = Decimal(browser.text("#balance"))
    assert after == shown + Decimal("2.5") == Decimal(gw.balance(key_id)) / 10**9
    assert "Topped up" in browser.text("#message")
    browser.screenshot("admin-key")

    browser.goto(f"{admin}usage", "document.querySelector('#chart')")
    assert browser.js("document.querySelectorAll('#chart rect').length") == 30
    assert browser.js("document.querySelectorAll('table.usage tbody tr').length") >= 3
    browser.screenshot("admin-usage")
    browser.goto(f"{admin}audit", "document.querySelector('#audit-result')")
    assert browser.text("#audit-result").startswith("Audit OK")
    browser.screenshot("admin-audit")

    browser.goto(f"{admin}keys/{key_id}", "document.querySelector('#revoke')")
    browser.submit("#revoke", {}, "document.querySelector('#message')")
    assert browser.text("#state") == "revoked"
    with pytest.raises(openai.AuthenticationError):
        client.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "hello"}])
    browser.goto(admin, "document.querySelector('#keys')")
    assert browser.text(f"#key-{key_id} .state") == "revoked"
