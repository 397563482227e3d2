"""The Recipe: everything that determines an image, validated in one place, as versioned JSON.

A request (CLI flags, an API body) names only what the user chose; `make_recipe` fills the rest from the
model's defaults and validates every field with a message that names the field, the value given and what
is accepted. `Recipe.from_json` is strict: unknown fields are an error, never silently dropped.
"""

from __future__ import annotations

import difflib
import json
import random
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from spellbook.errors import UserError

RECIPE_VERSION = 1
KINDS = ("txt2img", "img2img", "inpaint", "blend")

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
# A1111's aliases of each sampler (its `/sdapi/v1/samplers` lists them; old scripts send `k_euler_a`).
SAMPLER_ALIASES = {
    "Euler": ("k_euler",),
    "Euler a": ("k_euler_a", "k_euler_ancestral"),
    "Heun": ("k_heun",),
    "DPM2": ("k_dpm_2",),
    "DPM2 a": ("k_dpm_2_a",),
    "DPM++ 2M": ("k_dpmpp_2m",),
    "DPM++ 2M SDE": ("k_dpmpp_2m_sde",),
    "DPM++ SDE": ("k_dpmpp_sde",),
    "DPM++ 2S": ("k_dpmpp_2s",),
    "DDIM": ("ddim",),
    "PLMS": ("plms",),
    "LMS": ("k_lms",),
    "UniPC": ("unipc",),
}
# A1111 samplers Spellbook does not run, each with why and what is closest (diffusers has no scheduler for
# them, or they need a model made for them); the name is refused with this, never mapped silently.
NOT_RUN = {
    "DPM++ 2S a": "diffusers' single-step DPM-Solver has no ancestral form; 'DPM++ 2S' or 'Euler a' are closest",
    "DPM++ 3M SDE": "not mapped yet (diffusers' DPM-Solver with order 3 and SDE); 'DPM++ 2M SDE' is closest",
    "DPM fast": "k-diffusion's adaptive DPM has no diffusers scheduler; 'DPM++ 2M' is closest",
    "DPM adaptive": "k-diffusion's adaptive DPM has no diffusers scheduler; 'DPM++ 2M' is closest",
    "Restart": "A1111's Restart sampler has no diffusers scheduler; 'DPM++ 2M' or 'Heun' are closest",
    "DDPM": "not mapped yet (diffusers' DDPMScheduler; it needs hundreds of steps); 'Euler a' is closest",
    "LCM": "needs a latent-consistency model (or LoRA), which Spellbook does not load yet",
    "Euler CFG++": "CFG++ guidance is not implemented; 'Euler' is closest",
    "DPM++ 2M CFG++": "CFG++ guidance is not implemented; 'DPM++ 2M' is closest",
}
NOT_RUN_ALIASES = {
    "k_dpmpp_2s_a": "DPM++ 2S a", "k_dpmpp_3m_sde": "DPM++ 3M SDE", "k_dpm_fast": "DPM fast", "k_dpm_ad": "DPM adaptive",
    "restart": "Restart", "ddpm": "DDPM", "k_lcm": "LCM",
}  # fmt: skip
SCHEDULES = ("Automatic", "Karras", "Exponential")
MAX_SEED = 2**32 - 1


def suggest(value: str, options: tuple[str, ...] | list[str], n: int = 3) -> str:
    """A 'did you mean …?' fragment for an unknown name."""
    lowered = {o.lower(): o for o in options}
    close = difflib.get_close_matches(value.lower(), list(lowered), n=n, cutoff=0.5)
    if close:
        return "did you mean " + " or ".join(repr(lowered[c]) for c in close) + "?"
    return "known: " + ", ".join(options)


# Schedule labels A1111 knows; before 1.9 (no "Schedule type") it appended them to the sampler name, as in
# "DPM++ 2M Karras". Longest first, so "SGM Uniform" wins over "Uniform". We run those in SCHEDULES.
A1111_SCHEDULES = (
    "Align Your Steps",
    "Polyexponential",
    "SGM Uniform",
    "Exponential",
    "KL Optimal",
    "Uniform",
    "Automatic",
    "Karras",
    "Simple",
    "Normal",
    "Beta",
)


