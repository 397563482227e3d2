"""Keeping images: add (from the studio or a file), import a folder, show, remix, remove, publish, feed, export.

Files live under SPELLBOOK_HOME/images/YYYY/MM/DD/, copied byte for byte (their recipe chunks included);
the row keeps the path relative to the home, so a home can be moved. One picture is kept once per owner: the
sha256 of its decoded pixels is unique for each owner, and adding it again returns the row that owner has.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import zipfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

from spellbook.errors import NotFound, Refused, UserError
from spellbook.gallery.records import (
    IMAGE_COLUMNS,
    GalleryImage,
    ImageDetails,
    ImportReport,
    Remix,
    recipe_of_row,
)
from spellbook.gallery.search import MAX_LIMIT, home_of, search, visible_sql
from spellbook.settings import Settings
from spellbook.store.db import Database

if TYPE_CHECKING:
    from spellbook.provenance import Result
    from spellbook.queue.jobs import Job
    from spellbook.recipe import Recipe

VISIBILITIES = ("private", "public")
# One picture is kept once per owner (`owner IS ?` matches NULL, the local user, too): two users who make the
# same pixels each get their own row, and neither learns from an id that the other made it.
_SAME_PICTURE = "SELECT id FROM images WHERE sha256 = ? AND owner IS ?"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
_EMBED_BATCH = 64


@dataclass
class _Pending:
    """An image read and described, not yet stored."""

    source_file: Path
    image: Image.Image
    sha256: str
    source: str
    recipe: dict[str, Any]
    prompt: str
    negative_prompt: str
    model: str | None
    sampler: str | None
    seed: int | None
    guidance: float | None
    steps: int | None
    parent_sha256: str | None = None


def _from_recipe(source_file: Path, image: Image.Image, recipe: Recipe, sha256: str = "") -> _Pending:
    from spellbook.provenance import image_sha256

    return _Pending(
        source_file=source_file,
        image=image,
        sha256=sha256 or image_sha256(image),
        source="spellbook",
        recipe=recipe.to_dict(),
        prompt=recipe.prompt,
        negative_prompt=recipe.negative_prompt,
        model=recipe.model.name,
        sampler=recipe.sampler,
        seed=recipe.image_seed,
        guidance=recipe.guidance,
        steps=recipe.steps,
        parent_sha256=recipe.init_image.sha256 if recipe.init_image else None,
    )


def _read_file(path: Path) -> _Pending:
    """Any image file: ours, A1111's, ComfyUI's (recipe from their metadata), or one with none at all."""
    from spellbook.provenance import image_sha256, open_image, read_metadata, request_fields, request_from_foreign

    image = open_image(path, "image")
    meta = read_metadata(path)
    if meta.recipe is not None:
        return _from_recipe(path, image, meta.recipe)
    found = meta.foreign or {}
    model = found.get("model")
    if model and meta.source == "comfyui":
        model = Path(str(model)).stem  # ComfyUI records the checkpoint's file name
    request = request_fields(request_from_foreign(found, str(model) if model else None)) if found else {}
    return _Pending(
        source_file=path,
        image=image,
        sha256=image_sha256(image),
        source=meta.source if meta.source in ("a1111", "comfyui") else "none",
        recipe=request,
        prompt=found.get("prompt", "") or "",
        negative_prompt=found.get("negative_prompt", "") or "",
        model=str(model) if model else None,
        sampler=found.get("sampler"),
        seed=found.get("seed"),
        guidance=found.get("cfg_scale"),
        steps=found.get("steps"),
    )


def _in_images_folder(path: Path, home: Path) -> Path | None:
    """`path` when it already lies in the home's images folder (a server job wrote it there): kept in place."""
    try:
        path.resolve().relative_to(Settings(home=home).images_dir.resolve())
    except ValueError:
        return None
    return path


