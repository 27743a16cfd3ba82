-- The gateway's database. Applied at every start-up, so every statement is idempotent.
-- Money is integer nano-credits (10^-9 credit). Invariant, checked by `flask audit`:
--   api_keys.balance + SUM(open holds) = SUM(ledger.amount)   for every key.
PRAGMA journal_mode = WAL;

CREATE TABLE IF NOT EXISTS api_keys (
    id          INTEGER PRIMARY KEY,
    name        TEXT    NOT NULL,
    key_hash    TEXT    NOT NULL UNIQUE,          -- SHA-256 hex of the full key; the key itself is never stored
    prefix      TEXT    NOT NULL,                 -- first characters, for display only
    balance     INTEGER NOT NULL CHECK (balance >= 0),
    rpm         INTEGER CHECK (rpm IS NULL OR rpm >= 0),   -- NULL: the config default; 0: unlimited
    rpd         INTEGER CHECK (rpd IS NULL OR rpd >= 0),
    created_at  REAL    NOT NULL,
    revoked_at  REAL,
    -- Policies (policies.py); NULL means none. Caps are nano-credits per UTC day / calendar month (UTC).
    allowed_models TEXT,                          -- a JSON array of model ids the key may call
    expires_at  REAL,                             -- unix time after which the key is refused with 401
    daily_cap   INTEGER CHECK (daily_cap IS NULL OR daily_cap >= 0),
    monthly_cap INTEGER CHECK (monthly_cap IS NULL OR monthly_cap >= 0)
);

-- Credits reserved for a request in flight; the row is deleted when the request settles, so this table
-- holds only open holds and stays a page or two. Start-up returns the holds of processes that are gone.
CREATE TABLE IF NOT EXISTS holds (
    id          INTEGER PRIMARY KEY,
    key_id      INTEGER NOT NULL REFERENCES api_keys(id),
    request_id  TEXT    NOT NULL,
    pid         INTEGER NOT NULL,                 -- the worker that owns it; a dead owner's hold is returned
    pid_started INTEGER,                          -- its start time (/proc/<pid>/stat field 22): a reused pid differs
    host        TEXT,                             -- its hostname: holds of another host are never judged by pid
    boot_id     TEXT,                             -- its kernel's boot id: a reboot since means the owner is gone
    amount      INTEGER NOT NULL CHECK (amount >= 0),
    created_at  REAL    NOT NULL
);

-- Every change to what a key owns: grants and top-ups (+), charges and operator corrections (-).
CREATE TABLE IF NOT EXISTS ledger (
    id          INTEGER PRIMARY KEY,
    key_id      INTEGER NOT NULL REFERENCES api_keys(id),
    amount      INTEGER NOT NULL,
    kind        TEXT    NOT NULL CHECK (kind IN ('grant', 'topup', 'charge', 'correction')),
    request_id  TEXT,
    created_at  REAL    NOT NULL,
    reason      TEXT                              -- why an operator corrected the balance
);
-- No index on key_id here: every request inserts into the ledger, and each index would cost it a page write;
-- the audit scans instead. usage has two (below), measured in bench/admin_queries.py.

-- One row per settled request (and per vision-bridge call, linked by parent_request_id).
CREATE TABLE IF NOT EXISTS usage (
    id                INTEGER PRIMARY KEY,
    request_id        TEXT    NOT NULL,
    parent_request_id TEXT,
    key_id            INTEGER NOT NULL REFERENCES api_keys(id),
    route             TEXT    NOT NULL,
    model             TEXT    NOT NULL,
    prompt_tokens     INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0,
    units             REAL    NOT NULL DEFAULT 0,   -- images, or seconds of audio
    estimated         INTEGER NOT NULL DEFAULT 0,   -- 1 when tokens were counted by the gateway, not reported
    cost              INTEGER NOT NULL,             -- nano-credits charged
    uncollected       INTEGER NOT NULL DEFAULT 0,   -- nano-credits owed beyond what the balance held
    status            INTEGER NOT NULL,
    latency_ms        INTEGER NOT NULL,
    created_at        REAL    NOT NULL
);
-- The admin usage listing and the spending caps read one key's rows by time; retention and the unfiltered
-- listing read by time. Each adds a B-tree insert to every settled request (bench/admin_queries.py).
CREATE INDEX IF NOT EXISTS usage_key_time ON usage(key_id, created_at);
CREATE INDEX IF NOT EXISTS usage_time ON usage(created_at);

-- Descriptions of images written by the vision bridge model, per key, by image hash. Per key because a shared
-- cache told a key, through `cached` and a lower charge, that another tenant had sent the same image.
-- Migration: the first version's vision_cache was shared by all keys; its rows name no key, so no key can be
-- given them, and they are dropped (the cost is one bridge call per image sent again).
DROP TABLE IF EXISTS vision_cache;
CREATE TABLE IF NOT EXISTS vision_descriptions (
    key_id      INTEGER NOT NULL,
    image_hash  TEXT    NOT NULL,
    model       TEXT    NOT NULL,
    description TEXT    NOT NULL,
    created_at  REAL    NOT NULL,
    PRIMARY KEY (key_id, image_hash, model)
);

-- Columns added after a release are added to existing databases by db.migrate(); user_version says how far.
