"""Issue 13 end to end against the real gunicorn gateway: admin API, per-key policies, key self-service,
/metrics, usage retention."""
from __future__ import annotations

import sqlite3
import time

import openai
import pytest
import requests

import db
import keys
import metrics
import policies
from tests.gateway import Gateway

TOKEN = "adm-test-token-0123456789"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def gw(gateway_config):
    tmp, cfg = gateway_config()
    gateway = Gateway(tmp, cfg, env={"GATEWAY_ADMIN_TOKEN": TOKEN}).start()
    yield gateway
    gateway.stop(wait=False)


def api(gw: Gateway, method: str, path: str, **kw) -> requests.Response:
    return requests.request(method, f"{gw.url}/admin/api{path}", headers={**ADMIN, **kw.pop("headers", {})},
                            timeout=10, **kw)


def audit_ok(gw: Gateway) -> None:
    doc = api(gw, "GET", "/audit").json()
    assert doc["ok"] is True and doc["mismatches"] == [], doc


def chat(gw: Gateway, secret: str, model: str = "gpt-test", **kw):
    return gw.client(secret).chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}],
                                                     **kw)


# -- admin API ----------------------------------------------------------------------------------------------

def test_admin_off_without_token_answers_404(gateway):
    """The shared gateway runs with GATEWAY_ADMIN_TOKEN empty (tests/e2e/conftest.py)."""
    for path in ("/admin/api/keys", "/admin/", "/admin/login", "/metrics"):
        r = requests.get(gateway.url + path, headers=ADMIN, timeout=10)
        assert r.status_code == 404, path
        assert r.json()["error"]["code"] == "not_found"


def get_from(gw: Gateway, address: str, token: str) -> requests.Response:
    """GET /admin/api/keys over a connection from `address` (any of 127.0.0.0/8 is this machine's loopback)."""
    class FromAddress(requests.adapters.HTTPAdapter):
        def init_poolmanager(self, *args, **kw):
            super().init_poolmanager(*args, **{**kw, "source_address": (address, 0)})

    with requests.Session() as s:
        s.mount("http://", FromAddress())
        return s.get(f"{gw.url}/admin/api/keys", headers={"Authorization": f"Bearer {token}"}, timeout=10)


def test_wrong_token_is_401_then_throttled_per_address(gw):
    # From an address of its own, so the throttle it earns leaves this module's other tests (127.0.0.1) alone.
    for _ in range(10):
        r = get_from(gw, "127.0.0.2", "nope")
        assert r.status_code == 401
        assert r.json()["error"]["code"] == "invalid_admin_token"
    r = get_from(gw, "127.0.0.2", "nope")
    assert r.status_code == 429 and 1 <= int(r.headers["Retry-After"]) <= 60
    assert get_from(gw, "127.0.0.2", TOKEN).status_code == 429  # even the right one waits
    assert get_from(gw, "127.0.0.1", TOKEN).status_code == 200  # per address: another one is not throttled
    assert TOKEN not in gw.log() and "nope" not in gw.log()


