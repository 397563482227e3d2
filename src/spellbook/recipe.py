"""The Recipe: everything that determines an image, validated in one place, as versioned JSON.

A request (CLI flags, an API body) names only what the user chose; `make_recipe` fills the rest from the
model's defaults and validates every field with a message that names the field, the value given and what
is accepted. `Recipe.from_json` is strict: unknown fields are an error, never silently dropped.
"""

from __future__ import annotations

import difflib
import json
import random
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from spellbook.errors import UserError

RECIPE_VERSION = 1
KINDS = ("txt2img", "img2img", "inpaint")

# Sampler names as AUTOMATIC1111 shows them; engine/samplers.py maps each to a diffusers scheduler.
SAMPLERS = (
    "Euler",
    "Euler a",
    "Heun",
    "DPM2",
    "DPM2 a",
    "DPM++ 2M",
    "DPM++ 2M SDE",
    "DPM++ SDE",
    "DPM++ 2S",
    "DDIM",
    "PLMS",
    "LMS",
    "UniPC",
)
SCHEDULES = ("Automatic", "Karras", "Exponential")
MAX_SEED = 2**32 - 1


def suggest(value: str, options: tuple[str, ...] | list[str], n: int = 3) -> str:
    """A 'did you mean …?' fragment for an unknown name."""
    lowered = {o.lower(): o for o in options}
    close = difflib.get_close_matches(value.lower(), list(lowered), n=n, cutoff=0.5)
    if close:
        return "did you mean " + " or ".join(repr(lowered[c]) for c in close) + "?"
    return "known: " + ", ".join(options)


def split_sampler(name: str) -> tuple[str, str | None]:
    """'DPM++ 2M Karras' (A1111 before 1.9) -> ('DPM++ 2M', 'Karras'); names are matched case-insensitively."""
    text = name.strip()
    by_lower = {s.lower(): s for s in SAMPLERS}
    if text.lower() in by_lower:
        return by_lower[text.lower()], None
    for schedule in SCHEDULES[1:]:
        suffix = " " + schedule.lower()
        if text.lower().endswith(suffix) and text.lower()[: -len(suffix)] in by_lower:
            return by_lower[text.lower()[: -len(suffix)]], schedule
    raise UserError(f"unknown sampler {name!r}; {suggest(text, SAMPLERS)}", field="sampler")


def parse_size(text: str) -> tuple[int, int]:
    """'512x768' or '512' -> (width, height)."""
    parts = text.lower().replace("×", "x").split("x")
    try:
        if len(parts) == 1:
            return int(parts[0]), int(parts[0])
        if len(parts) == 2:
            return int(parts[0]), int(parts[1])
    except ValueError:
        pass
    raise UserError(f"size {text!r} is not WIDTHxHEIGHT, e.g. 512x512", field="size")


@dataclass(frozen=True)
class ModelRef:
    name: str
    sha256: str = ""

    @property
    def short_hash(self) -> str:
        """A1111's 'Model hash' (AutoV2): the first 10 hex digits of the file's sha256."""
        return self.sha256[:10]


@dataclass(frozen=True)
class ConceptRef:
    name: str
    sha256: str

    @property
    def short_hash(self) -> str:
        """A1111's 'TI hashes' entry: the first 12 hex digits."""
        return self.sha256[:12]


@dataclass(frozen=True)
class InputRef:
    """An input image (init image or mask), by content hash; `path` is where it was read from."""

    sha256: str
    path: str = ""


@dataclass(frozen=True)
class Build:
    spellbook: str
    torch: str
    diffusers: str
    transformers: str
    device: str
    dtype: str

    @classmethod
    def current(cls, device: str = "cpu", dtype: str = "float32") -> Build:
        import diffusers
        import torch
        import transformers

        from spellbook import __version__

        return cls(__version__, torch.__version__, diffusers.__version__, transformers.__version__, device, dtype)


