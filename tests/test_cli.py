"""The operator's commands, run as `flask --app app ...` against a real database."""
from __future__ import annotations

import sqlite3


def test_key_lifecycle_and_audit(gateway):
    created = gateway.flask("keys", "create", "--name", "alice", "--credits", "0.5", "--rpm", "7")
    assert created.returncode == 0, created.stderr
    secret = created.stdout.strip().splitlines()[-1]
    assert secret.startswith("sk-") and len(secret) >= 35
    assert secret not in gateway.flask("keys", "list").stdout  # shown once only
    line = next(ln for ln in gateway.flask("keys", "list").stdout.splitlines() if "\talice\t" in ln)
    key_id = int(line.split("\t")[0])
    assert "\t0.5\t" in line and "rpm=7" in line and line.endswith("active")
    conn = sqlite3.connect(gateway.db_path)
    stored = conn.execute("SELECT key_hash, prefix FROM api_keys WHERE id = ?", (key_id,)).fetchone()
    conn.close()
    assert secret not in stored and stored[1] == secret[:8]

    assert "0.75" in gateway.flask("keys", "topup", str(key_id), "0.25").stdout
    assert gateway.flask("keys", "topup", str(key_id), "-1").returncode != 0
    assert gateway.flask("keys", "topup", "99999", "1").returncode != 0
    gateway.client(secret).chat.completions.create(model="gpt-test",
                                                   messages=[{"role": "user", "content": "x [usage=10,10]"}])
    usage = gateway.flask("usage", "--key", str(key_id)).stdout
    assert "chat.completions" in usage and "gpt-test" in usage and "0.00002" in usage
    assert gateway.flask("audit").returncode == 0
    assert gateway.flask("keys", "revoke", str(key_id)).returncode == 0
    assert "revoked" in gateway.flask("keys", "list").stdout


def test_audit_catches_a_tampered_balance(make_gateway):
    gw = make_gateway()
    key_id, _ = gw.create_key("1")
    assert gw.flask("audit").returncode == 0
    conn = sqlite3.connect(gw.db_path)
    conn.execute("UPDATE api_keys SET balance = balance + 5 WHERE id = ?", (key_id,))
    conn.commit()
    conn.close()
    result = gw.flask("audit")
    assert result.returncode == 1
    assert f"key {key_id}" in result.stdout


def test_credits_must_be_decimal(gateway):
    assert gateway.flask("keys", "create", "--name", "x", "--credits", "lots").returncode != 0
    assert gateway.flask("keys", "create", "--name", "x", "--credits", "0").returncode == 0
