-- Accounts, API tokens, the credits ledger and the job queue (embedded mode's queue, and the server's
-- record of every job in scale-out mode).

CREATE TABLE users (
    id            INTEGER PRIMARY KEY,
    name          TEXT NOT NULL UNIQUE,
    role          TEXT NOT NULL DEFAULT 'user' CHECK (role IN ('admin', 'user')),
    password_hash TEXT,                                  -- scrypt, "scrypt$n$r$p$salt$hash"; NULL = tokens only
    balance       INTEGER NOT NULL DEFAULT 0 CHECK (balance >= 0),  -- = SUM(ledger.delta), kept in step
    created       TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);

CREATE TABLE tokens (
    id         INTEGER PRIMARY KEY,
    user_id    INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    name       TEXT NOT NULL DEFAULT '',
    prefix     TEXT NOT NULL,                            -- first characters, to tell tokens apart in lists
    hash       TEXT NOT NULL UNIQUE,                     -- sha256 hex of the token; the token itself is never stored
    created    TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    last_used  TEXT,
    revoked    INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX tokens_user ON tokens(user_id);

-- Every change of a balance is a row; users.balance is their sum, updated in the same transaction.
CREATE TABLE ledger (
    id       INTEGER PRIMARY KEY,
    user_id  INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    delta    INTEGER NOT NULL,
    reason   TEXT NOT NULL CHECK (reason IN ('grant', 'debit', 'refund', 'adjust')),
    job_id   TEXT,
    note     TEXT NOT NULL DEFAULT '',
    created  TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);
CREATE INDEX ledger_user ON ledger(user_id, id);
-- A job is debited once and refunded at most once, whatever retries happen.
CREATE UNIQUE INDEX ledger_job_once ON ledger(job_id, reason) WHERE job_id IS NOT NULL;

CREATE TABLE jobs (
    id             TEXT PRIMARY KEY,                     -- uuid4 hex
    owner          INTEGER REFERENCES users(id),         -- NULL: the local user (auth off)
    kind           TEXT NOT NULL,                        -- txt2img | img2img | inpaint | ...
    request        TEXT NOT NULL,                        -- the validated recipe JSON (plus inputs by hash)
    cost           INTEGER NOT NULL DEFAULT 0,
    state          TEXT NOT NULL DEFAULT 'queued'
                   CHECK (state IN ('queued', 'running', 'done', 'failed', 'cancelled')),
    batch_key      TEXT NOT NULL DEFAULT '',             -- jobs with the same key can share a forward pass
    created        REAL NOT NULL,                        -- unix time
    started        REAL,
    finished       REAL,
    lease_owner    TEXT,                                 -- worker id holding the running job
    lease_expires  REAL,                                 -- a running job whose lease expired is queued again
    attempts       INTEGER NOT NULL DEFAULT 0,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    progress       REAL NOT NULL DEFAULT 0,              -- 0..1
    error          TEXT,                                 -- JSON {"code", "message", "field"} when failed
    result         TEXT                                  -- JSON: images (ids, paths, seeds) when done
);
CREATE INDEX jobs_queue ON jobs(state, created);
CREATE INDEX jobs_owner ON jobs(owner, created);