def _store(
    db: Database,
    pending: list[_Pending],
    *,
    home: Path,
    owner: int | None,
    visibility: str,
    job_id: str | None = None,
    embed: bool = True,
) -> list[tuple[GalleryImage, bool]]:
    """Copy the files in and record them (one transaction); returns (image, newly added) for each."""
    from spellbook.gallery.likeness import phash
    from spellbook.store.vectors import sign_code, to_blob

    if visibility not in VISIBILITIES:
        raise UserError(f"visibility must be one of {', '.join(VISIBILITIES)}, got {visibility!r}", field="visibility")
    existing = {p.sha256: row[0] for p in pending if (row := db.execute(_SAME_PICTURE, (p.sha256, owner)).fetchone())}
    first_of: dict[str, _Pending] = {}
    for p in pending:
        if p.sha256 not in existing:
            first_of.setdefault(p.sha256, p)
    new = list(first_of.values())
    vectors: dict[str, Any] = {}
    if embed:
        from spellbook.gallery.embed import MODEL_NAME
        from spellbook.gallery.embed import embed as embed_texts

        texts = [p for p in new if p.prompt.strip()]
        for start in range(0, len(texts), _EMBED_BATCH):
            batch = texts[start : start + _EMBED_BATCH]
            for p, vector in zip(batch, embed_texts([p.prompt for p in batch]), strict=True):
                vectors[p.sha256] = vector
    now = datetime.now(UTC)
    settings = Settings(home=home)
    written: list[Path] = []
    ids: dict[str, int] = dict(existing)
    try:
        with db.transaction() as conn:
            for p in new:
                # Another writer may have filed the same picture since the check above.
                row = conn.execute(_SAME_PICTURE, (p.sha256, owner)).fetchone()
                if row is not None:
                    ids[p.sha256] = row[0]
                    first_of.pop(p.sha256)
                    continue
                target = _in_images_folder(p.source_file, home)
                if target is None:
                    suffix = p.source_file.suffix.lower()
                    suffix = suffix if suffix in IMAGE_SUFFIXES else ".png"
                    mine = "" if owner is None else f"-u{owner}"  # two owners' copies of one file
                    target = settings.image_path(
                        f"{p.seed if p.seed is not None else 'x'}-{p.sha256[:16]}{mine}{suffix}", now
                    )
                    _link_or_copy(p.source_file, target)
                    written.append(target)
                parent = None
                if p.parent_sha256:
                    row = conn.execute(_SAME_PICTURE, (p.parent_sha256, owner)).fetchone()
                    parent = row[0] if row else None
                cursor = conn.execute(
                    "INSERT INTO images (path, sha256, recipe, prompt, negative_prompt, model, sampler, seed, "
                    "width, height, guidance, steps, owner, visibility, created, parent_id, source, phash, job_id, "
                    "embed_pending) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        target.resolve().relative_to(home.resolve()).as_posix(),
                        p.sha256,
                        json.dumps(p.recipe, ensure_ascii=False),
                        p.prompt,
                        p.negative_prompt,
                        p.model,
                        p.sampler,
                        p.seed,
                        p.image.width,
                        p.image.height,
                        p.guidance,
                        p.steps,
                        owner,
                        visibility,
                        now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z",
                        parent,
                        p.source,
                        phash(p.image),
                        job_id,
                        int(bool(p.prompt.strip()) and p.sha256 not in vectors),
                    ),
                )
                ids[p.sha256] = cursor.lastrowid
                if p.sha256 in vectors:
                    vector = vectors[p.sha256]
                    conn.execute(
                        "INSERT INTO image_embeddings (image_id, model, code, vector) VALUES (?, ?, ?, ?)",
                        (cursor.lastrowid, MODEL_NAME, sign_code(vector).tobytes(), to_blob(vector)),
                    )
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    return [(_get(db, ids[p.sha256], None, home), first_of.get(p.sha256) is p) for p in pending]


