"""The operator's commands, run as `flask --app app ...` against a real database.

gw.flask runs a command in this process (tests.gateway.flask_in_process); the tests about processes (several
creating keys at once, one waiting on another's lock) start real `flask` processes."""
from __future__ import annotations

import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT


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


def test_audit_catches_a_tampered_balance(make_deployment):
    gw = make_deployment()
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


def _state(gw, key_id: int) -> tuple:
    conn = sqlite3.connect(gw.db_path)
    try:
        balance = conn.execute("SELECT balance, typeof(balance) FROM api_keys WHERE id = ?", (key_id,)).fetchone()
        ledger = conn.execute("SELECT COUNT(*), SUM(amount) FROM ledger WHERE key_id = ?", (key_id,)).fetchone()
        return (*balance, *ledger)
    finally:
        conn.close()


def _one_sentence(result, *words: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr and "Error" not in result.stdout
    # start-up warnings of the test deployment (log lines, "2026-... WARNING ...") aside
    lines = [ln for ln in result.stderr.strip().splitlines() if not re.match(r"\d{4}-\d\d-\d\d .* WARNING ", ln)]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    for word in words:
        assert word in lines[0], lines[0]


def test_topup_past_the_bound_writes_nothing(make_deployment):
    gw = make_deployment()
    key_id, _ = gw.create_key("1")
    ok = gw.flask("keys", "topup", str(key_id), "900000000")
    assert ok.returncode == 0, ok.stderr
    before = _state(gw, key_id)
    assert before == (900_000_001 * 10**9, "integer", 2, 900_000_001 * 10**9)
    again = gw.flask("keys", "topup", str(key_id), "900000000")  # 1.8e9 credits: refused, not stored as a REAL
    _one_sentence(again, f"Key {key_id} was not topped up", "top it up by at most 99999999")
    _one_sentence(gw.flask("keys", "topup", str(key_id), "9000000000"), f"Key {key_id}", "from 0 to 1000000000")
    _one_sentence(gw.flask("keys", "topup", str(key_id), "1e10"), f"Key {key_id}", "'1e10' is more than")
    assert _state(gw, key_id) == before
    listed = gw.flask("keys", "list")
    assert listed.returncode == 0 and "\t900000001\t" in listed.stdout
    assert gw.flask("audit").returncode == 0
    up_to = gw.flask("keys", "topup", str(key_id), "99999999")  # exactly to the bound is fine
    assert up_to.returncode == 0 and "1000000000 credits" in up_to.stdout


@pytest.mark.parametrize("args,words", [
    (["--credits", "1e10"], ["No key was created for 'big'", "'1e10' is more than", "give --credits"]),
    (["--credits", "1", "--rpm", "2**66"], ["No key was created", "--rpm '2**66'", "give one in that range"]),
    (["--credits", "1", "--rpd", str(2**66)], ["No key was created", f"--rpd '{2**66}'"]),
    (["--credits", "1", "--rpm", "-1"], ["--rpm '-1' must be a whole number"]),
])
def test_create_with_bad_values_is_one_sentence(make_deployment, args, words):
    gw = make_deployment()
    _one_sentence(gw.flask("keys", "create", "--name", "big", *args), *words)
    conn = sqlite3.connect(gw.db_path)
    assert conn.execute("SELECT COUNT(*) FROM api_keys").fetchone()[0] == 0
    conn.close()


def test_huge_key_id_is_a_usage_error_not_a_traceback(gateway):
    result = gateway.flask("keys", "topup", str(2**70), "1")
    assert result.returncode == 2 and "Traceback" not in result.stderr and "KEY_ID" in result.stderr


@pytest.mark.long(seconds=7)
def test_parallel_creates_all_succeed(make_deployment):
    gw = make_deployment()
    flask = str(Path(sys.executable).with_name("flask"))
    procs = [subprocess.Popen([flask, "--app", "app", "keys", "create", "--name", f"student{i}", "--credits", "2"],
                              cwd=ROOT, env=gw.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(10)]
    results = [(p.wait(timeout=120), *p.communicate()) for p in procs]
    assert [rc for rc, _, _ in results] == [0] * 10, [err for _, _, err in results]
    secrets = {out.strip().splitlines()[-1] for _, out, _ in results}
    assert len(secrets) == 10 and all(s.startswith("sk-") for s in secrets)
    conn = sqlite3.connect(gw.db_path)
    assert conn.execute("SELECT COUNT(*), SUM(balance) FROM api_keys").fetchone() == (10, 20 * 10**9)
    assert conn.execute("SELECT COUNT(*) FROM ledger WHERE kind = 'grant'").fetchone()[0] == 10
    conn.close()
    audit = gw.flask("audit")
    assert audit.returncode == 0 and "10 keys" in audit.stdout


def test_a_lock_held_past_the_wait_says_nothing_was_written(make_deployment, monkeypatch):
    gw = make_deployment()
    key_id, _ = gw.create_key("1")
    holder = sqlite3.connect(gw.db_path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # another writer that never lets go
    try:
        flask = str(Path(sys.executable).with_name("flask"))
        code = ("import db; db.SETUP_WAIT_SECONDS = 0.3; from flask.cli import main; import sys; "
                "sys.argv = ['flask', '--app', 'app', 'keys', 'topup', sys.argv[1], '5']; main()")
        assert Path(flask).exists()
        result = subprocess.run([sys.executable, "-c", code, str(key_id)], cwd=ROOT, env=gw.env,
                                capture_output=True, text=True, timeout=120)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    _one_sentence(result, "stayed locked", "nothing was written", "run the command again")
    assert _state(gw, key_id)[:3] == (10**9, "integer", 1)
