"""Provenance: every PNG carries its recipe; `reproduce` re-runs it and `verify` checks it bit for bit.

Two text chunks: `parameters` (A1111 infotext, readable by the community's tools) and `spellbook` (the
full recipe as JSON, including the build that ran it). Reading also accepts A1111's and ComfyUI's
metadata, so any image with a recipe can be inspected or re-run.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import threading
import warnings
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from spellbook.errors import UserError
from spellbook.infotext import format_infotext, read_foreign_recipe, read_png_text, write_png_text
from spellbook.recipe import Build, ImageRequest, Recipe

RECIPE_CHUNK = "spellbook"
INFOTEXT_CHUNK = "parameters"


def infotext_params(recipe: Recipe) -> dict[str, object]:
    """The `Key: value` line, in A1111's order and spelling."""
    params: dict[str, object] = {
        "Steps": recipe.steps,
        "Sampler": recipe.sampler,
        "Schedule type": recipe.schedule,
        "CFG scale": f"{recipe.guidance:g}",
        "Seed": recipe.image_seed,
        "Size": f"{recipe.width}x{recipe.height}",
        "Model hash": recipe.model.short_hash or None,
        "Model": recipe.model.name,
        "VAE hash": recipe.vae.short_hash if recipe.vae else None,
        "VAE": recipe.vae.name if recipe.vae else None,
        "Variation seed": recipe.image_subseed if recipe.subseed_strength else None,
        "Variation seed strength": f"{recipe.subseed_strength:g}" if recipe.subseed_strength else None,
        "Seed resize from": (
            f"{recipe.seed_resize_from_w}x{recipe.seed_resize_from_h}" if recipe.seed_resize_from_w else None
        ),
        "Denoising strength": f"{recipe.strength:g}" if recipe.strength is not None else None,
        **hires_params(recipe),
        **blend_params(recipe),
        "Clip skip": recipe.clip_skip if recipe.clip_skip > 1 else None,
        "TI hashes": ", ".join(f"{c.name}: {c.short_hash}" for c in recipe.concepts) or None,
        # A1111's record of the styles applied (the prompts above are already expanded).
        "Styles array": json.dumps(list(recipe.styles), ensure_ascii=False) if recipe.styles else None,
        "Version": f"spellbook {recipe.build.spellbook}" if recipe.build else None,
    }
    return params


def blend_params(recipe: Recipe) -> dict[str, object]:
    """A blend in infotext keys of its own (A1111 has none): where between the pictures, and picture B's prompt and
    seed (the line's prompt and Seed are A's). Read back alone they are refused by name: the spellbook chunk
    holds both recipes."""
    blend = recipe.blend
    if blend is None:
        return {}
    if blend.by_pictures:  # the line is the img2img run; picture B by its pixels' hash
        return {"Blend": f"{blend.t:g}", "Blend picture": blend.b_sha256[:10]}
    a, b = blend.a, blend.b
    return {
        "Blend": f"{blend.t:g}",
        "Blend prompt": b.prompt if b.prompt != a.prompt else None,
        "Blend negative prompt": b.negative_prompt if b.negative_prompt != a.negative_prompt else None,
        "Blend seed": b.image_seed,
    }


def hires_params(recipe: Recipe) -> dict[str, object]:
    """A hires fix in A1111's keys: its denoise is the image's `Denoising strength`; `Hires upscale` when a
    factor was asked for, else `Hires resize`; `Hires steps` only when not the first pass's."""
    hires = recipe.hires
    if hires is None:
        return {}
    return {
        "Denoising strength": f"{hires.denoise:g}",
        "Hires prompt": hires.prompt,
        "Hires negative prompt": hires.negative_prompt,
        "Hires upscale": f"{hires.scale:g}" if hires.scale is not None else None,
        "Hires resize": f"{hires.width}x{hires.height}" if hires.scale is None else None,
        "Hires steps": hires.steps or None,
        "Hires upscaler": hires.upscaler,
    }


def infotext(recipe: Recipe) -> str:
    return format_infotext(recipe.prompt, recipe.negative_prompt, infotext_params(recipe))


@dataclass(frozen=True)
class Result:
    """One image made from a recipe: its pixels and recipe (for image `recipe.batch_index` of its batch), and
    once written, where it lies and the hash of its pixels. Who asked for it travels with it (`job_id`,
    `owner`), so the writer and the gallery need nothing else."""

    image: Image.Image
    recipe: Recipe
    path: Path | None = None
    sha256: str = ""  # image_sha256 of the pixels, set by write_result
    job_id: str | None = None
    owner: int | None = None


def _chunks(recipe: Recipe) -> dict[str, str]:
    return {INFOTEXT_CHUNK: infotext(recipe), RECIPE_CHUNK: recipe.to_json()}


def write_result(result: Result, path: Path) -> Result:
    """The one PNG writer: the image with its `parameters` and `spellbook` chunks, written atomically (a crash
    leaves the old file or the new one, never half of one). Returns the result with its path and pixel hash."""
    write_png_bytes(png_bytes(result.image, result.recipe), path)
    return replace(result, path=path, sha256=result.sha256 or image_sha256(result.image))


def write_png_bytes(data: bytes, path: Path) -> Path:
    """PNG bytes made by `png_bytes` (here or on a remote worker), written as they are, atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


GRID_CHUNK = "spellbook-grid"


def grid_png_bytes(image: Image.Image, grid: dict) -> bytes:
    """An X/Y/Z grid PNG (made by grid.grid_png): its axes and every cell's recipe in one `spellbook-grid` chunk
    (JSON), so the whole grid can be run again. No `parameters` chunk: a grid is not one image's recipe."""
    import io

    buffer = io.BytesIO()
    write_png_text(image, buffer, {GRID_CHUNK: json.dumps(grid, ensure_ascii=False)})
    return buffer.getvalue()