def test_key_lifecycle_through_the_api(gw):
    r = api(gw, "POST", "/keys", json={"name": "alice", "credits": "2.5", "rpm": 100, "daily_cap": "1",
                                        "allowed_models": ["gpt-test"]})
    assert r.status_code == 201, r.text
    doc = r.json()
    secret, key_id = doc["key"], doc["id"]
    assert secret.startswith("sk-") and doc["prefix"] == secret[:8] + "..."
    assert doc["balance"] == "2.5" and doc["balance_nano"] == 2_500_000_000 and doc["daily_cap"] == "1"
    assert doc["allowed_models"] == ["gpt-test"] and doc["state"] == "active" and doc["rpm"] == 100

    listed = {k["id"]: k for k in api(gw, "GET", "/keys").json()["data"]}
    assert "key" not in listed[key_id] and listed[key_id]["balance"] == "2.5"

    chat(gw, secret)
    one = api(gw, "GET", f"/keys/{key_id}").json()
    spent = 2_500_000_000 - one["balance_nano"]
    assert spent > 0 and one["spent_today"] == one["spent_this_month"] != "0"

    r = api(gw, "POST", f"/keys/{key_id}/topup", json={"credits": 1})
    assert r.status_code == 200 and r.json()["balance_nano"] == one["balance_nano"] + 10**9
    r = api(gw, "POST", f"/keys/{key_id}/correct", json={"credits": "0.5", "reason": "refund reversed"})
    assert r.status_code == 200 and r.json()["balance_nano"] == one["balance_nano"] + 500_000_000
    assert gw.balance(key_id) == one["balance_nano"] + 500_000_000
    kinds = gw.ledger(key_id, "kind", "amount", "reason")
    assert kinds[0] == ("grant", 2_500_000_000, None)
    assert kinds[-2:] == [("topup", 10**9, None), ("correction", -500_000_000, "refund reversed")]
    assert sum(a for _, a, _ in kinds) == gw.balance(key_id)

    r = api(gw, "PATCH", f"/keys/{key_id}", json={"name": "alice2", "rpm": None, "daily_cap": None,
                                                   "expires_at": "2099-01-01T00:00:00Z"})
    assert r.status_code == 200, r.text
    assert r.json()["name"] == "alice2" and r.json()["rpm"] is None and r.json()["daily_cap"] is None
    assert r.json()["expires_at"] == "2099-01-01T00:00:00Z"

    r = api(gw, "POST", f"/keys/{key_id}/revoke")
    assert r.json()["state"] == "revoked"
    with pytest.raises(openai.AuthenticationError):
        chat(gw, secret)
    audit_ok(gw)


@pytest.mark.parametrize("body, param", [
    ({"name": "x", "credits": "-1"}, "credits"),
    ({"name": "x", "credits": "1.0000000001"}, "credits"),
    ({"name": "", "credits": "1"}, "name"),
    ({"name": "x", "credits": "1", "rpm": -1}, "rpm"),
    ({"name": "x", "credits": "1", "daily_cap": "abc"}, "daily_cap"),
    ({"name": "x", "credits": "1", "expires_at": "tomorrow"}, "expires_at"),
    ({"name": "x", "credits": "1", "allowed_models": "gpt-test"}, None),  # a string is split on commas: fine
    ({"name": "x", "credits": "1", "allowed_models": [1]}, "allowed_models"),
    ({"name": "x", "credits": "1", "colour": "red"}, "colour"),
])
def test_bad_create_is_a_400_and_writes_nothing(gw, body, param):
    conn = gw.db()
    before = conn.execute("SELECT COUNT(*) FROM api_keys").fetchone()[0]
    r = api(gw, "POST", "/keys", json=body)
    after = conn.execute("SELECT COUNT(*) FROM api_keys").fetchone()[0]
    conn.close()
    if param is None:
        assert r.status_code == 201 and r.json()["allowed_models"] == ["gpt-test"]
        return
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error" and err["message"]
    assert after == before


