-- X/Y/Z plots submitted over the API (POST /api/v1/grids): the grid's axes, and its cells in order, each one a
-- job in the jobs table. A grid has no state of its own: its state, progress and images are its cells' jobs', so
-- a restart loses nothing and nothing can disagree. Rows are written in the transaction that queues and pays
-- every cell (all or nothing).
CREATE TABLE grids (
    id                  TEXT PRIMARY KEY,                -- uuid4 hex
    owner               INTEGER REFERENCES users(id),    -- NULL: the local user (auth off)
    axes                TEXT NOT NULL,                   -- JSON {"x": {"name", "field", "values"} | null, "y": …, "z": …}
    created             REAL NOT NULL,                   -- unix time
    idempotency_key     TEXT,                            -- the Idempotency-Key header it was submitted with
    idempotency_request TEXT                             -- sha256 of the request body that came with the key
);
CREATE INDEX grids_owner ON grids(owner, created);
-- As jobs_idempotency: a key is one owner's, NULL (the local user) counting as one owner.
CREATE UNIQUE INDEX grids_idempotency ON grids(IFNULL(owner, 0), idempotency_key) WHERE idempotency_key IS NOT NULL;

CREATE TABLE grid_cells (
    grid_id   TEXT NOT NULL REFERENCES grids(id) ON DELETE CASCADE,
    position  INTEGER NOT NULL,                          -- 0.. in plan order: x fastest, then y, then z
    x         INTEGER NOT NULL,                          -- indexes into the axes' values (0 on a missing axis)
    y         INTEGER NOT NULL,
    z         INTEGER NOT NULL,
    job_id    TEXT NOT NULL UNIQUE REFERENCES jobs(id),
    PRIMARY KEY (grid_id, position)
);
