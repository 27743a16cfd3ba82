"""The operator's commands: `flask --app app keys create|list|topup|revoke`, `usage`, `audit`, `init-db`."""
from __future__ import annotations

import contextlib
import functools
import sqlite3
import sys
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any

import click
from flask import Flask, current_app

import billing
import db
import keys
import policies

# Key ids are SQLite integers; a larger number would overflow the query instead of finding no key.
_KEY_ID = click.IntRange(min=1, max=2**63 - 1)


@contextlib.contextmanager
def _refused(what: str) -> Iterator[None]:
    """A change to a key that failed, as one sentence starting with what was not done: an unknown id (with where
    the ids are) or a value the books refuse."""
    try:
        yield
    except LookupError as exc:
        raise click.ClickException(f"{what}: {exc}; `keys list` shows the ids.") from None
    except ValueError as exc:
        raise click.ClickException(f"{what}: {exc}.") from None


def _credits(value: str, what: str, fix: str) -> int:
    try:
        return billing.parse_credits(value)
    except ValueError as exc:
        raise click.ClickException(f"{what}: {exc}; {fix}.") from None


def _limit_option(ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
    """--rpm/--rpd as a whole number from 0 to keys.MAX_LIMIT, or one sentence saying what to give instead."""
    if value is None:
        return None
    text = value.strip()
    if not text.isdigit() or int(text) > keys.MAX_LIMIT:
        raise click.ClickException(f"No key was created: --{param.name} {value!r} must be a whole number from 0 "
                                   f"(unlimited) to {keys.MAX_LIMIT}; give one in that range.")
    return int(text)


def _writes(command: Callable[..., Any]) -> Callable[..., Any]:
    """A database error becomes one sentence saying nothing was written, never a traceback.

    Each command writes in one transaction, so a failure before its COMMIT leaves the database as it was.
    """
    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except db.DatabaseSetupError as exc:
            # A config problem, said as config problems are at start-up (the database is opened on first use).
            click.echo(f"gateway: {exc}", err=True)
            raise SystemExit(2) from None
        except sqlite3.OperationalError as exc:
            if "locked" in str(exc) or "busy" in str(exc):
                raise click.ClickException(
                    f"The database {_db()} stayed locked by another writer for {db.SETUP_WAIT_SECONDS:g} s; "
                    "nothing was written; run the command again.") from None
            raise click.ClickException(f"The database {_db()} refused the command ({exc}); nothing was written.") \
                from None
        except sqlite3.Error as exc:
            raise click.ClickException(f"The database {_db()} refused the command ({exc}); nothing was written.") \
                from None
    return run


def _db() -> str:
    return current_app.config["GATEWAY"].server.database


def _limit(value: int | None, default: int) -> str:
    value = default if value is None else value
    return "unlimited" if value == 0 else str(value)


def _policies(what: str, allowed: str | None, expires: str | None, daily: str | None,
              monthly: str | None) -> dict[str, Any]:
    """The policy flags given, parsed by the functions the admin API uses; an empty value clears a policy."""
    out: dict[str, Any] = {}
    try:
        if allowed is not None:
            out["allowed_models"] = policies.parse_allowed_models(allowed)
        if expires is not None:
            out["expires_at"] = policies.parse_expiry(expires)
        if daily is not None:
            out["daily_cap"] = policies.parse_cap(daily, "--daily-cap")
        if monthly is not None:
            out["monthly_cap"] = policies.parse_cap(monthly, "--monthly-cap")
    except ValueError as exc:
        raise click.ClickException(f"{what}: {exc}.") from None
    return out


def _policy_options(command: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed((
            click.option("--allowed-models", "allowed", default=None,
                         help="Comma-separated model ids the key may call (empty: all)."),
            click.option("--expires", default=None, help="Expiry: ISO 8601 (UTC) or unix time (empty: never)."),
            click.option("--daily-cap", "daily", default=None, help="Credits per UTC day (empty: no cap)."),
            click.option("--monthly-cap", "monthly", default=None, help="Credits per UTC month (empty: no cap)."))):
        command = option(command)
    return command


def register(app: Flask) -> None:
    """Attach the commands to the app's CLI."""
    group = click.Group("keys", help="Create, list, top up and revoke API keys.")

    @group.command("create")
    @click.option("--name", required=True, help="A label for the key's holder.")
    @click.option("--credits", "amount", required=True, help="Opening balance in credits, e.g. 5 or 0.5.")
    @click.option("--rpm", callback=_limit_option, default=None, help="Requests per minute (0: unlimited).")
    @click.option("--rpd", callback=_limit_option, default=None, help="Requests per day (0: unlimited).")
    @_policy_options
    @_writes
    def create(name: str, amount: str, rpm: int | None, rpd: int | None, allowed: str | None,
               expires: str | None, daily: str | None, monthly: str | None) -> None:
        """Create a key. Its secret is printed once, as the last line."""
        nano = _credits(amount, f"No key was created for {name!r}", "give --credits from 0 to "
                        f"{billing.MAX_CREDITS} with at most 9 decimals, such as 5 or 0.5")
        policy = _policies(f"No key was created for {name!r}", allowed, expires, daily, monthly)
        with db.cli_connection(_db()) as conn:
            key_id, secret = keys.create(conn, name, nano, rpm, rpd, **policy)
        click.echo(f"Created key {key_id} ({name}) with {billing.format_credits(nano)} credits. "
                   "Store the key now; it is not shown again:", err=False)
        click.echo(secret)

    @group.command("list")
    @_writes
    def list_keys() -> None:
        """One key per line: id, name, prefix, balance, rpm, rpd, state."""
        cfg = current_app.config["GATEWAY"]
        with db.cli_connection(_db()) as conn:
            for row in keys.list_all(conn):
                state = "revoked" if row["revoked_at"] else "active"
                click.echo(f"{row['id']}\t{row['name']}\t{row['prefix']}...\t{billing.format_credits(row['balance'])}"
                           f"\trpm={_limit(row['rpm'], cfg.limits.default_rpm)}"
                           f"\trpd={_limit(row['rpd'], cfg.limits.default_rpd)}\t{state}")

    @group.command("topup")
    @click.argument("key_id", type=_KEY_ID)
    @click.argument("amount")
    @_writes
    def topup(key_id: int, amount: str) -> None:
        """Add AMOUNT credits to key KEY_ID."""
        nano = _credits(amount, f"Key {key_id} was not topped up", "give an amount from 0 to "
                        f"{billing.MAX_CREDITS} with at most 9 decimals, such as 5 or 0.5")
        with db.cli_connection(_db()) as conn, _refused(f"Key {key_id} was not topped up"):
            balance = keys.topup(conn, key_id, nano)
        click.echo(f"Key {key_id} now has {billing.format_credits(balance)} credits.")

    @group.command("update")
    @click.argument("key_id", type=_KEY_ID)
    @click.option("--name", default=None, help="A new label.")
    @click.option("--rpm", default=None, help="Requests per minute (0: unlimited, empty: the default).")
    @click.option("--rpd", default=None, help="Requests per day (0: unlimited, empty: the default).")
    @_policy_options
    @_writes
    def update(key_id: int, name: str | None, rpm: str | None, rpd: str | None, allowed: str | None,
               expires: str | None, daily: str | None, monthly: str | None) -> None:
        """Change key KEY_ID's name, limits or policies; an empty value clears one."""
        what = f"Key {key_id} was not changed"
        changes: dict[str, Any] = _policies(what, allowed, expires, daily, monthly)
        if name is not None:
            changes["name"] = name
        for flag, value in (("rpm", rpm), ("rpd", rpd)):
            if value is not None:
                text = value.strip()
                if text and (not text.isdigit() or int(text) > keys.MAX_LIMIT):
                    raise click.ClickException(f"{what}: --{flag} {value!r} must be a whole number from 0 "
                                               f"(unlimited) to {keys.MAX_LIMIT}, or empty for the default.")
                changes[flag] = int(text) if text else None
        if not changes:
            raise click.ClickException(f"{what}: give at least one option to change; see --help.")
        with db.cli_connection(_db()) as conn, _refused(what):
            keys.update(conn, key_id, changes)
        click.echo(f"Key {key_id} updated: {', '.join(sorted(changes))}.")

    @group.command("correct")
    @click.argument("key_id", type=_KEY_ID)
    @click.argument("amount")
    @click.option("--reason", required=True, help="Why, written to the ledger with the correction.")
    @_writes
    def correct(key_id: int, amount: str, reason: str) -> None:
        """Take AMOUNT credits back from key KEY_ID, as a ledger correction with a reason."""
        what = f"Key {key_id} was not corrected"
        nano = _credits(amount, what, "give an amount with at most 9 decimals, such as 0.5")
        with db.cli_connection(_db()) as conn, _refused(what):
            balance = billing.correct(conn, key_id, nano, reason)
        click.echo(f"Key {key_id} now has {billing.format_credits(balance)} credits.")

    @group.command("revoke")
    @click.argument("key_id", type=_KEY_ID)
    @_writes
    def revoke(key_id: int) -> None:
        """Revoke key KEY_ID; requests with it are refused from now on."""
        with db.cli_connection(_db()) as conn:
            if not keys.revoke(conn, key_id):
                raise click.ClickException(f"no active key with id {key_id}")
        click.echo(f"Key {key_id} revoked.")

    app.cli.add_command(group)

    @app.cli.command("usage")
    @click.option("--key", "key_id", type=_KEY_ID, default=None, help="Only this key's rows.")
    @click.option("--limit", type=click.IntRange(min=1, max=10**6), default=20, show_default=True)
    @_writes
    def usage(key_id: int | None, limit: int) -> None:
        """Recent usage rows, newest first."""
        where, args = ("WHERE key_id = ?", (key_id, limit)) if key_id is not None else ("", (limit,))
        with db.cli_connection(_db()) as conn:
            rows = conn.execute(f"SELECT * FROM usage {where} ORDER BY id DESC LIMIT ?", args).fetchall()
        click.echo("time\trequest_id\tkey\troute\tmodel\tstatus\tprompt\tcompletion\tunits\tcost\tuncollected")
        for r in rows:
            when = datetime.fromtimestamp(r["created_at"]).strftime("%Y-%m-%d %H:%M:%S")
            click.echo(f"{when}\t{r['request_id']}\t{r['key_id']}\t{r['route']}\t{r['model']}\t{r['status']}\t"
                       f"{r['prompt_tokens']}\t{r['completion_tokens']}\t{r['units']:g}\t"
                       f"{billing.format_credits(r['cost'])}\t{billing.format_credits(r['uncollected'])}")

    @app.cli.command("audit")
    @_writes
    def audit() -> None:
        """Check that every key's balance plus open holds equals the sum of its ledger; exit 1 if not."""
        ttl = current_app.config["GATEWAY"].server.hold_ttl_seconds
        with db.cli_connection(_db()) as conn:
            bad = billing.audit(conn)
            count = conn.execute("SELECT COUNT(*) FROM api_keys").fetchone()[0]
            stale = billing.stale_holds(conn, ttl)
        # Reported, not failed: the books still balance, but a request held this long is stuck or its worker lost.
        for hold_id, key_id, request_id, pid, host, age in stale:
            click.echo(f"hold {hold_id} of key {key_id} ({request_id}, pid {pid} on {host or 'unknown host'}) is "
                       f"{age:.0f} s old, older than hold_ttl_seconds ({ttl:g}); it returns when that worker is gone")
        for key_id, balance, held, ledger in bad:
            click.echo(f"key {key_id}: balance {billing.format_credits(balance)} + held "
                       f"{billing.format_credits(held)} != ledger {billing.format_credits(ledger)}")
        if bad:
            click.echo(f"audit FAILED for {len(bad)} of {count} keys")
            sys.exit(1)
        click.echo(f"audit OK: {count} keys, every balance plus open holds equals its ledger")

    @app.cli.command("init-db")
    @_writes
    def init_db() -> None:
        """Create the database and apply schema.sql (idempotent)."""
        db.init(_db())
        with db.cli_connection(_db()) as conn:
            count = conn.execute("SELECT COUNT(*) FROM api_keys WHERE revoked_at IS NULL").fetchone()[0]
        click.echo(f"Database ready at {_db()} ({count} active keys).")
        if count == 0:
            click.echo("No key yet: create one with  make key NAME=me CREDITS=5  "
                       "(or .venv/bin/flask --app app keys create --name me --credits 5)")