def split_schedule(name: str) -> tuple[str, str | None]:
    """'DPM++ 2M Karras' -> ('DPM++ 2M', 'Karras'); 'Euler a' -> ('Euler a', None). Tolerant: names we do not
    run are split too (a foreign image's infotext is read as written, and refused only when run)."""
    text = name.strip()
    if text.lower() in {s.lower() for s in SAMPLERS}:
        return text, None
    for schedule in A1111_SCHEDULES:
        suffix = " " + schedule.lower()
        if text.lower().endswith(suffix) and len(text) > len(suffix):
            return text[: -len(suffix)], schedule
    return text, None


def parse_sampler(sampler: str, schedule: str | None = None) -> tuple[str, str]:
    """The one place sampler names are read: an A1111 sampler name (any case; 'DPM++ 2M Karras' carries its
    schedule) and an optional schedule -> (sampler, schedule), canonical. A schedule in the name wins over
    `schedule`; no schedule at all means Automatic."""
    name, from_name = split_schedule(sampler)
    by_lower = {s.lower(): s for s in SAMPLERS}
    by_lower.update({alias: s for s, aliases in SAMPLER_ALIASES.items() for alias in aliases})
    if name.lower() not in by_lower:
        not_run = {n.lower(): n for n in NOT_RUN} | NOT_RUN_ALIASES
        if name.lower() in not_run:
            known = not_run[name.lower()]
            raise UserError(f"sampler {known!r} is not available in Spellbook: {NOT_RUN[known]}", field="sampler")
        raise UserError(f"unknown sampler {sampler!r}; {suggest(sampler.strip(), SAMPLERS)}", field="sampler")
    chosen = (from_name or schedule or "Automatic").strip()
    schedules = {s.lower(): s for s in SCHEDULES}
    if chosen.lower() not in schedules:
        raise UserError(f"unknown schedule {chosen!r}; {suggest(chosen, SCHEDULES)}", field="schedule")
    return by_lower[name.lower()], schedules[chosen.lower()]


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
    # True: the bare word `name` in a prompt means the concept, as A1111 does for files in its embeddings
    # folder; False: only `<name>` does (a concept uploaded over the API never takes a plain word by default).
    bare_word: bool = True

    @property
    def key(self) -> str:
        """How the engine is given it: `name`, or `<name>` when only the bracketed form means the concept."""
        return self.name if self.bare_word else f"<{self.name}>"

    def to_dict(self) -> dict[str, Any]:
        """Only a bracket-only concept records `bare_word` (so every earlier recipe reads and writes as before)."""
        data: dict[str, Any] = {"name": self.name, "sha256": self.sha256}
        if not self.bare_word:
            data["bare_word"] = False
        return data

    @property
    def short_hash(self) -> str:
        """A1111's 'TI hashes' entry: the first 12 hex digits."""
        return self.sha256[:12]


@dataclass(frozen=True)
class InputRef:
    """An input image (init image or mask), by content hash; `path` is where it was read from."""

    sha256: str
    path: str = ""


# A1111's hires-fix upscalers: its latent modes (name -> torch interpolation mode, antialias) and the pixel
# resizers Spellbook has (model upscalers such as ESRGAN are not here yet).
LATENT_UPSCALERS: dict[str, tuple[str, bool]] = {
    "Latent": ("bilinear", False),
    "Latent (antialiased)": ("bilinear", True),
    "Latent (bicubic)": ("bicubic", False),
    "Latent (bicubic antialiased)": ("bicubic", True),
    "Latent (nearest)": ("nearest", False),
    "Latent (nearest-exact)": ("nearest-exact", False),
}
PIXEL_UPSCALERS = ("Lanczos", "Nearest")
HIRES_UPSCALERS = (*LATENT_UPSCALERS, *PIXEL_UPSCALERS)