def read_grid(path: Path) -> dict | None:
    """The `spellbook-grid` chunk of a grid PNG (axes, cells with recipes), or None for any other image."""
    text = read_png_text(open_image(path)).get(GRID_CHUNK)
    if not text:
        return None
    try:
        grid = json.loads(text)
    except ValueError:
        raise UserError(f"{path}: its {GRID_CHUNK} chunk is not valid JSON", field="image") from None
    if not isinstance(grid, dict) or not isinstance(grid.get("cells"), list):
        raise UserError(f"{path}: its {GRID_CHUNK} chunk lists no cells", field="image")
    return grid


def png_bytes(image: Image.Image, recipe: Recipe) -> bytes:
    """The PNG file `write_result` would write, as bytes (for remote workers)."""
    import io

    buffer = io.BytesIO()
    write_png_text(image, buffer, _chunks(recipe))
    return buffer.getvalue()


def open_image(path: Path, field: str = "image", max_pixels: int | None = None) -> Image.Image:
    """Open an image with a clear error for a missing file, a non-image, or one too large to decode."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} does not exist", field=field)
    if path.is_dir():
        raise UserError(f"{path} is a folder, not an image", field=field)
    try:
        with warnings.catch_warnings():
            # Pillow only warns between its limit and twice it; both are pictures too large to decode safely.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(path)
    except UnidentifiedImageError:
        raise UserError(f"{path} is not an image Spellbook can read (PNG, JPEG, WebP, …)", field=field) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise UserError(
            f"{path} is too large to open safely (over {Image.MAX_IMAGE_PIXELS:,} pixels: {exc})", field=field
        ) from None
    if max_pixels is not None and image.width * image.height > max_pixels:
        raise UserError(f"{path} is {image.width}x{image.height}; the limit is {max_pixels} pixels", field=field)
    image.load()
    return image


def image_sha256(image: Image.Image) -> str:
    """Hash of the decoded pixels (mode + size + bytes), so re-encoding a PNG does not change it."""
    digest = hashlib.sha256(f"{image.mode}:{image.width}x{image.height}:".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class ImageMetadata:
    source: str  # spellbook | a1111 | comfyui | none
    recipe: Recipe | None  # ours, exactly as written
    foreign: dict[str, Any] | None  # what A1111 / ComfyUI metadata said, as read_foreign_recipe returns it
    chunks: dict[str, str]


def read_metadata(path: Path) -> ImageMetadata:
    image = open_image(path)
    chunks = read_png_text(image)
    found = read_foreign_recipe(chunks)
    if found is None:
        return ImageMetadata("none", None, None, chunks)
    if found.get("source") == "spellbook":
        return ImageMetadata("spellbook", Recipe.from_dict(found["recipe"]), None, chunks)
    return ImageMetadata(found.get("source", "unknown"), None, found, chunks)


def request_from_foreign(found: dict[str, Any], model_name: str | None = None) -> ImageRequest:
    """The adapter for A1111/ComfyUI metadata: what the other tool recorded, as a request; nothing invented."""
    return ImageRequest(
        prompt=found.get("prompt", "") or "",
        negative_prompt=found.get("negative_prompt", "") or "",
        model=model_name,
        sampler=found.get("sampler"),
        schedule=found.get("schedule"),
        steps=found.get("steps"),
        guidance=found.get("cfg_scale"),
        seed=found.get("seed"),
        width=found.get("width"),
        height=found.get("height"),
        clip_skip=found.get("clip_skip"),
        subseed=found.get("subseed") if found.get("subseed_strength") else None,
        subseed_strength=found.get("subseed_strength") or None,
        seed_resize_from_w=found.get("seed_resize_from_w"),
        seed_resize_from_h=found.get("seed_resize_from_h"),
        hires=found.get("hires"),
    )


def request_fields(request: ImageRequest) -> dict[str, Any]:
    """The request's chosen values (None left out, no pixels) as JSON-ready fields."""
    skip = {"init_image", "mask", "init_image_path", "mask_path"}
    return {
        f.name: getattr(request, f.name)
        for f in fields(ImageRequest)
        if f.name not in skip and getattr(request, f.name) not in (None, "")
    }


@dataclass(frozen=True)
class Comparison:
    identical: bool
    max_abs_diff: int
    psnr: float  # inf when identical
    differing_pixels: int
    build_differences: list[tuple[str, str, str]]  # (field, recorded, current)

    def summary(self) -> str:
        if self.identical:
            return "identical: every pixel matches"
        text = f"differs: PSNR {self.psnr:.2f} dB, {self.differing_pixels} pixels differ (max difference {self.max_abs_diff})"
        if self.build_differences:
            name, then, now = self.build_differences[0]
            text += f"; first differing build field: {name} (recorded {then}, now {now})"
        return text


def compare(recorded: Image.Image, regenerated: Image.Image, recorded_build: Build | None, build: Build) -> Comparison:
    a = np.asarray(recorded.convert("RGB"), dtype=np.int16)
    b = np.asarray(regenerated.convert("RGB"), dtype=np.int16)
    differences = []
    if recorded_build is not None:
        for f in fields(Build):
            then, now = getattr(recorded_build, f.name), getattr(build, f.name)
            if then != now:
                differences.append((f.name, str(then), str(now)))
    if a.shape != b.shape:
        return Comparison(False, 255, 0.0, int(max(a.size, b.size) // 3), differences)
    diff = np.abs(a - b)
    mse = float((diff.astype(np.float64) ** 2).mean())
    psnr = math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)
    return Comparison(mse == 0, int(diff.max()), psnr, int((diff.max(axis=2) > 0).sum()), differences)
