"""Morph animations: frames between keyframe pictures, each a blend of two neighbours (their noises slerped,
their prompts' encodings interpolated: `recipe.make_blend`), placed so that the motion is even, written as a
GIF or WebP (Pillow) or an MP4 (H.264, with imageio-ffmpeg's bundled ffmpeg).

Every frame is also a PNG with its recipe (`NAME-frames/00000.png` …), and `NAME.json` holds the keyframes and
where every frame lies between them, so `spellbook reproduce NAME.json` renders the same animation again and
`--resume` keeps frames already drawn. Even motion: the frames start evenly spaced in t; while the largest
step between consecutive frames (RMS pixel difference) is more than twice the median step, a frame is added
halfway into the largest step, up to as many extra frames as were asked for.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from spellbook.errors import UserError
from spellbook.recipe import Recipe, make_blend

MORPH_VERSION = 1
FORMATS = (".gif", ".webp", ".mp4")
EVEN_RATIO = 2.0  # the largest step between frames may be this many times the median step


@dataclass(frozen=True)
class Frame:
    segment: int  # between keyframe `segment` and the next (with loop, the last's next is the first)
    t: float


@dataclass
class Morph:
    keyframes: list[Recipe]
    frames: list[Frame]
    fps: int = 12
    loop: bool = False
    distances: list[float] = field(default_factory=list)  # RMS step to the next frame (and last to first: loop)

    def recipe(self, frame: Frame) -> Recipe:
        a = self.keyframes[frame.segment]
        b = self.keyframes[(frame.segment + 1) % len(self.keyframes)]
        return make_blend(a, b, frame.t, build=a.build)

    def to_dict(self) -> dict:
        return {
            "spellbook_morph": MORPH_VERSION,
            "fps": self.fps,
            "loop": self.loop,
            "keyframes": [recipe.to_dict() for recipe in self.keyframes],
            "frames": [{"segment": f.segment, "t": f.t} for f in self.frames],
        }

    @classmethod
    def from_dict(cls, data: dict) -> Morph:
        if not isinstance(data, dict) or data.get("spellbook_morph") != MORPH_VERSION:
            raise UserError("not a Spellbook morph file (its spellbook_morph version is missing)", field="morph")
        try:
            keyframes = [Recipe.from_dict(recipe) for recipe in data["keyframes"]]
            frames = [Frame(int(f["segment"]), float(f["t"])) for f in data["frames"]]
            morph = cls(keyframes, frames, int(data["fps"]), bool(data["loop"]))
        except (KeyError, TypeError, ValueError) as error:
            raise UserError(f"the morph file is incomplete: {error}", field="morph") from None
        check_morph(morph)
        return morph


def check_morph(morph: Morph) -> None:
    if len(morph.keyframes) < 2:
        raise UserError("a morph needs at least two keyframes (prompts, seeds or pictures)", field="keyframes")
    if not 1 <= morph.fps <= 60:
        raise UserError(f"--fps {morph.fps}: give 1 to 60", field="fps")
    segments = len(morph.keyframes) if morph.loop else len(morph.keyframes) - 1
    for frame in morph.frames:
        if not (0 <= frame.segment < segments and 0.0 <= frame.t <= 1.0):
            raise UserError(f"frame {frame} lies outside the keyframes", field="frames")
    for i in range(segments):  # every pair must blend (same model, size, sampler, steps, plain prompts)
        make_blend(morph.keyframes[i], morph.keyframes[(i + 1) % len(morph.keyframes)], 0.5)


def even_frames(keyframes: int, frames: int, loop: bool) -> list[Frame]:
    """`frames` frames evenly spaced over the segments (the last keyframe ends an open morph)."""
    segments = keyframes if loop else keyframes - 1
    per = max(1, round((frames if loop else frames - 1) / segments))
    placed = [Frame(s, j / per) for s in range(segments) for j in range(per)]
    return placed if loop else [*placed, Frame(segments - 1, 1.0)]


def step_distances(images: list[Image.Image], loop: bool) -> list[float]:
    """RMS difference (0-255) between each frame and the next (and the last and the first, for a loop)."""
    arrays = [np.asarray(image.convert("RGB"), dtype=np.float64) for image in images]
    pairs = list(itertools.pairwise(arrays)) + ([(arrays[-1], arrays[0])] if loop else [])
    return [float(np.sqrt(((a - b) ** 2).mean())) for a, b in pairs]


def unevenness(distances: list[float]) -> float:
    """The largest step over the median step (1: perfectly even)."""
    median = float(np.median(distances)) if distances else 0.0
    return max(distances) / median if median > 0 else 1.0


def render(
    morph: Morph,
    draw: Callable[[Recipe], Image.Image],
    *,
    even: bool = True,
    budget: int | None = None,
    on_frame: Callable[[int], None] | None = None,
) -> list[Image.Image]:
    """Draw every frame (`draw(recipe)`), then, if `even`, add frames halfway into the largest steps while the
    motion is uneven (at most `budget` more). `morph.frames` and `morph.distances` end up as drawn."""
    images = []
    for frame in morph.frames:
        images.append(draw(morph.recipe(frame)))
        if on_frame:
            on_frame(len(images))
    budget = len(morph.frames) if budget is None else budget
    morph.distances = step_distances(images, morph.loop)
    first_gap = min((_gap(morph.frames, i) for i in range(len(morph.distances))), default=1.0)
    while even and budget > 0:
        # the largest step above EVEN_RATIO x the median that can still be split: a step that stays large over
        # an eighth of the first spacing is the model jumping (a shape flipping sides), not frames too far apart
        limit = EVEN_RATIO * float(np.median(morph.distances))
        splittable = [i for i, d in enumerate(morph.distances) if d > limit and _gap(morph.frames, i) > first_gap / 8]
        if not splittable:
            break
        i = max(splittable, key=lambda k: morph.distances[k])
        here = morph.frames[i]
        frame = Frame(here.segment, here.t + _gap(morph.frames, i) / 2)
        morph.frames.insert(i + 1, frame)
        images.insert(i + 1, draw(morph.recipe(frame)))
        if on_frame:
            on_frame(len(images))
        morph.distances = step_distances(images, morph.loop)
        budget -= 1
    return images


def _gap(frames: list[Frame], i: int) -> float:
    """How far in t frame i lies from the next (to the segment's end when the next starts another segment)."""
    here, after = frames[i], frames[(i + 1) % len(frames)]
    end = after.t if after.segment == here.segment and after.t > here.t else 1.0
    return end - here.t


def write_animation(images: list[Image.Image], path: Path, fps: int, loop: bool, comment: str, scale: int = 1) -> Path:
    """GIF or WebP with Pillow, MP4 (H.264, yuv420p) with imageio-ffmpeg's ffmpeg; `scale` enlarges the frames
    (nearest neighbour) for small models. The sidecar's JSON goes into the GIF comment and the MP4 metadata."""
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise UserError(f"{path.name}: write a {', '.join(FORMATS)} file", field="out")
    frames = [image.convert("RGB") for image in images]
    if scale > 1:
        frames = [image.resize((image.width * scale, image.height * scale), Image.NEAREST) for image in frames]
    path.parent.mkdir(parents=True, exist_ok=True)
    duration = round(1000 / fps)
    if suffix == ".gif":
        frames[0].save(path, save_all=True, append_images=frames[1:], duration=duration, loop=0, comment=comment)
    elif suffix == ".webp":
        frames[0].save(path, save_all=True, append_images=frames[1:], duration=duration, loop=0, lossless=True)
    else:
        try:
            import imageio_ffmpeg
        except ImportError:
            raise UserError("writing MP4 needs imageio-ffmpeg (pip install imageio-ffmpeg)", field="out") from None
        width, height = frames[0].size
        if width % 2 or height % 2:
            raise UserError(f"MP4 (yuv420p) needs even sides; the frames are {width}x{height}", field="out")
        writer = imageio_ffmpeg.write_frames(
            str(path), (width, height), fps=fps, codec="libx264", pix_fmt_out="yuv420p", macro_block_size=1,
            output_params=["-metadata", f"comment={comment}"], ffmpeg_log_level="error",
        )  # fmt: skip
        writer.send(None)
        for image in frames:
            writer.send(np.ascontiguousarray(np.asarray(image)))
        writer.close()
    return path


def sidecar_path(out: Path) -> Path:
    return out.with_suffix(".json")


def frames_dir(out: Path) -> Path:
    return out.with_name(f"{out.stem}-frames")


def load(path: Path) -> Morph:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise UserError(f"{path.name} is not a morph file: {error}", field="morph") from None
    return Morph.from_dict(data)


def _key(recipe: Recipe) -> str:
    data = recipe.to_dict()
    data.pop("build", None)
    return json.dumps(data, sort_keys=True)


def run_morph(
    studio,
    morph: Morph,
    out: Path,
    *,
    resume: bool = False,
    even: bool = True,
    scale: int = 1,
    on_step=None,
    on_frame: Callable[[int], None] | None = None,
) -> dict:
    """Draw the morph with `studio`, write every frame (NAME-frames/00000.png …), the animation and NAME.json.
    Each frame is kept as soon as it is drawn (NAME-frames/drawn/), so an interrupted run loses nothing:
    `resume` takes every frame already drawn for the same recipe instead of drawing it again."""
    import hashlib
    import shutil

    from spellbook.provenance import Result, read_metadata, write_result

    folder = frames_dir(out)
    drawn = folder / "drawn"
    known: dict[str, Path] = {}
    if resume:
        for path in [*sorted(folder.glob("*.png")), *sorted(drawn.glob("*.png"))]:
            recipe = read_metadata(path).recipe
            if recipe is not None:
                known[_key(recipe)] = path
    elif folder.exists():
        shutil.rmtree(folder)  # another run's frames: start afresh (--resume keeps them)
    build = studio.build()

    def draw(recipe: Recipe) -> Image.Image:
        recipe = recipe.with_(build=build)
        key = _key(recipe)
        if key in known:
            with Image.open(known[key]) as image:
                return image.convert("RGB")
        [result] = studio.run(recipe, on_step=on_step)
        name = hashlib.sha256(key.encode()).hexdigest()[:16]
        known[key] = write_result(result, drawn / f"{name}.png").path
        return result.image

    images = render(morph, draw, even=even, on_frame=on_frame)
    paths = []
    for index, (frame, image) in enumerate(zip(morph.frames, images, strict=True)):
        recipe = morph.recipe(frame).with_(build=build)
        paths.append(write_result(Result(image, recipe), folder / f"{index:05d}.png").path)
    shutil.rmtree(drawn, ignore_errors=True)
    data = {**morph.to_dict(), "animation": out.name, "scale": scale}
    write_animation(images, out, morph.fps, morph.loop, json.dumps(data, separators=(",", ":")), scale)
    sidecar_path(out).write_text(json.dumps(data, indent=1), encoding="utf-8")
    steps = {"max": round(max(morph.distances), 3), "median": round(float(np.median(morph.distances)), 3),
             "ratio": round(unevenness(morph.distances), 3)}  # fmt: skip
    return {"animation": str(out), "morph": str(sidecar_path(out)), "frames": [str(p) for p in paths], "steps": steps}