@dataclass(frozen=True)
class Recipe:
    prompt: str
    negative_prompt: str = ""
    kind: str = "txt2img"
    model: ModelRef = field(default_factory=lambda: ModelRef("shapes"))
    vae: ModelRef | None = None
    concepts: tuple[ConceptRef, ...] = ()
    sampler: str = "DDIM"
    schedule: str = "Automatic"
    steps: int = 20
    guidance: float = 7.0
    seed: int = 0
    batch_size: int = 1
    batch_index: int = 0  # which image of the batch this recipe describes; its noise comes from seed + index
    width: int = 512
    height: int = 512
    strength: float | None = None  # img2img / inpaint: how much of the init image is re-drawn
    init_image: InputRef | None = None
    mask: InputRef | None = None
    clip_skip: int = 1
    build: Build | None = None
    version: int = RECIPE_VERSION

    @property
    def image_seed(self) -> int:
        """The seed of this image's own noise (A1111's per-image 'Seed')."""
        return self.seed + self.batch_index

    def for_image(self, index: int) -> Recipe:
        return replace(self, batch_index=index)

    def with_(self, **changes: Any) -> Recipe:
        return replace(self, **changes)

    # ------------------------------------------------------------------------------------------ JSON
    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["concepts"] = [asdict(c) for c in self.concepts]
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False, sort_keys=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any], limits: Limits | None = None) -> Recipe:
        """Strict: unknown fields and wrong types are errors with a field path."""
        if not isinstance(data, dict):
            raise UserError("a recipe must be a JSON object", field="recipe")
        version = data.get("version", RECIPE_VERSION)
        if version != RECIPE_VERSION:
            raise UserError(
                f"recipe version {version!r} is not supported; this Spellbook reads version {RECIPE_VERSION}",
                field="version",
            )
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UserError(f"unknown field {unknown[0]!r}; known fields: {', '.join(sorted(known))}", field=unknown[0])
        if "prompt" not in data:
            raise UserError("a recipe needs a prompt", field="prompt")
        values: dict[str, Any] = {}
        for f in fields(cls):
            if f.name not in data:
                continue
            values[f.name] = _convert(f.name, data[f.name])
        return validate(cls(**values), limits or Limits())

    @classmethod
    def from_json(cls, text: str) -> Recipe:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UserError(f"recipe is not valid JSON: {exc.msg} at line {exc.lineno}", field="recipe") from None
        return cls.from_dict(data)


_SUBRECORDS = {"model": ModelRef, "vae": ModelRef, "init_image": InputRef, "mask": InputRef, "build": Build}
_TYPES: dict[str, tuple[type, ...]] = {
    "prompt": (str,),
    "negative_prompt": (str,),
    "kind": (str,),
    "sampler": (str,),
    "schedule": (str,),
    "steps": (int,),
    "guidance": (int, float),
    "seed": (int,),
    "batch_size": (int,),
    "batch_index": (int,),
    "width": (int,),
    "height": (int,),
    "strength": (int, float),
    "clip_skip": (int,),
    "version": (int,),
}


def _record(name: str, cls: type, value: Any) -> Any:
    if not isinstance(value, dict):
        raise UserError(f"must be an object with fields {', '.join(f.name for f in fields(cls))}", field=name)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(value) - known)
    if unknown:
        raise UserError(f"unknown field {unknown[0]!r}", field=f"{name}.{unknown[0]}")
    try:
        return cls(**value)
    except TypeError:
        missing = [f.name for f in fields(cls) if f.name not in value]
        raise UserError(f"missing field {missing[0]!r}", field=f"{name}.{missing[0]}") from None


def _convert(name: str, value: Any) -> Any:
    if value is None:
        return None
    if name in _SUBRECORDS:
        return _record(name, _SUBRECORDS[name], value)
    if name == "concepts":
        if not isinstance(value, list):
            raise UserError("must be a list of {name, sha256} objects", field="concepts")
        return tuple(_record(f"concepts[{i}]", ConceptRef, item) for i, item in enumerate(value))
    expected = _TYPES[name]
    if isinstance(value, bool) or not isinstance(value, expected):
        raise UserError(f"must be {' or '.join(t.__name__ for t in expected)}, got {value!r}", field=name)
    if expected == (int, float):
        return float(value)
    return value