def _link_or_copy(source: Path, target: Path) -> None:
    """The same bytes under the images folder: a hard link where the file system allows, else one copy."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError:  # another file system, or links not allowed
        shutil.copyfile(source, tmp)
    tmp.replace(target)


def file_results(
    db: Database,
    results: list[Result],
    *,
    visibility: str = "private",
    embed: bool = True,
    home: Path | None = None,
) -> list[GalleryImage]:
    """File written results (provenance.write_result gave them a path and pixel hash) as they are handed over:
    pixels and recipe in hand, nothing decoded again. Owner and job come with each result. A file outside the
    home's images folder (the CLI's --out) is linked in, not encoded again."""
    home = home or home_of(db)
    images: list[GalleryImage] = []
    for (owner, job_id), group in _by_owner_and_job(results).items():
        pending = []
        for result in group:
            if result.path is None:
                raise UserError("write the image first (provenance.write_result); the gallery files it", field="image")
            pending.append(_from_recipe(Path(result.path), result.image, result.recipe, result.sha256))
        stored = _store(db, pending, home=home, owner=owner, visibility=visibility, job_id=job_id, embed=embed)
        images += [image for image, _ in stored]
    return images


def _by_owner_and_job(results: list[Result]) -> dict[tuple[int | None, str | None], list[Result]]:
    groups: dict[tuple[int | None, str | None], list[Result]] = {}
    for result in results:
        groups.setdefault((result.owner, result.job_id), []).append(result)
    return groups


def file_job_images(db: Database, settings: Settings, job: Job) -> list[GalleryImage]:
    """A finished job's images (under images/YYYY/MM/DD, as its result records them) joined to the gallery in
    place, owned by the job's owner, private: how the outbox recovers what was not handed over in memory
    (after a restart, or for PNGs a remote worker sent)."""
    home = settings.home
    pending = [_read_file(home / record["path"]) for record in (job.result or {}).get("images", [])]
    stored = _store(db, pending, home=home, owner=job.owner, visibility="private", job_id=job.id)
    return [image for image, _ in stored]


def add_image(
    db: Database,
    path: Path | str,
    *,
    owner: int | None = None,
    visibility: str = "private",
    job_id: str | None = None,
    embed: bool = True,
    home: Path | None = None,
) -> GalleryImage:
    """File any image (ours, A1111's, ComfyUI's or one without metadata) in the gallery."""
    home = home or home_of(db)
    pending = _read_file(Path(path))
    return _store(db, [pending], home=home, owner=owner, visibility=visibility, job_id=job_id, embed=embed)[0][0]


def import_folder(
    db: Database,
    folder: Path | str,
    *,
    owner: int | None = None,
    visibility: str = "private",
    embed: bool = True,
    home: Path | None = None,
    progress=None,
) -> ImportReport:
    """Import every image under `folder` (recursively): recipes from Spellbook, A1111 and ComfyUI metadata.

    Files without metadata are imported with an empty recipe and listed in `without_metadata`; files that
    are not images are listed in `failed`; pictures the gallery already holds in `duplicates`.
    `progress(done, total)` is called as files are read.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder", field="folder")
    home = home or home_of(db)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    report = ImportReport()
    for start in range(0, len(files), _EMBED_BATCH):
        pending = []
        for path in files[start : start + _EMBED_BATCH]:
            try:
                pending.append(_read_file(path))
            except UserError as exc:
                report.failed.append((str(path), exc.message))
        for p, (image, added) in zip(
            pending, _store(db, pending, home=home, owner=owner, visibility=visibility, embed=embed), strict=True
        ):
            if not added:
                report.duplicates.append(str(p.source_file))
                continue
            report.imported.append(image)
            if p.source == "none":
                report.without_metadata.append(str(p.source_file))
        if progress:
            progress(min(start + _EMBED_BATCH, len(files)), len(files))
    return report


# ------------------------------------------------------------------------------------------------ reading
def _get(db: Database, image_id: int, viewer: int | None, home: Path) -> GalleryImage:
    where, params = visible_sql(viewer)
    row = db.execute(f"SELECT {IMAGE_COLUMNS} FROM images i WHERE i.id = ? AND {where}", [image_id, *params]).fetchone()
    if row is None:
        # The same answer for "absent" and "another user's private image": existence is not revealed.
        raise NotFound(f"no image {image_id} in the gallery", field="image")
    return GalleryImage.from_row(row, home)


def get_image(db: Database, image_id: int, *, viewer: int | None = None, home: Path | None = None) -> GalleryImage:
    return _get(db, int(image_id), viewer, home or home_of(db))


def show(db: Database, image_id: int, *, viewer: int | None = None, home: Path | None = None) -> ImageDetails:
    """The image, its recipe as stored, and its parent (the init image) when the viewer may see it."""
    home = home or home_of(db)
    image = _get(db, int(image_id), viewer, home)
    recipe = recipe_of_row(db.execute("SELECT recipe FROM images WHERE id = ?", (image.id,)).fetchone())
    parent = None
    if image.parent_id is not None:
        try:
            parent = _get(db, image.parent_id, viewer, home)
        except NotFound:
            parent = None
    return ImageDetails(image, recipe, parent)