def test_bad_bodies_and_unknown_keys(gw):
    r = requests.post(f"{gw.url}/admin/api/keys", data=b"{nope", headers=ADMIN, timeout=10)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    assert api(gw, "GET", "/keys/999999").status_code == 404
    assert api(gw, "POST", "/keys/999999/topup", json={"credits": 1}).status_code == 404
    key_id, _ = gw.create_key("1")
    r = api(gw, "POST", f"/keys/{key_id}/correct", json={"credits": "2", "reason": "too much"})
    assert r.status_code == 400 and "at most" in r.json()["error"]["message"]
    r = api(gw, "POST", f"/keys/{key_id}/correct", json={"credits": "0.5"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "reason"
    assert gw.balance(key_id) == 10**9 and gw.ledger(key_id, "kind", "amount", "reason") == [("grant", 10**9, None)]
    r = api(gw, "POST", f"/keys/{key_id}/topup", json={"credits": "1000000000"})
    assert r.status_code == 400 and gw.balance(key_id) == 10**9


def test_usage_query_filters_pages_and_csv(gw):
    key_id, secret = gw.create_key("5")
    for model in ("gpt-test", "gpt-text", "gpt-test"):
        chat(gw, secret, model)
    page = api(gw, "GET", "/usage", params={"key_id": key_id, "limit": 2}).json()
    assert len(page["data"]) == 2 and page["has_more"] is True
    rest = api(gw, "GET", "/usage", params={"key_id": key_id, "limit": 2, "after": page["next_cursor"]}).json()
    assert len(rest["data"]) == 1 and rest["has_more"] is False
    rows = page["data"] + rest["data"]
    assert [r["model"] for r in rows] == ["gpt-test", "gpt-text", "gpt-test"]  # newest first
    assert sum(r["cost_nano"] for r in rows) == 5 * 10**9 - gw.balance(key_id)
    only = api(gw, "GET", "/usage", params={"key_id": key_id, "model": "gpt-text", "status": 200}).json()["data"]
    assert len(only) == 1 and only[0]["route"] == "chat.completions"
    none = api(gw, "GET", "/usage", params={"key_id": key_id, "since": "2099-01-01"}).json()["data"]
    assert none == []
    r = api(gw, "GET", "/usage", params={"key_id": key_id, "format": "csv"})
    assert r.headers["Content-Type"].startswith("text/csv")
    lines = r.text.strip().splitlines()
    assert lines[0].startswith("id,created_at,request_id") and len(lines) == 4
    assert api(gw, "GET", "/usage", params={"status": "abc"}).status_code == 400
    assert api(gw, "GET", "/usage", params={"after": "x"}).status_code == 400


def test_openapi_document_lists_every_route(gw):
    doc = api(gw, "GET", "/openapi.json").json()
    assert doc["openapi"].startswith("3.")
    assert {"/admin/api/keys", "/admin/api/keys/{key_id}", "/admin/api/keys/{key_id}/topup",
            "/admin/api/keys/{key_id}/correct", "/admin/api/keys/{key_id}/revoke", "/admin/api/usage",
            "/admin/api/audit"} <= set(doc["paths"])


def test_cli_and_api_change_keys_through_the_same_functions(gw):
    r = gw.flask("keys", "create", "--name", "cli", "--credits", "1", "--allowed-models", "gpt-test,gpt-text",
                 "--daily-cap", "0.25", "--expires", "2099-05-01")
    assert r.returncode == 0, r.stderr
    key_id = int(r.stdout.split()[2])
    doc = api(gw, "GET", f"/keys/{key_id}").json()
    assert doc["allowed_models"] == ["gpt-test", "gpt-text"] and doc["daily_cap"] == "0.25"
    assert doc["expires_at"] == "2099-05-01T00:00:00Z"
    r = gw.flask("keys", "update", str(key_id), "--monthly-cap", "3", "--allowed-models", "")
    assert r.returncode == 0, r.stderr
    doc = api(gw, "GET", f"/keys/{key_id}").json()
    assert doc["monthly_cap"] == "3" and doc["allowed_models"] is None
    r = gw.flask("keys", "correct", str(key_id), "0.5", "--reason", "test")
    assert r.returncode == 0, r.stderr
    assert gw.ledger(key_id, "kind", "amount", "reason")[-1] == ("correction", -500_000_000, "test")
    r = gw.flask("keys", "update", str(key_id), "--daily-cap", "-1")
    assert r.returncode != 0 and "daily" in r.stderr.lower()


# -- policies -----------------------------------------------------------------------------------------------

def test_allowed_models_403_and_filtered_listing(gw):
    key_id, secret = gw.create_key("5")
    api(gw, "PATCH", f"/keys/{key_id}", json={"allowed_models": ["gpt-text"]})
    with pytest.raises(openai.PermissionDeniedError) as info:
        chat(gw, secret, "gpt-test")
    assert info.value.status_code == 403
    body = info.value.body
    assert body["code"] == "model_not_allowed" and "gpt-test" in body["message"] and "gpt-text" in body["message"]
    assert gw.balance(key_id) == 5 * 10**9 and gw.usage(key_id) == [] and gw.open_holds(key_id) == 0
    ids = [m.id for m in gw.client(secret).models.list()]
    assert ids == ["gpt-text"]
    with pytest.raises(openai.NotFoundError):
        gw.client(secret).models.retrieve("gpt-test")
    assert chat(gw, secret, "gpt-text").choices
    r = requests.post(f"{gw.base_url}/images/generations", headers={"Authorization": f"Bearer {secret}"},
                      json={"model": "gpt-image-1", "prompt": "x"}, timeout=10)
    assert r.status_code == 403
    audit_ok(gw)


def test_expired_key_is_401_saying_when(gw):
    key_id, secret = gw.create_key("5")
    past = time.time() - 60
    api(gw, "PATCH", f"/keys/{key_id}", json={"expires_at": past})
    with pytest.raises(openai.AuthenticationError) as info:
        chat(gw, secret)
    assert info.value.body["code"] == "key_expired"
    assert f"expired at {policies.when(past)}" in info.value.body["message"]
    assert gw.balance(key_id) == 5 * 10**9 and gw.usage(key_id) == []
    assert api(gw, "GET", f"/keys/{key_id}").json()["state"] == "expired"
    api(gw, "PATCH", f"/keys/{key_id}", json={"expires_at": None})
    assert chat(gw, secret).choices


def test_daily_cap_is_402_naming_the_cap_and_counts_only_what_was_charged(gw):
    key_id, secret = gw.create_key("5")
    assert api(gw, "PATCH", f"/keys/{key_id}", json={"daily_cap": "0.00002"}).status_code == 200
    chat(gw, secret, max_tokens=5)  # an uncapped hold still fits under the small cap: it plans within it
    spent = 5 * 10**9 - gw.balance(key_id)
    assert 0 < spent < 20_000
    refused = 0
    for _ in range(20):  # each call costs a few nano-credits; the cap stops them before 20 * cost
        try:
            chat(gw, secret, max_tokens=5)
        except openai.APIStatusError as exc:
            assert exc.status_code == 402
            err = exc.body
            assert err["code"] == "daily_cap_reached" and "daily spending cap of 0.00002 credits" in err["message"]
            assert "resets at" in err["message"] and "T00:00:00Z" in err["message"]
            refused += 1
            break
    assert refused == 1
    rows = gw.usage(key_id)
    charged = sum(r["cost"] - r["uncollected"] for r in rows)
    assert charged == 5 * 10**9 - gw.balance(key_id) <= 20_000
    assert gw.open_holds(key_id) == 0
    info = requests.get(f"{gw.base_url}/key", headers={"Authorization": f"Bearer {secret}"}, timeout=10).json()
    assert info["data"]["daily_cap"] == 0.00002
    audit_ok(gw)
    api(gw, "PATCH", f"/keys/{key_id}", json={"daily_cap": None})  # lifting the cap lets it spend again
    assert chat(gw, secret, max_tokens=5).choices


def test_monthly_cap_counts_this_month_only(gw):
    key_id, secret = gw.create_key("5")
    conn = gw.db()
    # A big charge last month must not count against this month's cap.
    conn.execute("INSERT INTO usage(request_id, key_id, route, model, cost, status, latency_ms, created_at)"
                 " VALUES ('old', ?, 'chat.completions', 'gpt-test', 4000000000, 200, 1, ?)",
                 (key_id, policies.month_start() - 3600))
    conn.close()
    api(gw, "PATCH", f"/keys/{key_id}", json={"monthly_cap": "1"})
    assert chat(gw, secret, max_tokens=5).choices


# -- self-service -------------------------------------------------------------------------------------------

def test_key_self_service_and_billing_endpoints(gw):
    key_id, secret = gw.create_key("3", rpm=50)
    api(gw, "PATCH", f"/keys/{key_id}", json={"monthly_cap": "2", "allowed_models": ["gpt-test"]})
    chat(gw, secret)
    auth = {"Authorization": f"Bearer {secret}"}
    balance = gw.balance(key_id)
    spent = 3 * 10**9 - balance
    for prefix in ("/v1", ""):
        doc = requests.get(f"{gw.url}{prefix}/key", headers=auth, timeout=10).json()["data"]
        assert doc["label"] == "test" and doc["prefix"] == secret[:8] + "..."
        assert doc["balance_nano"] == balance and doc["held"] == 0
        assert doc["usage_daily"] == doc["usage_monthly"] == doc["usage"] == spent / 10**9
        assert doc["monthly_cap"] == 2 and doc["allowed_models"] == ["gpt-test"] and doc["expires_at"] is None
        assert doc["rate_limit"]["requests_per_minute"] == 50 and 0 <= doc["rate_limit"]["remaining_minute"] < 50
        # NextChat's usage(): total = subscription.hard_limit_usd, used = usage.total_usage / 100.
        sub = requests.get(f"{gw.url}{prefix}/dashboard/billing/subscription", headers=auth, timeout=10).json()
        assert sub["object"] == "billing_subscription" and sub["hard_limit_usd"] == 2  # the monthly cap
        today = time.strftime("%Y-%m-%d", time.gmtime())
        tomorrow = time.strftime("%Y-%m-%d", time.gmtime(time.time() + 86400))
        used = requests.get(f"{gw.url}{prefix}/dashboard/billing/usage", headers=auth, timeout=10,
                            params={"start_date": today, "end_date": tomorrow}).json()
        assert used["total_usage"] / 100 == pytest.approx(spent / 10**9)
    api(gw, "PATCH", f"/keys/{key_id}", json={"monthly_cap": None})
    sub = requests.get(f"{gw.url}/dashboard/billing/subscription", headers=auth, timeout=10).json()
    assert sub["hard_limit_usd"] == 3  # balance + spent this month
    r = requests.get(f"{gw.url}/v1/dashboard/billing/usage", headers=auth, params={"start_date": "x"}, timeout=10)
    assert r.status_code == 400 and r.json()["error"]["param"] == "start_date"
    assert requests.get(f"{gw.url}/v1/key", timeout=10).status_code == 401


# -- metrics ------------------------------------------------------------------------------------------------

def _sample(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            if all(f'{k}="{v}"' in line for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
    return total


def test_metrics_scrape_across_two_workers(make_gateway):
    gw = make_gateway(workers=2, env={"GATEWAY_ADMIN_TOKEN": TOKEN})
    assert requests.get(f"{gw.url}/metrics", timeout=10).status_code == 401
    key_id, secret = gw.create_key("5")
    for _ in range(6):
        chat(gw, secret)
    chunks = list(chat(gw, secret, stream=True))
    assert chunks
    with pytest.raises(openai.NotFoundError):
        chat(gw, secret, "no-such-model")
    # Each worker writes its counts at most metrics.FLUSH_SECONDS after recording them (the scraping worker at
    # once): wait, within a bound, until every worker's have arrived, then every scrape must show all of them.
    deadline = time.monotonic() + 10 * metrics.FLUSH_SECONDS
    while time.monotonic() < deadline:
        text = requests.get(f"{gw.url}/metrics", headers=ADMIN, timeout=10).text
        if (_sample(text, "gateway_requests_total", route="chat.completions", model="gpt-test", status="200") == 7
                and _sample(text, "gateway_upstream_latency_seconds_count", model="gpt-test") == 7
                and _sample(text, "gateway_holds_in_flight") == 0):
            break
        time.sleep(0.1)
    text = ""
    for _ in range(4):  # any worker answers with every worker's counts
        r = requests.get(f"{gw.url}/metrics", headers=ADMIN, timeout=10)
        assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/plain")
        text = r.text
        assert _sample(text, "gateway_requests_total", route="chat.completions", model="gpt-test", status="200") == 7
    assert _sample(text, "gateway_requests_total", route="chat.completions", status="404") == 1
    for i in range(3):  # unknown URLs share one label value
        requests.get(f"{gw.url}/random-{i}", headers={"Authorization": f"Bearer {secret}"}, timeout=10)
    deadline = time.monotonic() + 10 * metrics.FLUSH_SECONDS  # as above: until the other worker's counts arrive
    while time.monotonic() < deadline:
        text = requests.get(f"{gw.url}/metrics", headers=ADMIN, timeout=10).text
        if _sample(text, "gateway_requests_total", route="unmatched", status="404") == 3:
            break
        time.sleep(0.1)
    assert "random-" not in text
    assert _sample(text, "gateway_requests_total", route="unmatched", status="404") == 3
    charged = 5 * 10**9 - gw.balance(key_id)
    assert _sample(text, "gateway_credits_charged_nano_total", model="gpt-test") == charged
    rows = gw.usage(key_id)
    assert _sample(text, "gateway_tokens_total", model="gpt-test", direction="out") == \
        sum(r["completion_tokens"] for r in rows)
    assert _sample(text, "gateway_upstream_latency_seconds_count", model="gpt-test") == 7
    assert _sample(text, "gateway_time_to_first_token_seconds_count", model="gpt-test") == 1
    assert _sample(text, "gateway_open_streams") == 0 and _sample(text, "gateway_holds_in_flight") == 0


def test_metrics_count_limiter_rejections(gw):
    def rejected() -> float:
        return _sample(requests.get(f"{gw.url}/metrics", headers=ADMIN, timeout=10).text,
                       "gateway_rate_limited_total", window="minute")

    before = rejected()  # the module's gateway: other tests may have been limited before this one
    _, secret = gw.create_key("5", rpm=1)
    chat(gw, secret)
    with pytest.raises(openai.RateLimitError):
        chat(gw, secret)
    assert rejected() - before == 1


# -- retention ----------------------------------------------------------------------------------------------

def test_retention_deletes_old_usage_in_batches_and_keeps_the_books(make_gateway):
    def change(cfg):
        cfg["server"]["usage_retention_days"] = 1

    old = policies.month_start() - 40 * 86400  # older than a day and than this month

    tmp_rows = 1234

    def seed(path: str) -> int:
        db.init(path)
        conn = db.connect(path, busy_seconds=10)
        key_id, _ = keys.create(conn, "old", 10**9)
        conn.executemany("INSERT INTO usage(request_id, key_id, route, model, cost, status, latency_ms, created_at)"
                         " VALUES (?, ?, 'chat.completions', 'gpt-test', 0, 200, 1, ?)",
                         [(f"r{i}", key_id, old + i) for i in range(tmp_rows)])
        conn.close()
        return key_id

    # Seeded before the gateway's first start, as an old deployment's database would be.
    gw = make_gateway(change, env={"GATEWAY_ADMIN_TOKEN": TOKEN}, start=False)
    key_id = seed(gw.db_path)
    _, secret = gw.create_key("5")
    gw.start()
    chat(gw, secret)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and len(gw.usage(key_id)):
        time.sleep(0.2)
    assert gw.usage(key_id) == []
    conn = gw.db()
    assert conn.execute("SELECT COUNT(*) FROM usage").fetchone()[0] == 1  # this month's row is kept
    conn.close()
    assert "retention: deleted 1234 usage rows" in gw.log()
    audit_ok(gw)


def test_migration_from_version_2_adds_policies_and_corrections(tmp_path):
    path = str(tmp_path / "old.db")
    conn = sqlite3.connect(path)
    conn.executescript("""
        CREATE TABLE api_keys (id INTEGER PRIMARY KEY, name TEXT NOT NULL, key_hash TEXT NOT NULL UNIQUE,
            prefix TEXT NOT NULL, balance INTEGER NOT NULL CHECK (balance >= 0), rpm INTEGER, rpd INTEGER,
            created_at REAL NOT NULL, revoked_at REAL);
        CREATE TABLE ledger (id INTEGER PRIMARY KEY, key_id INTEGER NOT NULL REFERENCES api_keys(id),
            amount INTEGER NOT NULL, kind TEXT NOT NULL CHECK (kind IN ('grant', 'topup', 'charge')),
            request_id TEXT, created_at REAL NOT NULL);
        INSERT INTO api_keys VALUES (1, 'a', 'h', 'sk-x', 5, NULL, NULL, 0, NULL);
        INSERT INTO ledger VALUES (1, 1, 5, 'grant', NULL, 0);
        PRAGMA user_version = 2;
    """)
    conn.close()
    db.init(path)
    with db.cli_connection(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == db.SCHEMA_VERSION
        assert keys.get(conn, 1)["daily_cap"] is None
        import billing
        assert billing.correct(conn, 1, 2, "why") == 3
        assert [tuple(r) for r in conn.execute("SELECT kind, amount, reason FROM ledger ORDER BY id")] == \
            [("grant", 5, None), ("correction", -2, "why")]
        assert billing.audit(conn) == []
        names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
        assert {"usage_key_time", "usage_time"} <= names
