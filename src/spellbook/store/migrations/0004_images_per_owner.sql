-- One picture is kept once per owner, not once for everyone: two users who make the same pixels (same prompt,
-- seed and model) each get their own row, so neither's gallery misses it and an id never tells one user that
-- another made it. SQLite cannot drop a UNIQUE constraint in place, so the table is rebuilt as SQLite's
-- ALTER TABLE documentation describes (foreign keys are off while a migration runs and checked before it
-- commits; ids, and with them the FTS rows and embeddings, are kept).
CREATE TABLE images_new (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    path            TEXT NOT NULL UNIQUE,                -- relative to SPELLBOOK_HOME: images/YYYY/MM/DD/…png
    sha256          TEXT NOT NULL,                       -- of the decoded pixels; unique per owner (index below)
    recipe          TEXT NOT NULL DEFAULT '{}',          -- JSON: our full recipe, or what A1111/ComfyUI recorded
    prompt          TEXT NOT NULL DEFAULT '',
    negative_prompt TEXT NOT NULL DEFAULT '',
    model           TEXT,
    sampler         TEXT,
    seed            INTEGER,
    width           INTEGER NOT NULL,                    -- of the image file, whatever the recipe asked
    height          INTEGER NOT NULL,
    guidance        REAL,
    steps           INTEGER,
    owner           INTEGER REFERENCES users(id),         -- NULL: the local user (CLI, auth off)
    visibility      TEXT NOT NULL DEFAULT 'private' CHECK (visibility IN ('private', 'public')),
    created         TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    parent_id       INTEGER REFERENCES images(id) ON DELETE SET NULL,  -- the init image of img2img/inpaint
    source          TEXT NOT NULL DEFAULT 'spellbook' CHECK (source IN ('spellbook', 'a1111', 'comfyui', 'none')),
    phash           TEXT,                                -- 64-bit DCT perceptual hash, 16 hex digits
    remix_count     INTEGER NOT NULL DEFAULT 0,
    job_id          TEXT,                                -- the queue job that made it, when one did
    embed_pending   INTEGER NOT NULL DEFAULT 0           -- 1: has a prompt but no embedding yet
);
INSERT INTO images_new (id, path, sha256, recipe, prompt, negative_prompt, model, sampler, seed, width, height,
                        guidance, steps, owner, visibility, created, parent_id, source, phash, remix_count, job_id,
                        embed_pending)
SELECT id, path, sha256, recipe, prompt, negative_prompt, model, sampler, seed, width, height, guidance, steps,
       owner, visibility, created, parent_id, source, phash, remix_count, job_id, embed_pending
FROM images;
-- AUTOINCREMENT's high-water mark travels too: an id is never reused, even one deleted before this migration.
INSERT INTO sqlite_sequence (name, seq) SELECT 'images_new', seq FROM sqlite_sequence WHERE name = 'images'
    AND NOT EXISTS (SELECT 1 FROM sqlite_sequence WHERE name = 'images_new');
UPDATE sqlite_sequence SET seq = MAX(seq, IFNULL((SELECT seq FROM sqlite_sequence WHERE name = 'images'), 0))
    WHERE name = 'images_new';
DROP TABLE images;
ALTER TABLE images_new RENAME TO images;

-- NULL (the local user) is one owner: IFNULL makes it compare equal to itself.
CREATE UNIQUE INDEX images_owner_pixels ON images(IFNULL(owner, 0), sha256);
CREATE INDEX images_sha256 ON images(sha256);
CREATE INDEX images_created ON images(created);
CREATE INDEX images_owner ON images(owner, created);
CREATE INDEX images_public ON images(visibility, created);
CREATE INDEX images_remixed ON images(visibility, remix_count);
CREATE INDEX images_model ON images(model);
CREATE INDEX images_parent ON images(parent_id);
CREATE INDEX images_embed_pending ON images(id) WHERE embed_pending = 1;

CREATE TRIGGER images_fts_insert AFTER INSERT ON images BEGIN
    INSERT INTO images_fts(rowid, prompt, negative_prompt) VALUES (new.id, new.prompt, new.negative_prompt);
END;
CREATE TRIGGER images_fts_delete AFTER DELETE ON images BEGIN
    INSERT INTO images_fts(images_fts, rowid, prompt, negative_prompt)
    VALUES ('delete', old.id, old.prompt, old.negative_prompt);
END;
CREATE TRIGGER images_fts_update AFTER UPDATE OF prompt, negative_prompt ON images BEGIN
    INSERT INTO images_fts(images_fts, rowid, prompt, negative_prompt)
    VALUES ('delete', old.id, old.prompt, old.negative_prompt);
    INSERT INTO images_fts(rowid, prompt, negative_prompt) VALUES (new.id, new.prompt, new.negative_prompt);
END;