def remix(db: Database, image_id: int, *, viewer: int | None = None, home: Path | None = None) -> Remix:
    """The image's recipe as an editable request and a command line; counts towards "most remixed"."""
    from spellbook.settings import Settings

    home = home or home_of(db)
    details = show(db, image_id, viewer=viewer, home=home)
    recipe = details.recipe
    if not recipe:
        raise UserError(f"image {details.image.id} has no recipe to remix (it was imported without one)", field="image")
    if recipe.get("kind") == "blend":
        raise UserError(
            f"image {details.image.id} is a blend: it has no form to edit; blend its two pictures again (Blend on "
            "each, or `spellbook blend A.png B.png --t T`), or `spellbook reproduce` it",
            field="image",
        )
    request: dict[str, Any] = {"prompt": recipe.get("prompt", details.image.prompt)}
    if recipe.get("negative_prompt"):
        request["negative_prompt"] = recipe["negative_prompt"]
    model = recipe.get("model")
    if isinstance(model, dict):
        model = model.get("name")
    if model:
        request["model"] = model
    for key in ("sampler", "schedule", "steps", "guidance"):
        if recipe.get(key) is not None:
            request[key] = recipe[key]
    # One image's own seed: the batch it came from is not needed to draw it again.
    seed = recipe.get("seed")
    if seed is not None:
        request["seed"] = seed + int(recipe.get("batch_index", 0))
    if recipe.get("width") and recipe.get("height"):
        request["size"] = f"{recipe['width']}x{recipe['height']}"
    if recipe.get("clip_skip", 1) > 1:
        request["clip_skip"] = recipe["clip_skip"]
    if isinstance(recipe.get("vae"), dict):
        request["vae"] = recipe["vae"]["name"]
    if recipe.get("subseed_strength"):
        request["subseed"] = int(recipe.get("subseed", 0)) + int(recipe.get("batch_index", 0))
        request["subseed_strength"] = recipe["subseed_strength"]
    if recipe.get("seed_resize_from_w"):
        request["seed_resize_from_w"] = recipe["seed_resize_from_w"]
        request["seed_resize_from_h"] = recipe["seed_resize_from_h"]
    hires = recipe.get("hires")
    if isinstance(hires, dict):  # the factor when one was asked for (it sizes the pass as it did), else the size
        drop = ("width", "height") if hires.get("scale") is not None else ("scale",)
        request["hires"] = {k: v for k, v in hires.items() if k not in drop}
    kind = recipe.get("kind", "txt2img")
    inputs = Settings(home=home).inputs_dir
    words = ["spellbook", "generate" if kind == "txt2img" else kind]
    if kind in ("img2img", "inpaint"):
        request["kind"] = kind
        words.append(str(inputs / f"{recipe['init_image']['sha256']}.png"))
        if kind == "inpaint":
            words.append(str(inputs / f"{recipe['mask']['sha256']}.png"))
        if recipe.get("strength") is not None:
            request["strength"] = recipe["strength"]
    words.append(request["prompt"])
    flags = {
        "negative_prompt": "--negative",
        "model": "--model",
        "sampler": "--sampler",
        "schedule": "--schedule",
        "steps": "--steps",
        "guidance": "--cfg",
        "seed": "--seed",
        "size": "--size",
        "clip_skip": "--clip-skip",
        "vae": "--vae",
        "strength": "--strength",
    }
    if "subseed" in request:
        flags.update(subseed="--variation-seed", subseed_strength="--variation-strength")
    if "seed_resize_from_w" in request:
        words += ["--seed-resize-from", f"{request['seed_resize_from_w']}x{request['seed_resize_from_h']}"]
    hires = request.get("hires", {})
    if "width" in hires:
        hires = {**hires, "size": f"{hires['width']}x{hires['height']}"}
    hires_flags = {"scale": "--hires-scale", "size": "--hires-size", "steps": "--hires-steps",
                   "denoise": "--hires-denoise", "upscaler": "--hires-upscaler", "prompt": "--hires-prompt",
                   "negative_prompt": "--hires-negative"}  # fmt: skip
    for source, table in ((request, flags), (hires, hires_flags)):
        for key, flag in table.items():
            if key in source:
                value = source[key]
                words += [flag, f"{value:g}" if isinstance(value, float) else str(value)]
    with db.transaction() as conn:
        conn.execute("UPDATE images SET remix_count = remix_count + 1 WHERE id = ?", (details.image.id,))
    return Remix(details.image.id, request, shlex.join(words))


# ----------------------------------------------------------------------------------------------- changing
def _owned(db: Database, image_id: int, viewer: int | None, home: Path, action: str) -> GalleryImage:
    image = _get(db, int(image_id), viewer, home)
    if viewer is not None and image.owner != viewer:
        raise Refused(f"image {image.id} is not yours to {action}", field="image")
    return image