def _multiple_of_8_hint(width: int, height: int) -> str:
    def down(v: int) -> int:
        return max(8, v // 8 * 8)

    def up(v: int) -> int:
        return (v + 7) // 8 * 8

    return f"e.g. {down(width)}x{down(height)} or {up(width)}x{up(height)}"


@dataclass(frozen=True)
class Limits:
    max_pixels: int = 2048 * 2048
    max_batch: int = 16
    max_steps: int = 150


def validate(recipe: Recipe, limits: Limits = Limits()) -> Recipe:
    """Check every field; returns the recipe with names normalised (sampler case, schedule)."""
    r = recipe
    if r.kind not in KINDS:
        raise UserError(f"unknown kind {r.kind!r}; known: {', '.join(KINDS)}", field="kind")
    if not r.prompt.strip() and r.kind == "txt2img" and not r.negative_prompt:
        pass  # an empty prompt is allowed: it samples the unconditional distribution
    sampler, schedule_from_name = split_sampler(r.sampler)
    schedule = schedule_from_name or r.schedule
    by_lower = {s.lower(): s for s in SCHEDULES}
    if schedule.lower() not in by_lower:
        raise UserError(f"unknown schedule {schedule!r}; {suggest(schedule, SCHEDULES)}", field="schedule")
    schedule = by_lower[schedule.lower()]
    if not 1 <= r.steps <= limits.max_steps:
        raise UserError(f"steps {r.steps}: must be between 1 and {limits.max_steps}", field="steps")
    if not 0.0 <= r.guidance <= 30.0:
        raise UserError(f"guidance (CFG scale) {r.guidance:g}: must be between 0 and 30", field="guidance")
    if not 0 <= r.seed <= MAX_SEED:
        raise UserError(f"seed {r.seed}: must be between 0 and {MAX_SEED} (or -1 for a random seed)", field="seed")
    if not 1 <= r.batch_size <= limits.max_batch:
        raise UserError(f"batch size {r.batch_size}: must be between 1 and {limits.max_batch}", field="batch_size")
    if not 0 <= r.batch_index < r.batch_size:
        raise UserError(
            f"batch index {r.batch_index}: must be below the batch size {r.batch_size}", field="batch_index"
        )
    if r.width <= 0 or r.height <= 0 or r.width % 8 or r.height % 8:
        raise UserError(
            f"size {r.width}x{r.height}: width and height must be positive multiples of 8, "
            f"{_multiple_of_8_hint(r.width, r.height)}",
            field="size",
        )
    if r.width * r.height > limits.max_pixels:
        raise UserError(
            f"size {r.width}x{r.height} is {r.width * r.height} pixels; the limit is {limits.max_pixels}",
            field="size",
        )
    if not 1 <= r.clip_skip <= 12:
        raise UserError(f"clip skip {r.clip_skip}: must be between 1 and 12", field="clip_skip")
    if r.kind == "txt2img":
        if r.init_image or r.mask:
            raise UserError("a txt2img recipe takes no init image or mask", field="init_image")
    else:
        if r.init_image is None:
            raise UserError(f"{r.kind} needs an init image", field="init_image")
        if r.kind == "inpaint" and r.mask is None:
            raise UserError("inpaint needs a mask", field="mask")
        strength = 0.75 if r.strength is None else r.strength
        if not 0.0 < strength <= 1.0:
            raise UserError(f"strength {strength:g}: must be above 0 and at most 1", field="strength")
        r = replace(r, strength=strength)
    return replace(r, sampler=sampler, schedule=schedule)


def make_recipe(
    request: dict[str, Any],
    defaults: dict[str, Any],
    *,
    limits: Limits = Limits(),
    rng: random.Random | None = None,
) -> Recipe:
    """A request (only what the user chose) + the model's defaults -> a validated Recipe.

    `size` may be given as 'WxH'; `seed` -1 or None picks a random seed, recorded in the recipe.
    """
    merged = {k: v for k, v in defaults.items() if v is not None}
    merged.update({k: v for k, v in request.items() if v is not None})
    if "size" in merged:
        size = merged.pop("size")
        merged["width"], merged["height"] = parse_size(size) if isinstance(size, str) else size
    if merged.get("seed") in (None, -1):
        merged["seed"] = (rng or random.SystemRandom()).randint(0, MAX_SEED)
    known = {f.name for f in fields(Recipe)}
    unknown = sorted(set(merged) - known)
    if unknown:
        raise UserError(f"unknown field {unknown[0]!r}", field=unknown[0])
    values = {
        k: _convert(k, v) if not isinstance(v, (ModelRef, InputRef, Build, tuple)) else v for k, v in merged.items()
    }
    return validate(Recipe(**values), limits)