@dataclass(frozen=True)
class Hires:
    """A1111's hires fix: after txt2img at the recipe's size, the picture is upscaled to `width` x `height`
    (`upscaler`: a latent mode, or Lanczos/Nearest on the decoded pixels) and re-drawn as img2img at `denoise`
    for `steps` denoising steps (0: as many as the first pass), under `prompt`/`negative_prompt` when given."""

    width: int
    height: int
    upscaler: str = "Latent"
    steps: int = 0
    denoise: float = 0.7
    prompt: str | None = None
    negative_prompt: str | None = None
    scale: float | None = None  # the factor asked for (A1111's `Hires upscale`); None when a size was

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    def pass_key(self) -> dict[str, Any]:
        """What a second pass shared by several recipes must agree on (prompts may differ, as in any batch)."""
        return {k: v for k, v in self.to_dict().items() if k not in ("prompt", "negative_prompt", "scale")}

    def steps_to_run(self, first_steps: int) -> int:
        """Denoising steps of the second pass (A1111's `Hires steps`; 0: the first pass's number)."""
        return self.steps or first_steps

    def inference_steps(self, first_steps: int) -> int:
        """The schedule length whose last `denoise` part is `steps_to_run` steps (as A1111 stretches it)."""
        wanted = self.steps_to_run(first_steps)
        if self.denoise >= 1.0:
            return wanted
        total = max(wanted, int(wanted / self.denoise))
        while int(total * self.denoise) < wanted:
            total += 1
        return total

    @classmethod
    def make(cls, asked: Mapping[str, Any], width: int, height: int) -> Hires:
        """From a request's `hires` mapping (`scale`, or `width`/`height`; `upscaler`, `steps`, `denoise`,
        `prompt`, `negative_prompt`) for a first pass of `width` x `height`. As A1111 sizes it: a scale gives
        int(side * scale), a width or height alone keeps the aspect ratio; both round down to a multiple of 8."""
        known = {"scale", "width", "height", "upscaler", "steps", "denoise", "prompt", "negative_prompt"}
        if not isinstance(asked, Mapping):
            raise UserError(f"must be an object with fields {', '.join(sorted(known))}", field="hires")
        unknown = sorted(set(asked) - known)
        if unknown:
            raise UserError(
                f"unknown field {unknown[0]!r}; known: {', '.join(sorted(known))}", field=f"hires.{unknown[0]}"
            )
        values = {k: v for k, v in asked.items() if v is not None}
        for name, types in (("scale", (int, float)), ("width", (int,)), ("height", (int,)), ("steps", (int,)),
                            ("denoise", (int, float)), ("upscaler", (str,)), ("prompt", (str,)),
                            ("negative_prompt", (str,))):  # fmt: skip
            value = values.get(name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, types)):
                raise UserError(
                    f"must be {' or '.join(t.__name__ for t in types)}, got {value!r}", field=f"hires.{name}"
                )
        scale = values.get("scale")
        to_w, to_h = values.get("width") or 0, values.get("height") or 0
        if to_w or to_h:
            if not to_w:
                to_w = int(width * to_h / height)
            if not to_h:
                to_h = int(height * to_w / width)
            scale = None
        elif scale is None:
            raise UserError("give a scale (e.g. 2) or a width and height", field="hires.scale")
        elif not 1.0 <= scale <= 8.0:
            raise UserError(f"scale {scale:g}: must be between 1 and 8", field="hires.scale")
        else:
            to_w, to_h = int(width * scale), int(height * scale)
        upscaler = values.get("upscaler", "Latent")
        if upscaler == "None":
            upscaler = "Lanczos"  # A1111's "None" upscaler resizes the pixels with Lanczos
        return cls(
            width=max(8, to_w // 8 * 8),
            height=max(8, to_h // 8 * 8),
            upscaler=upscaler,
            steps=values.get("steps", 0),
            denoise=float(values.get("denoise", 0.7)),
            prompt=values.get("prompt") or None,
            negative_prompt=values.get("negative_prompt") or None,
            scale=float(scale) if scale is not None else None,
        )


@dataclass(frozen=True)
class Blend:
    """A picture between two others ("halfway between these two"), `t` from 0 (the first) to 1 (the second).

    By recipes (`a`, `b`: each picture's recipe, one image of its batch): the blend starts from the spherical
    interpolation of their noises and is conditioned on the linear interpolation of their prompt encodings (and
    CFG scales), so t = 0 and t = 1 draw the two pictures again. By pictures (`a`, `b` None: photos, sketches,
    pictures without a usable recipe): both are VAE-encoded, their latents slerped, and the result drawn again as
    img2img at the recipe's strength under its prompt; picture A is the recipe's init image, picture B the input
    `b_sha256`. `a_sha256`/`b_sha256`: the pixels of the pictures it was made from."""

    t: float
    a: Recipe | None
    b: Recipe | None
    a_sha256: str = ""
    b_sha256: str = ""

    @property
    def by_pictures(self) -> bool:
        return self.a is None

    def to_dict(self) -> dict[str, Any]:
        return {"t": self.t, "a": self.a.to_dict() if self.a else None, "b": self.b.to_dict() if self.b else None,
                "a_sha256": self.a_sha256, "b_sha256": self.b_sha256}  # fmt: skip

    @classmethod
    def from_dict(cls, value: Any) -> Blend:
        if not isinstance(value, dict):
            raise UserError("must be an object with fields t, a, b, a_sha256, b_sha256", field="blend")
        unknown = sorted(set(value) - {"t", "a", "b", "a_sha256", "b_sha256"})
        if unknown:
            raise UserError(f"unknown field {unknown[0]!r}", field=f"blend.{unknown[0]}")
        t = value.get("t")
        if isinstance(t, bool) or not isinstance(t, int | float):
            raise UserError(f"must be a number from 0 to 1, got {t!r}", field="blend.t")
        parents = []
        for key in ("a", "b"):
            if value.get("a") is None and value.get("b") is None:
                parents.append(None)  # a blend of pictures
                continue
            try:
                parents.append(Recipe.from_dict(value.get(key)))
            except UserError as error:
                raise UserError(f"picture {key.upper()}'s recipe: {error.message}", field=f"blend.{key}") from None
        hashes = [value.get(key, "") for key in ("a_sha256", "b_sha256")]
        if not all(isinstance(h, str) for h in hashes):
            raise UserError("must be a hex string", field="blend.a_sha256")
        return cls(float(t), parents[0], parents[1], *hashes)


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
    styles: tuple[str, ...] = ()  # the styles whose templates made `prompt` / `negative_prompt` (already expanded)
    # A1111's variation seed: the noise of seed + i moved towards that of subseed + i by subseed_strength (txt2img)
    subseed: int | None = None
    subseed_strength: float = 0.0
    # A1111's "resize seed from": the noise of seed + i drawn at this size, centred in the noise of this size
    seed_resize_from_w: int = 0
    seed_resize_from_h: int = 0
    hires: Hires | None = None  # txt2img: A1111's hires fix, a second pass at a larger size
    blend: Blend | None = None  # kind blend: the two pictures' recipes and where between them
    build: Build | None = None
    version: int = RECIPE_VERSION

    @property
    def output_size(self) -> tuple[int, int]:
        """The size of the images the recipe makes: the hires size, when it has a hires pass."""
        return (self.hires.width, self.hires.height) if self.hires else (self.width, self.height)

    @property
    def image_seed(self) -> int:
        """The seed of this image's own noise (A1111's per-image 'Seed')."""
        return self.seed + self.batch_index

    @property
    def image_subseed(self) -> int | None:
        """The variation seed of this image (A1111's per-image 'Variation seed'), when one is used."""
        return None if self.subseed is None else self.subseed + self.batch_index

    def for_image(self, index: int) -> Recipe:
        return replace(self, batch_index=index)

    def with_(self, **changes: Any) -> Recipe:
        return replace(self, **changes)

    # ------------------------------------------------------------------------------------------ JSON
    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["concepts"] = [c.to_dict() for c in self.concepts]
        if self.styles:
            data["styles"] = list(self.styles)
        else:
            del data["styles"]  # written only when used: every earlier recipe reads and writes as before
        if not self.subseed_strength:
            del data["subseed"], data["subseed_strength"]  # likewise
        if not self.seed_resize_from_w:
            del data["seed_resize_from_w"], data["seed_resize_from_h"]  # likewise
        if self.hires is None:
            del data["hires"]  # likewise
        else:
            data["hires"] = self.hires.to_dict()
        if self.blend is None:
            del data["blend"]  # likewise
        else:
            data["blend"] = self.blend.to_dict()
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


_SUBRECORDS = {
    "model": ModelRef, "vae": ModelRef, "init_image": InputRef, "mask": InputRef, "build": Build, "hires": Hires,
}  # fmt: skip
_TYPES: dict[str, tuple[type, ...]] = {
    "prompt": (str,),
    "negative_prompt": (str,),
    "kind": (str,),
    "sampler": (str,),
    "schedule": (str,),
    "steps": (int,),
    "guidance": (int, float),
    "seed": (int,),
    "subseed": (int,),
    "subseed_strength": (int, float),
    "seed_resize_from_w": (int,),
    "seed_resize_from_h": (int,),
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
    if name == "blend":
        return Blend.from_dict(value)
    if name in _SUBRECORDS:
        return _record(name, _SUBRECORDS[name], value)
    if name == "styles":
        if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
            raise UserError("must be a list of style names", field="styles")
        return tuple(value)
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
    sampler, schedule = parse_sampler(r.sampler, r.schedule)
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
    _check_composable(r)
    _check_extra_networks(r)
    if r.hires is not None:
        _check_hires(r, limits)
    if not 0.0 <= r.subseed_strength <= 1.0:
        raise UserError(f"variation strength {r.subseed_strength:g}: must be between 0 and 1", field="subseed_strength")
    if r.subseed_strength:
        if r.subseed is None or not 0 <= r.subseed <= MAX_SEED:
            raise UserError(f"variation seed {r.subseed}: must be between 0 and {MAX_SEED}", field="subseed")
        if r.kind != "txt2img":
            raise UserError(
                f"variation seeds move txt2img's starting noise; {r.kind} starts from its init image",
                field="subseed_strength",
            )
    if r.seed_resize_from_w or r.seed_resize_from_h:
        _check_seed_resize(r, limits)
    if (r.kind == "blend") != (r.blend is not None):
        raise UserError("a blend recipe is kind 'blend' with a 'blend' record, and only it has one", field="blend")
    if r.kind == "blend":
        r = _check_blend(r)
    elif r.kind == "txt2img":
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


# What two pictures must share to be blended by their recipes (the noise and the prompts are interpolated).
BLEND_SHARED = ("model", "vae", "width", "height", "sampler", "schedule", "steps", "clip_skip")


def blend_mismatch(a: Recipe, b: Recipe) -> str | None:
    """Why two recipes cannot be blended by their noise and prompts, or None."""
    from spellbook.engine.schedule import is_composable, prompt_schedule

    for name, recipe in (("A", a), ("B", b)):
        if recipe.kind != "txt2img":
            return f"picture {name} is {recipe.kind}; a blend starts from the noise of two txt2img pictures"
        if recipe.hires is not None:
            return f"picture {name} has a hires pass; blending hires pictures is not supported yet"
        for text in (recipe.prompt, recipe.negative_prompt):
            if is_composable(text) or len(prompt_schedule(text, recipe.steps)) > 1:
                return (f"picture {name}'s prompt uses AND or prompt editing; a blend interpolates one encoding per "
                        "prompt")  # fmt: skip
    for name in BLEND_SHARED:
        if getattr(a, name) != getattr(b, name):
            return f"the pictures differ in {name} ({getattr(a, name)!r} and {getattr(b, name)!r})"
    return None


def make_blend(a: Recipe, b: Recipe, t: float, *, a_sha256: str = "", b_sha256: str = "", build=None) -> Recipe:
    """The recipe of the picture at `t` between A and B (each one image: `for_image` of its batch). It carries A's
    settings (its prompt and seed name it in the gallery), the CFG scale between theirs, and both concepts."""
    mismatch = blend_mismatch(a, b)
    if mismatch:
        raise UserError(
            f"cannot blend these two by their recipes: {mismatch}",
            field="blend",
            hint="blend the pictures themselves instead: give a prompt (spellbook blend --prompt, or `prompt` in "
            "POST /api/v1/blends)",
        )
    concepts = tuple(dict.fromkeys((*a.concepts, *b.concepts)))
    return validate(
        a.with_(
            kind="blend",
            seed=a.image_seed,
            batch_index=0,
            batch_size=1,
            guidance=a.guidance + (b.guidance - a.guidance) * t,
            subseed=None,
            subseed_strength=0.0,
            seed_resize_from_w=0,
            seed_resize_from_h=0,
            concepts=concepts,
            styles=(),
            blend=Blend(float(t), a, b, a_sha256, b_sha256),
            build=build,
        )
    )


def _check_blend(r: Recipe) -> Recipe:
    blend = r.blend
    if not 0.0 <= blend.t <= 1.0:
        raise UserError(f"blend t {blend.t:g}: must be between 0 (picture A) and 1 (picture B)", field="blend.t")
    if blend.by_pictures:
        if r.init_image is None or len(blend.b_sha256) != 64:
            raise UserError("a blend of pictures needs picture A (init_image) and B (blend.b_sha256)", field="blend")
        if r.mask or r.hires or r.subseed_strength or r.seed_resize_from_w or r.batch_size != 1:
            raise UserError("a blend of pictures is one img2img picture: no mask, batch or noise options",
                            field="blend")  # fmt: skip
        strength = 0.6 if r.strength is None else r.strength
        if not 0.0 < strength <= 1.0:
            raise UserError(f"strength {strength:g}: must be above 0 and at most 1", field="strength")
        return replace(r, strength=strength)
    if r.init_image is not None:
        raise UserError("a blend by recipes starts from their noise, not an init image", field="init_image")
    mismatch = blend_mismatch(blend.a, blend.b)
    if mismatch:
        raise UserError(f"cannot blend: {mismatch}", field="blend")
    if r.batch_size != 1 or r.init_image or r.mask or r.hires or r.subseed_strength or r.seed_resize_from_w:
        raise UserError("a blend is one picture from its two parents' noise: no batch, inputs or noise options",
                        field="blend")  # fmt: skip
    for name in BLEND_SHARED:
        if getattr(r, name) != getattr(blend.a, name):
            raise UserError(f"the blend's {name} must be its pictures' ({getattr(blend.a, name)!r})", field=name)
    return r


def _check_seed_resize(r: Recipe, limits: Limits) -> None:
    w, h = r.seed_resize_from_w, r.seed_resize_from_h
    if w < 8 or h < 8 or w % 8 or h % 8:
        raise UserError(
            f"resize seed from {w}x{h}: give a width and a height, multiples of 8 (e.g. 512x512)",
            field="seed_resize_from_w",
        )
    if w * h > limits.max_pixels:
        raise UserError(f"resize seed from {w}x{h}: above the limit of {limits.max_pixels} pixels",
                        field="seed_resize_from_w")  # fmt: skip
    if r.kind != "txt2img":
        raise UserError(f"resizing the seed moves txt2img's starting noise; {r.kind} starts from its init image",
                        field="seed_resize_from_w")  # fmt: skip


def _check_hires(r: Recipe, limits: Limits) -> None:
    h = r.hires
    for name, types in (("width", (int,)), ("height", (int,)), ("steps", (int,)), ("denoise", (int, float)),
                        ("upscaler", (str,)), ("prompt", (str, type(None))), ("negative_prompt", (str, type(None))),
                        ("scale", (int, float, type(None)))):  # fmt: skip
        value = getattr(h, name)
        if isinstance(value, bool) or not isinstance(value, types):
            raise UserError(f"must be {' or '.join(t.__name__ for t in types)}, got {value!r}", field=f"hires.{name}")
    if r.kind != "txt2img":
        raise UserError(f"hires fix is a second pass of txt2img; {r.kind} has none", field="hires")
    if h.upscaler not in HIRES_UPSCALERS:
        raise UserError(
            f"unknown hires upscaler {h.upscaler!r}; known: {', '.join(HIRES_UPSCALERS)}", field="hires.upscaler"
        )
    if h.width < r.width or h.height < r.height or h.width % 8 or h.height % 8:
        raise UserError(
            f"hires size {h.width}x{h.height}: must be multiples of 8, at least the first pass's {r.width}x{r.height}",
            field="hires.width",
        )
    if h.width * h.height > limits.max_pixels:
        raise UserError(
            f"hires size {h.width}x{h.height} is {h.width * h.height} pixels; the limit is {limits.max_pixels}",
            field="hires.scale",
        )
    if not 0 <= h.steps <= limits.max_steps:
        raise UserError(f"hires steps {h.steps}: must be between 0 (as the first pass) and {limits.max_steps}",
                        field="hires.steps")  # fmt: skip
    if not 0.0 < h.denoise <= 1.0:
        raise UserError(f"hires denoise {h.denoise:g}: must be above 0 and at most 1", field="hires.denoise")
    if h.prompt is not None:
        _check_composable(replace(r, prompt=h.prompt, hires=None))


# A1111's extra-network tags: `<lora:name:0.8>` loads weights in A1111; here it would be encoded as plain words.
EXTRA_NETWORK = re.compile(r"<(lora|lyco|hypernet):[^>]*>", re.IGNORECASE)


def _check_extra_networks(r: Recipe) -> None:
    texts = [("prompt", r.prompt), ("negative_prompt", r.negative_prompt)]
    if r.hires is not None:
        texts += [("hires.prompt", r.hires.prompt or ""), ("hires.negative_prompt", r.hires.negative_prompt or "")]
    for field_name, text in texts:
        tag = EXTRA_NETWORK.search(text)
        if tag:
            raise UserError(
                f"{tag.group(0)!r}: {tag.group(1)} networks (LoRA, hypernetworks) are not supported yet; nothing was run",
                field=field_name,
                hint="remove the tag; textual-inversion concepts work as <name>",
            )


def _check_composable(r: Recipe) -> None:
    """AND parts and prompt weights (`a AND b :0.7`) guide through CFG: each part is one more UNet pass."""
    from spellbook.engine.schedule import MAX_PARTS, composable_parts, is_composable

    if not is_composable(r.prompt):
        return
    parts = composable_parts(r.prompt)
    if len(parts) > MAX_PARTS:
        raise UserError(
            f"the prompt has {len(parts)} parts joined by AND; at most {MAX_PARTS} are allowed", field="prompt"
        )
    if r.guidance <= 1:
        what = "AND" if len(parts) > 1 else f"the prompt weight :{parts[0][1]:g} at its end"
        raise UserError(
            f"{what} works through classifier-free guidance, which is off at CFG scale {r.guidance:g}",
            field="guidance",
            hint="use a CFG scale above 1, or write the prompt without AND and a trailing :weight",
        )


@dataclass(frozen=True)
class ImageRequest:
    """What a user asked for, from any entry point (CLI flags, the native API, the A1111 API, a gallery remix,
    `reproduce` of a foreign image): only the choices they made; None means "the model's default".

    Each entry point has one small adapter that builds this; `make_recipe` is the one place that turns it into
    a validated Recipe. Words are ours: `guidance` (A1111's CFG scale), `schedule` (A1111's schedule type).
    Image inputs are pixels here; the recipe keeps them by content hash.
    """

    prompt: str = ""
    negative_prompt: str = ""
    kind: str = "txt2img"
    model: str | None = None  # a name in the models folder (or, from the local CLI, a path)
    vae: str | None = None
    sampler: str | None = None  # an A1111 name; 'DPM++ 2M Karras' carries its schedule
    schedule: str | None = None
    steps: int | None = None
    guidance: float | None = None
    seed: int | None = None  # None or -1: a random seed, recorded in the recipe
    batch_size: int | None = None
    width: int | None = None
    height: int | None = None
    strength: float | None = None
    clip_skip: int | None = None
    init_image: Any = None  # PIL image: img2img / inpaint
    mask: Any = None  # PIL image: inpaint, white = repaint
    init_image_path: str = ""  # where the init image was read from (recorded as a hint for `reproduce`)
    mask_path: str = ""
    styles: tuple[str, ...] = ()  # names in the style library, applied in order (Studio.plan expands them)
    subseed: int | None = None  # A1111's variation seed (None or -1: random, recorded, when a strength is given)
    subseed_strength: float | None = None
    seed_resize_from_w: int | None = None  # A1111's "resize seed from" (None, 0 or -1: off)
    seed_resize_from_h: int | None = None
    hires: Mapping[str, Any] | None = None  # hires fix: {scale | width, height, upscaler, steps, denoise, prompt, …}

    def with_(self, **changes: Any) -> ImageRequest:
        return replace(self, **changes)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ImageRequest:
        """From a plain mapping with these field names (None values skipped); `size` may be 'WxH' or (w, h).
        Unknown names are an error naming the field."""
        values = {k: v for k, v in data.items() if v is not None}
        if "size" in values:
            size = values.pop("size")
            values["width"], values["height"] = parse_size(size) if isinstance(size, str) else size
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise UserError(f"unknown field {unknown[0]!r}; known fields: {', '.join(sorted(known))}", field=unknown[0])
        return cls(**values)


_REQUEST_ONLY = {"model", "vae", "init_image", "mask", "init_image_path", "mask_path", "hires"}


def make_recipe(
    request: ImageRequest | Mapping[str, Any],
    defaults: Mapping[str, Any],
    *,
    model: ModelRef | None = None,
    vae: ModelRef | None = None,
    init_image: InputRef | None = None,
    mask: InputRef | None = None,
    concepts: tuple[ConceptRef, ...] = (),
    build: Build | None = None,
    limits: Limits = Limits(),
    rng: random.Random | None = None,
) -> Recipe:
    """A request (only what the user chose) + the model's defaults -> a validated Recipe.

    What the request names by name or pixels (model, VAE, init image, mask) arrives resolved, as refs; a seed
    of -1 or None picks a random seed, recorded in the recipe.
    """
    if not isinstance(request, ImageRequest):
        request = ImageRequest.from_dict(request)
    if request.strength is not None and (request.kind or "txt2img") == "txt2img":
        raise UserError(
            "strength is how much of an init image img2img and inpaint re-draw; txt2img has none (its hires pass "
            "takes hires.denoise)",
            field="strength",
        )
    if (request.init_image is not None and init_image is None) or (request.mask is not None and mask is None):
        raise ValueError("make_recipe takes image inputs as refs: store them first (Studio.plan does) and pass them")
    chosen = {
        f.name: getattr(request, f.name)
        for f in fields(ImageRequest)
        if f.name not in _REQUEST_ONLY and getattr(request, f.name) is not None
    }
    merged = {k: v for k, v in defaults.items() if v is not None and k in {f.name for f in fields(Recipe)}}
    merged.update(chosen)
    if merged.get("seed") in (None, -1):
        merged["seed"] = (rng or random.SystemRandom()).randint(0, MAX_SEED)
    if merged.get("subseed_strength"):
        if merged.get("subseed") in (None, -1):
            merged["subseed"] = (rng or random.SystemRandom()).randint(0, MAX_SEED)
    else:
        merged.pop("subseed", None)  # no strength: no variation, and nothing recorded
    if merged.get("seed_resize_from_w") in (0, -1) and merged.get("seed_resize_from_h") in (0, -1, None):
        merged.pop("seed_resize_from_w"), merged.pop("seed_resize_from_h", None)  # A1111's "off" values
    values = {k: _convert(k, v) for k, v in merged.items()}
    values.update(init_image=init_image, mask=mask, concepts=tuple(concepts), build=build, vae=vae)
    if model is not None:
        values["model"] = model
    if request.hires is not None:
        if isinstance(request.hires, Hires):
            values["hires"] = request.hires
        else:
            values["hires"] = Hires.make(request.hires, values.get("width", 512), values.get("height", 512))
    return validate(Recipe(**values), limits)