def remove(db: Database, image_id: int, *, viewer: int | None = None, home: Path | None = None) -> GalleryImage:
    """Delete the row (and its embedding) and the file. A user may remove only their own images."""
    home = home or home_of(db)
    image = _owned(db, image_id, viewer, home, "remove")
    with db.transaction() as conn:
        conn.execute("DELETE FROM images WHERE id = ?", (image.id,))
    Path(image.path).unlink(missing_ok=True)
    return image


def set_visibility(
    db: Database, image_id: int, visibility: str, *, viewer: int | None = None, home: Path | None = None
) -> GalleryImage:
    if visibility not in VISIBILITIES:
        raise UserError(f"visibility must be one of {', '.join(VISIBILITIES)}, got {visibility!r}", field="visibility")
    home = home or home_of(db)
    image = _owned(db, image_id, viewer, home, "publish or hide")
    with db.transaction() as conn:
        conn.execute("UPDATE images SET visibility = ? WHERE id = ?", (visibility, image.id))
    return _get(db, image.id, viewer, home)


def feed(
    db: Database, *, order: str = "newest", limit: int = 20, offset: int = 0, home: Path | None = None
) -> list[GalleryImage]:
    """Public images, newest first or most remixed first. Private images never appear, whoever asks."""
    orders = {"newest": "i.created DESC, i.id DESC", "remixed": "i.remix_count DESC, i.created DESC, i.id DESC"}
    if order not in orders:
        raise UserError(f"unknown feed order {order!r}; orders are {', '.join(orders)}", field="order")
    if not 1 <= limit <= MAX_LIMIT:
        raise UserError(f"limit must be between 1 and {MAX_LIMIT}, got {limit}", field="limit")
    home = home or home_of(db)
    rows = db.execute(
        f"SELECT {IMAGE_COLUMNS} FROM images i WHERE i.visibility = 'public' ORDER BY {orders[order]} LIMIT ? OFFSET ?",
        (limit, max(0, offset)),
    ).fetchall()
    return [GalleryImage.from_row(row, home) for row in rows]


def newest(db: Database, *, viewer: int | None = None, limit: int = 20, home: Path | None = None) -> list[GalleryImage]:
    """What the viewer may see, newest first (the gallery with no query)."""
    home = home or home_of(db)
    where, params = visible_sql(viewer)
    rows = db.execute(
        f"SELECT {IMAGE_COLUMNS} FROM images i WHERE {where} ORDER BY i.created DESC, i.id DESC LIMIT ?",
        [*params, limit],
    ).fetchall()
    return [GalleryImage.from_row(row, home) for row in rows]


def export(
    db: Database,
    query: str,
    out: Path | str,
    *,
    viewer: int | None = None,
    mode: str = "words",
    limit: int = MAX_LIMIT,
    home: Path | None = None,
) -> list[GalleryImage]:
    """Write the images a search finds (all the viewer may see, newest first, for an empty query or "*") to a
    zip: images/<id>-<name> and manifest.json (each image's record and recipe). Returns what was written.

    Words mode by default: an export is a set (the images whose prompts hold the words), where meaning and
    hybrid rank every image and would pad the set with the nearest unrelated ones.
    """
    home = home or home_of(db)
    out = Path(out)
    if out.suffix.lower() != ".zip":
        raise UserError(f"{out} should end in .zip", field="out")
    if query.strip() in ("", "*"):
        images = newest(db, viewer=viewer, limit=limit, home=home)
    else:
        images = search(db, query, mode=mode, viewer=viewer, limit=limit)
    out.parent.mkdir(parents=True, exist_ok=True)
    manifest: dict[str, Any] = {
        "query": query,
        "exported": datetime.now(UTC).isoformat(timespec="seconds"),
        "images": [],
        "missing": [],
    }
    written = []
    tmp = out.with_name(out.name + ".tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as archive:  # PNGs are compressed already
        for image in images:
            if not Path(image.path).is_file():
                manifest["missing"].append(image.src)
                continue
            name = f"images/{image.id}-{Path(image.path).name}"
            archive.write(image.path, name)
            recipe = recipe_of_row(db.execute("SELECT recipe FROM images WHERE id = ?", (image.id,)).fetchone())
            manifest["images"].append({**image.to_dict(), "file": name, "recipe": recipe})
            written.append(image)
        archive.writestr("manifest.json", json.dumps(manifest, ensure_ascii=False, indent=2))
    tmp.replace(out)
    return written
