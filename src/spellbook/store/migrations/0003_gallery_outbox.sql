-- The gallery outbox: a job is done as soon as its PNGs are durable; filing them in the gallery (rows, FTS,
-- embeddings) happens after, from this table, retried until it succeeds. Written in the same transaction
-- that marks the job done, so no finished job's images are ever left unfiled, and a filing failure never
-- re-runs the job.
CREATE TABLE gallery_outbox (
    job_id      TEXT PRIMARY KEY REFERENCES jobs(id) ON DELETE CASCADE,
    created     REAL NOT NULL,                   -- unix time the job completed
    attempts    INTEGER NOT NULL DEFAULT 0,      -- filing attempts that failed
    next_try    REAL NOT NULL,                   -- unix time of the next attempt (backs off after failures)
    last_error  TEXT                             -- the last failure, for operators
);
CREATE INDEX gallery_outbox_due ON gallery_outbox(next_try);

-- Server options that clients change over the API (A1111's POST /sdapi/v1/options: the default model), kept
-- so a restart does not forget them.
CREATE TABLE server_options (
    name   TEXT PRIMARY KEY,
    value  TEXT NOT NULL                         -- JSON
);
