-- The gallery: every image with its recipe, searchable by words (FTS5), by meaning (prompt embeddings)
-- and by likeness (perceptual hash). Plain SQLite only, so `datasette spellbook.db` and the sqlite3 shell
-- open it as is; see docs/gallery.md for why the vectors are BLOBs here and not a vec0 virtual table.

-- AUTOINCREMENT: an id is never reused, so a search index held in memory (store/vectors.py) can never
-- mistake a new image for a deleted one that had the same id.
CREATE TABLE images (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    path            TEXT NOT NULL UNIQUE,                -- relative to SPELLBOOK_HOME: images/YYYY/MM/DD/…png
    sha256          TEXT NOT NULL UNIQUE,                -- of the decoded pixels (provenance.image_sha256)
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
CREATE INDEX images_created ON images(created);
CREATE INDEX images_owner ON images(owner, created);
CREATE INDEX images_public ON images(visibility, created);
CREATE INDEX images_remixed ON images(visibility, remix_count);
CREATE INDEX images_model ON images(model);
CREATE INDEX images_parent ON images(parent_id);
-- The CLI files images without loading the embedding model (it would add seconds to every `generate`);
-- the next search by meaning embeds what this index lists.
CREATE INDEX images_embed_pending ON images(id) WHERE embed_pending = 1;

-- External-content FTS5 kept in step by triggers (as sqlite-utils' enable_fts does). content="images" is
-- written with double quotes because that is the spelling Datasette looks for to offer its search box.
CREATE VIRTUAL TABLE images_fts USING fts5(
    prompt, negative_prompt, content="images", content_rowid="id", tokenize="porter unicode61"
);
CREATE TRIGGER images_fts_insert AFTER INSERT ON images BEGIN
    INSERT INTO images_fts(rowid, prompt, negative_prompt) VALUES (new.id, new.prompt, new.negative_prompt);
END;
CREATE TRIGGER images_fts_delete AFTER DELETE ON images BEGIN
    INSERT INTO images_fts(images_fts, rowid, prompt, negative_prompt)
    VALUES ('delete', old.id, old.prompt, old.negative_prompt);
END;
-- Only a change of the text touches the index: remix counts and visibility change often.
CREATE TRIGGER images_fts_update AFTER UPDATE OF prompt, negative_prompt ON images BEGIN
    INSERT INTO images_fts(images_fts, rowid, prompt, negative_prompt)
    VALUES ('delete', old.id, old.prompt, old.negative_prompt);
    INSERT INTO images_fts(rowid, prompt, negative_prompt) VALUES (new.id, new.prompt, new.negative_prompt);
END;

-- Prompt embeddings. `vector` is the source of truth, in sqlite-vec's own format (little-endian float32,
-- L2-normalised), so with the extension loaded `vec_distance_cosine(vector, ?)` works on it directly.
-- `code` is its sign bits (one bit per dimension), what the in-memory candidate scan reads; the covering
-- index lets that scan read the codes without touching the vectors. Rows have their own AUTOINCREMENT id
-- so that an index can load what is new (id > last seen), including embeddings added after their image.
CREATE TABLE image_embeddings (
    id       INTEGER PRIMARY KEY AUTOINCREMENT,
    image_id INTEGER NOT NULL UNIQUE REFERENCES images(id) ON DELETE CASCADE,
    model    TEXT NOT NULL,
    code     BLOB NOT NULL,
    vector   BLOB NOT NULL
);
CREATE INDEX image_embeddings_codes ON image_embeddings(id, image_id, code);
