"""Generation metadata in PNG files: A1111 infotext, PNG text chunks, and recipes written by other tools.

AUTOMATIC1111's "infotext" (the PNG text chunk `parameters`) is what every Stable Diffusion tool and site
reads, so we write it exactly as A1111 does and can read A1111's back. Our own full recipe travels next to it
in a `spellbook` chunk; ComfyUI's `prompt` / `workflow` graphs are read so that a foreign image can be
imported, searched and re-run.

The format, as A1111 writes it:

    <prompt, one or more lines>
    Negative prompt: <negative prompt, one or more lines>      (only when non-empty)
    Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1234, Size: 512x768, ...

A value containing `,`, `:` or a newline is JSON-quoted so that the last line stays one line of pairs.

This module depends on nothing else in Spellbook: it turns bytes and strings into plain dicts, and the
caller (provenance, gallery import) decides what a foreign recipe means for a Recipe.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from typing import Any

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from spellbook.recipe import split_schedule

__all__ = [
    "format_infotext",
    "parse_infotext",
    "read_foreign_recipe",
    "read_png_text",
    "split_hashes",
    "write_png_text",
]

NEGATIVE_PREFIX = "Negative prompt:"

# One `Key: value` pair of the params line; a value is either JSON-quoted (may hold `,` and escaped quotes)
# or runs to the next comma. The key pattern is A1111's (letters, digits, `_`, space, `-`, `/`).
_PARAM_RE = re.compile(r'\s*(\w[\w \-/]*):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_KEY_RE = re.compile(r"\w(?:[\w \-/]*[\w\-/])?")
# A1111 treats the last line as the params line only when it holds at least this many pairs, so a prompt
# line such as "style: oil, mood: calm" is not mistaken for parameters.
_MIN_PARAMS_ON_LINE = 3
_SIZE_RE = re.compile(r"^\s*(\d+)\s*[x×]\s*(\d+)\s*$")


# ComfyUI sampler_name -> A1111 sampler name. Names not listed are kept verbatim: a guess would be worse
# than an honest unknown. The *_gpu variants are the same samplers with their Brownian noise drawn on the GPU:
# the algorithm is the one named (a ComfyUI image never reproduces bit for bit here anyway: its noise is
# ComfyUI's).
COMFY_SAMPLERS = {
    "euler": "Euler",
    "euler_ancestral": "Euler a",
    "heun": "Heun",
    "dpm_2": "DPM2",
    "dpm_2_ancestral": "DPM2 a",
    "dpmpp_2s_ancestral": "DPM++ 2S a",
    "dpmpp_2m": "DPM++ 2M",
    "dpmpp_sde": "DPM++ SDE",
    "dpmpp_2m_sde": "DPM++ 2M SDE",
    "dpmpp_2m_sde_gpu": "DPM++ 2M SDE",
    "dpmpp_sde_gpu": "DPM++ SDE",
    "dpmpp_3m_sde": "DPM++ 3M SDE",
    "dpmpp_3m_sde_gpu": "DPM++ 3M SDE",
    "dpm_fast": "DPM fast",
    "dpm_adaptive": "DPM adaptive",
    "lcm": "LCM",
    "ddim": "DDIM",
    "lms": "LMS",
    "uni_pc": "UniPC",
    "plms": "PLMS",
}
# ComfyUI scheduler -> A1111 "Schedule type". ComfyUI's normal/simple are the model's own sigma spacing,
# which is what A1111 calls Automatic.
COMFY_SCHEDULES = {
    "karras": "Karras",
    "exponential": "Exponential",
    "normal": "Automatic",
    "simple": "Automatic",
    "sgm_uniform": "SGM Uniform",
    "kl_optimal": "KL Optimal",
    "beta": "Beta",
}
_COMFY_SAMPLER_NODES = ("KSampler", "KSamplerAdvanced")
_SEED_CONTROLS = ("fixed", "increment", "decrement", "randomize")

# A1111 param key -> (our key, converter). Anything else lands in `extra` as a string.
_A1111_FIELDS: dict[str, tuple[str, Any]] = {
    "Steps": ("steps", int),
    "CFG scale": ("cfg_scale", float),
    "Seed": ("seed", int),
    "Model": ("model", str),
    "Model hash": ("model_hash", str),
    "Denoising strength": ("denoising_strength", float),
    "Clip skip": ("clip_skip", int),
    "Variation seed": ("subseed", int),
    "Variation seed strength": ("subseed_strength", float),
}


# --- A1111 infotext -----------------------------------------------------------------------------------


def _quote(value: str) -> str:
    """JSON-quote a value that would otherwise break the params line, as A1111's `quote()` does.

    Beyond A1111 we also quote a value that starts with `"` or has surrounding whitespace: unquoted, such a
    value would not come back unchanged (it would be unquoted or stripped on reading).
    """
    if "," in value or ":" in value or "\n" in value or value.startswith('"') or value != value.strip():
        return json.dumps(value, ensure_ascii=False)
    return value


def _unquote(value: str) -> str:
    """Inverse of `_quote`; a value that only looks quoted but is not valid JSON is kept as written."""
    if len(value) >= 2 and value[0] == '"' and value[-1] == '"':
        try:
            decoded = json.loads(value)
        except ValueError:
            return value
        if isinstance(decoded, str):
            return decoded
    return value


def _param_text(value: object) -> str:
    # A mapping is written the way A1111 writes "TI hashes" / "Lora hashes": "name: hash, name: hash".
    if isinstance(value, Mapping):
        return ", ".join(f"{name}: {item}" for name, item in value.items())
    return str(value)


def format_infotext(prompt: str, negative_prompt: str, params: dict[str, object]) -> str:
    """Write A1111 infotext, so that A1111, Civitai and every tool that reads `parameters` understands us.

    `params` keep their order (A1111 order is Steps, Sampler, Schedule type, CFG scale, Seed, Size, ...);
    None values are skipped; a mapping value becomes "name: value, name: value" (TI hashes). Keys must
    match A1111's key pattern, or the line could not be read back. With no params at all, a prompt whose
    last line holds 3 `key: value` pairs would be read back as params (A1111 has the same ambiguity).
    """
    pairs = []
    for key, value in params.items():
        if value is None:
            continue
        if not _KEY_RE.fullmatch(key):
            raise ValueError(
                f"infotext key {key!r} cannot be read back; keys are letters, digits, '_', ' ', '-' and '/', "
                "starting with a letter or digit (e.g. 'CFG scale')"
            )
        pairs.append(f"{key}: {_quote(_param_text(value))}")
    lines = [prompt]
    if negative_prompt:
        lines.append(f"{NEGATIVE_PREFIX} {negative_prompt}")
    if pairs:
        lines.append(", ".join(pairs))
    return "\n".join(lines)


def _split_params_line(line: str) -> dict[str, str]:
    params = {}
    for key, raw in _PARAM_RE.findall(line):
        value = raw.strip()
        params[key.strip()] = _unquote(value) if value.startswith('"') else value
    return params


def parse_infotext(text: str) -> tuple[str, str, dict[str, str]]:
    """Read A1111 infotext into (prompt, negative prompt, params as unquoted strings).

    As A1111 does, the last line is the params line only if it holds at least 3 `Key: value` pairs;
    otherwise everything is prompt. Lines before the first line starting with "Negative prompt:" are the
    prompt, the rest the negative prompt. Values stay strings ("512x768"); interpreting them is the job of
    `read_foreign_recipe`.
    """
    lines = text.strip().split("\n")
    params: dict[str, str] = {}
    if len(_PARAM_RE.findall(lines[-1])) >= _MIN_PARAMS_ON_LINE:
        params = _split_params_line(lines.pop().strip())

    prompt_lines: list[str] = []
    negative_lines: list[str] = []
    for line in lines:
        if not negative_lines and line.lstrip().startswith(NEGATIVE_PREFIX):
            negative_lines.append(line.lstrip()[len(NEGATIVE_PREFIX) :].removeprefix(" "))
        elif negative_lines:
            negative_lines.append(line)
        else:
            prompt_lines.append(line)
    return "\n".join(prompt_lines).strip(), "\n".join(negative_lines).strip(), params


# --- PNG text chunks --------------------------------------------------------------------------------------


def _is_latin1(text: str) -> bool:
    try:
        text.encode("latin-1")
    except UnicodeEncodeError:
        return False
    return True


def write_png_text(image: Image.Image, path: str | os.PathLike[str], chunks: dict[str, str]) -> None:
    """Save `image` as PNG with one text chunk per entry.

    A value that latin-1 can hold goes in tEXt (what A1111 writes and what the most readers understand);
    anything else (CJK, emoji) goes in iTXt, which is UTF-8, rather than being mangled. Keys must be
    latin-1, 1 to 79 bytes, as the PNG spec requires.
    """
    info = PngInfo()
    for key, value in chunks.items():
        if not (1 <= len(key) <= 79 and _is_latin1(key)):
            raise ValueError(f"PNG text key {key!r} is not allowed; keys are 1 to 79 latin-1 characters")
        if _is_latin1(value):
            info.add_text(key, value, zip=False)
        else:
            info.add_itxt(key, value, zip=False)
    image.save(path, format="PNG", pnginfo=info)


def read_png_text(path_or_image: str | os.PathLike[str] | Image.Image) -> dict[str, str]:
    """Every text chunk (tEXt, zTXt, iTXt) of a PNG, including those after the image data; for a JPEG or WebP,
    the A1111 infotext in its EXIF UserComment, as `parameters` (where A1111 writes it for those formats).

    Returns {} for an image with neither.
    """
    if isinstance(path_or_image, Image.Image):
        return _text_of(path_or_image)
    with Image.open(path_or_image) as image:
        return _text_of(image)


def _text_of(image: Image.Image) -> dict[str, str]:
    # PngImageFile.text loads the image first, because chunks after IDAT are only seen once it is read.
    text = getattr(image, "text", None)
    if isinstance(text, Mapping) and text:
        return {str(key): str(value) for key, value in text.items()}
    comment = exif_user_comment(image)
    return {"parameters": comment} if comment else {}


_EXIF_IFD, _USER_COMMENT = 0x8769, 0x9286


def exif_user_comment(image: Image.Image) -> str | None:
    """The EXIF UserComment of an image (A1111 stores its infotext there in JPEG and WebP files), decoded by
    its 8-byte character-code prefix: UNICODE (UTF-16, big-endian as piexif writes it, or with a BOM), ASCII,
    or undefined (tried as UTF-8)."""
    try:
        value = image.getexif().get_ifd(_EXIF_IFD).get(_USER_COMMENT)
    except Exception:  # a malformed EXIF block is no comment, never a crash  # noqa: BLE001
        return None
    if isinstance(value, str):
        return value.strip("\0") or None
    if not isinstance(value, bytes) or len(value) <= 8:
        return None
    code, data = value[:8], value[8:]
    if code.startswith(b"UNICODE"):
        if data[:2] in (b"\xff\xfe", b"\xfe\xff"):
            text = data.decode("utf-16", errors="replace")
        else:
            # piexif writes big-endian; a writer on a little-endian machine may not: the one whose text has
            # fewer NULs where ASCII would have them is right.
            big, little = data.decode("utf-16-be", errors="replace"), data.decode("utf-16-le", errors="replace")
            text = big if sum(ch < "\u0100" for ch in big) >= sum(ch < "\u0100" for ch in little) else little
    else:
        text = data.decode("utf-8", errors="replace")
    return text.strip("\0").strip() or None


# --- foreign recipes ----------------------------------------------------------------------------------------


def read_foreign_recipe(chunks: dict[str, str]) -> dict[str, Any] | None:
    """Turn the text chunks of an image made by us, A1111 or ComfyUI into one flat dict, or None.

    Priority: our `spellbook` chunk (returned as {"source": "spellbook", "recipe": ...} for the caller to
    validate), then A1111 `parameters`, then ComfyUI `prompt` (filled in from `workflow` where it lacks a
    field), then `workflow` alone. A chunk that is malformed is treated as absent, so a broken chunk never
    hides a good one. Keys are present only when known: source, prompt, negative_prompt, steps, sampler,
    schedule, cfg_scale, seed, width, height, model, model_hash, denoising_strength, clip_skip, ti_hashes,
    extra (A1111 params we do not interpret, as strings).
    """
    recipe = _load_json_object(chunks.get("spellbook"))
    if recipe is not None:
        return {"source": "spellbook", "recipe": recipe}

    parameters = chunks.get("parameters")
    if parameters and parameters.strip():
        return _from_a1111(parameters)

    from_prompt = _from_comfy_prompt(_load_json_object(chunks.get("prompt")))
    from_workflow = _from_comfy_workflow(_load_json_object(chunks.get("workflow")))
    if from_prompt is None:
        return from_workflow
    if from_workflow is not None:
        # Both describe the same graph; the API-format prompt is exact, the workflow only fills gaps.
        from_prompt = {**from_workflow, **from_prompt}
    return from_prompt


def _load_json_object(text: str | None) -> dict[str, Any] | None:
    if not text:
        return None
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):  # JSONDecodeError, or an integer too long to convert
        return None
    return value if isinstance(value, dict) else None


def split_hashes(text: str) -> dict[str, str]:
    """'charlie: 0123456789ab, otter: 89abcdef0123' -> {'charlie': '0123456789ab', 'otter': '89abcdef0123'}."""
    hashes = {}
    for item in text.split(","):
        name, sep, digest = item.rpartition(":")
        if sep and name.strip():
            hashes[name.strip()] = digest.strip()
    return hashes


def _from_a1111(text: str) -> dict[str, Any]:
    prompt, negative_prompt, params = parse_infotext(text)
    result: dict[str, Any] = {"source": "a1111", "prompt": prompt, "negative_prompt": negative_prompt}
    extra: dict[str, str] = {}
    for key, value in params.items():
        # A value we cannot convert is kept in `extra` as written, never dropped.
        if key in _A1111_FIELDS:
            name, convert = _A1111_FIELDS[key]
            try:
                result[name] = convert(value)
            except ValueError:
                extra[key] = value
        elif key == "Size" and (size := _SIZE_RE.match(value)):
            result["width"], result["height"] = int(size.group(1)), int(size.group(2))
        elif key == "Seed resize from" and (size := _SIZE_RE.match(value)):
            result["seed_resize_from_w"], result["seed_resize_from_h"] = int(size.group(1)), int(size.group(2))
        elif key == "Sampler" and "Schedule type" in params:
            result["sampler"] = value
        elif key == "Sampler":
            # Before A1111 1.9 the schedule was part of the name, and a plain name meant "Automatic".
            result["sampler"], schedule = split_schedule(value)
            result["schedule"] = schedule or "Automatic"
        elif key == "Schedule type":
            result["schedule"] = value
        elif key == "TI hashes" and (hashes := split_hashes(value)):
            result["ti_hashes"] = hashes
        elif key in _A1111_HIRES:
            continue  # read below, together
        else:
            extra[key] = value
    hires = _hires_from_a1111(params, result.get("denoising_strength"))
    if hires is not None:
        result["hires"] = hires
    else:
        extra.update({key: value for key, value in params.items() if key in _A1111_HIRES})
    result["extra"] = extra
    return result


# A1111's hires-fix keys that Spellbook applies; others (Hires sampler, Hires checkpoint, Hires CFG Scale, …)
# stay in `extra`, so that a reproduce refuses them by name.
_A1111_HIRES = {"Hires upscale", "Hires resize", "Hires steps", "Hires upscaler", "Hires prompt",
                "Hires negative prompt"}  # fmt: skip


def _hires_from_a1111(params: dict[str, str], denoise: float | None) -> dict[str, Any] | None:
    """The hires pass an A1111 image records, as a request's `hires` mapping; None when it has none, or when a
    value cannot be read (the keys then stay unhonoured, by name)."""
    if not ({"Hires upscale", "Hires resize"} & params.keys()):
        return None
    hires: dict[str, Any] = {"upscaler": params.get("Hires upscaler", "Latent")}
    try:
        if "Hires resize" in params:
            size = _SIZE_RE.match(params["Hires resize"])
            if size is None:
                return None
            hires["width"], hires["height"] = int(size.group(1)), int(size.group(2))
        else:
            hires["scale"] = float(params["Hires upscale"])
        if "Hires steps" in params:
            hires["steps"] = int(params["Hires steps"])
    except ValueError:
        return None
    if denoise is not None:
        hires["denoise"] = denoise
    for key, name in (("Hires prompt", "prompt"), ("Hires negative prompt", "negative_prompt")):
        if key in params:
            hires[name] = params[key]
    return hires


# ComfyUI API format ("prompt" chunk): {node_id: {"class_type": str, "inputs": {name: value | [node_id, out]}}}.


def _is_link(value: object) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], (str, int))


def _comfy_nodes(graph: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    if graph is None:
        return {}
    return {
        str(node_id): node
        for node_id, node in graph.items()
        if isinstance(node, dict) and isinstance(node.get("class_type"), str) and isinstance(node.get("inputs"), dict)
    }


def _node_order(node_id: str) -> tuple[int, str]:
    return (int(node_id), node_id) if node_id.isdigit() else (1 << 62, node_id)


def _linked(nodes: dict[str, dict[str, Any]], value: object) -> dict[str, Any] | None:
    if isinstance(value, list) and _is_link(value):
        return nodes.get(str(value[0]))
    return None


def _comfy_text(nodes: dict[str, dict[str, Any]], link: object, hops: int = 3) -> str | None:
    """The prompt text behind a conditioning link: the CLIPTextEncode's `text`, reached through at most one
    conditioning node (ConditioningSetArea, ControlNetApply), and whose text may come from one primitive
    node. The bound keeps a cyclic or adversarial graph from looping."""
    node = _linked(nodes, link)
    if node is None or hops == 0:
        return None
    inputs = node["inputs"]
    for name in ("text", "text_g", "string", "value"):
        value = inputs.get(name)
        if isinstance(value, str):
            return value
        if _is_link(value):
            return _comfy_text(nodes, value, hops - 1)
    for name in ("conditioning", "conditioning_1", "conditioning_to"):
        if _is_link(inputs.get(name)):
            return _comfy_text(nodes, inputs[name], hops - 1)
    return None


def _comfy_scalar(nodes: dict[str, dict[str, Any]], value: object, names: tuple[str, ...]) -> object:
    """A widget value, or the value of the node a converted widget links to (a seed primitive, say)."""
    node = _linked(nodes, value)
    if node is None:
        return value
    for name in (*names, "value", "seed", "int", "float"):
        if name in node["inputs"] and not _is_link(node["inputs"][name]):
            return node["inputs"][name]
    return None


def _set_number(result: dict[str, Any], key: str, value: object, kind: type) -> None:
    # Foreign data: a bool, a missing link or a non-number is skipped rather than raised.
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return
    try:
        number = kind(value)
    except (TypeError, ValueError):
        return
    if kind is int and isinstance(value, float) and value != number:
        return
    result[key] = number


def _set_sampling(result: dict[str, Any], sampler: object, scheduler: object, denoise: object) -> None:
    if isinstance(sampler, str) and sampler:
        result["sampler"] = COMFY_SAMPLERS.get(sampler, sampler)
    if isinstance(scheduler, str) and scheduler:
        result["schedule"] = COMFY_SCHEDULES.get(scheduler, scheduler)
    strength: dict[str, Any] = {}
    _set_number(strength, "denoising_strength", denoise, float)
    if strength and strength["denoising_strength"] < 1:
        result.update(strength)


def _pick_sampler(nodes: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """The KSampler that made the image: prefer one that starts from an empty latent (the first pass of
    a hires-fix graph holds the seed and size the user chose), then the lowest node id."""
    ordered = [nodes[node_id] for node_id in sorted(nodes, key=_node_order)]
    samplers = [node for node in ordered if node["class_type"] in _COMFY_SAMPLER_NODES]
    for node in samplers:
        latent = _linked(nodes, node["inputs"].get("latent_image"))
        if latent is not None and latent["class_type"] == "EmptyLatentImage":
            return node
    return samplers[0] if samplers else None


def _from_comfy_prompt(graph: dict[str, Any] | None) -> dict[str, Any] | None:
    nodes = _comfy_nodes(graph)
    if not nodes:
        return None
    result: dict[str, Any] = {"source": "comfyui"}
    ordered = [nodes[node_id] for node_id in sorted(nodes, key=_node_order)]

    # 1. The sampler: seed, steps, cfg, sampler, schedule, strength, and the links to the prompts.
    sampler = _pick_sampler(nodes)
    latent = None
    model_loader = None
    if sampler is not None:
        inputs = sampler["inputs"]
        for key, names in (("prompt", "positive"), ("negative_prompt", "negative")):
            text = _comfy_text(nodes, inputs.get(names))
            if text is not None:
                result[key] = text
        seed = inputs.get("seed", inputs.get("noise_seed"))
        _set_number(result, "seed", _comfy_scalar(nodes, seed, ("seed", "noise_seed")), int)
        _set_number(result, "steps", _comfy_scalar(nodes, inputs.get("steps"), ("steps",)), int)
        _set_number(result, "cfg_scale", _comfy_scalar(nodes, inputs.get("cfg"), ("cfg",)), float)
        _set_sampling(
            result,
            _comfy_scalar(nodes, inputs.get("sampler_name"), ("sampler_name",)),
            _comfy_scalar(nodes, inputs.get("scheduler"), ("scheduler",)),
            _comfy_scalar(nodes, inputs.get("denoise"), ("denoise",)),
        )
        latent = _linked(nodes, inputs.get("latent_image"))
        # The model may pass through LoRA loaders on its way from the checkpoint loader.
        model_loader = _linked(nodes, inputs.get("model"))
        for _ in range(8):
            if model_loader is None or isinstance(model_loader["inputs"].get("ckpt_name"), str):
                break
            model_loader = _linked(nodes, model_loader["inputs"].get("model"))

    # 2. Size and model: from the nodes the sampler uses, else the graph's only such node.
    if latent is None or latent["class_type"] != "EmptyLatentImage":
        latents = [node for node in ordered if node["class_type"] == "EmptyLatentImage"]
        latent = latents[0] if len(latents) == 1 else None
    if latent is not None:
        _set_number(result, "width", _comfy_scalar(nodes, latent["inputs"].get("width"), ("width",)), int)
        _set_number(result, "height", _comfy_scalar(nodes, latent["inputs"].get("height"), ("height",)), int)
    if model_loader is None or not isinstance(model_loader["inputs"].get("ckpt_name"), str):
        loaders = [node for node in ordered if isinstance(node["inputs"].get("ckpt_name"), str)]
        model_loader = loaders[0] if len(loaders) == 1 else None
    if model_loader is not None:
        result["model"] = model_loader["inputs"]["ckpt_name"]
    # 3. A hires fix (a second KSampler over the first's upscaled latent) is read as one; other nodes that change
    #    the picture beyond one sampling chain are named, so that `reproduce` refuses them.
    read = _comfy_hires(nodes, sampler, result) if sampler is not None else None
    extra = {f"ComfyUI {node['class_type']}": f"node {node_id}" for node_id, node in sorted(nodes.items())
             if node["class_type"] in _COMFY_BEYOND_ONE_CHAIN and node_id != read}  # fmt: skip
    if extra:
        result["extra"] = extra
    return result


# ComfyUI latent upscale methods that are A1111 hires-fix latent modes (others have no A1111 twin).
COMFY_LATENT_UPSCALERS = {
    "nearest-exact": "Latent (nearest-exact)",
    "bilinear": "Latent",
    "bicubic": "Latent (bicubic)",
}


def comfy_upscale_size(kind: str, inputs: dict[str, Any], width: int, height: int) -> tuple[int, int] | None:
    """The size ComfyUI's LatentUpscale / LatentUpscaleBy (latents) or ImageScale / ImageScaleBy (pixels) gives a
    picture of `width` x `height`, rounded down to multiples of 8 as its latents (or VAEEncode's crop) are; None
    when the node keeps the size (both sides 0) or asks for a crop. Raises KeyError/TypeError/ValueError on
    inputs that are not numbers."""
    if kind in ("LatentUpscaleBy", "ImageScaleBy"):
        scale = float(inputs["scale_by"])
        if kind == "LatentUpscaleBy":  # round(side / 8 * scale_by) latent pixels
            return round(width / 8 * scale) * 8, round(height / 8 * scale) * 8
        return round(width * scale) // 8 * 8, round(height * scale) // 8 * 8
    latent = kind == "LatentUpscale"
    to_w, to_h = int(inputs["width"]), int(inputs["height"])
    if inputs.get("crop", "disabled") != "disabled" or not (to_w or to_h):
        return None
    if not to_w:  # a side of 0 keeps the ratio (latents: at least 64 pixels)
        to_h = max(64, to_h) if latent else to_h
        to_w = max(64 if latent else 1, round(width * to_h / height))
    elif not to_h:
        to_w = max(64, to_w) if latent else to_w
        to_h = max(64 if latent else 1, round(height * to_w / width))
    return to_w // 8 * 8, to_h // 8 * 8


def _comfy_hires(nodes: dict[str, dict[str, Any]], first: dict[str, Any], result: dict[str, Any]) -> str | None:
    """If `first`'s latent is upscaled (LatentUpscale / LatentUpscaleBy) into exactly one second KSampler with the
    same seed, cfg, sampler and scheduler, `result["hires"]` as the request's `hires` (sized as ComfyUI sizes it),
    and the upscale node's id; otherwise None (the node is then named as not honoured)."""
    for node_id, node in nodes.items():
        if node["class_type"] not in ("LatentUpscale", "LatentUpscaleBy"):
            continue
        if _linked(nodes, node["inputs"].get("samples")) is not first:
            continue
        seconds = [n for n in nodes.values() if n["class_type"] == "KSampler"
                   and _is_link(n["inputs"].get("latent_image")) and str(n["inputs"]["latent_image"][0]) == node_id]  # fmt: skip
        if len(seconds) != 1:
            return None
        again, up = seconds[0]["inputs"], node["inputs"]
        if any(again.get(k) != first["inputs"].get(k) for k in ("seed", "cfg", "sampler_name", "scheduler")):
            return None
        mode = COMFY_LATENT_UPSCALERS.get(up.get("upscale_method"))
        width, height = result.get("width"), result.get("height")
        if mode is None or not width or not height:
            return None
        hires: dict[str, Any] = {"upscaler": mode}
        _set_number(hires, "steps", again.get("steps"), int)
        _set_number(hires, "denoise", again.get("denoise"), float)
        try:
            size = comfy_upscale_size(node["class_type"], up, width, height)
        except (KeyError, TypeError, ValueError):
            return None
        if size is None:
            return None
        hires["width"], hires["height"] = size
        for key, name in (("prompt", "positive"), ("negative_prompt", "negative")):
            text = _comfy_text(nodes, again.get(name))
            if text is not None and text != result.get(key):
                hires[key] = text
        result["hires"] = hires
        return node_id
    return None


_COMFY_BEYOND_ONE_CHAIN = {"LoraLoader", "LoraLoaderModelOnly", "LatentUpscale", "LatentUpscaleBy", "ImageScale",
                           "ImageScaleBy", "UNETLoader"}  # fmt: skip


# ComfyUI UI format ("workflow" chunk): {"nodes": [{"id", "type", "mode", "inputs": [{"name", "link"}],
# "widgets_values": [...]}], "links": [[link_id, from_node, from_slot, to_node, to_slot, type], ...]}.


def _from_comfy_workflow(workflow: dict[str, Any] | None) -> dict[str, Any] | None:
    if workflow is None or not isinstance(workflow.get("nodes"), list):
        return None
    # Muted (2) and bypassed (4) nodes did not run.
    nodes = [
        node
        for node in workflow["nodes"]
        if isinstance(node, dict) and isinstance(node.get("type"), str) and node.get("mode", 0) not in (2, 4)
    ]
    if not nodes:
        return None
    by_id = {node["id"]: node for node in nodes if isinstance(node.get("id"), (int, str))}
    link_source: dict[object, object] = {}
    links = workflow.get("links")
    for link in links if isinstance(links, list) else []:
        # [link_id, origin_id, origin_slot, target_id, target_slot, type], or an object in newer frontends.
        if isinstance(link, list) and len(link) >= 2:
            link_id, origin_id = link[0], link[1]
        elif isinstance(link, dict):
            link_id, origin_id = link.get("id"), link.get("origin_id")
        else:
            continue
        if isinstance(link_id, (int, str)) and isinstance(origin_id, (int, str)):
            link_source[link_id] = origin_id

    def widgets(node: dict[str, Any]) -> list[Any]:
        values = node.get("widgets_values")
        return values if isinstance(values, list) else []

    def input_node(node: dict[str, Any], name: str) -> dict[str, Any] | None:
        slots = node.get("inputs")
        for slot in slots if isinstance(slots, list) else []:
            if isinstance(slot, dict) and slot.get("name") == name and isinstance(slot.get("link"), (int, str)):
                origin_id = link_source.get(slot["link"])
                return by_id.get(origin_id) if isinstance(origin_id, (int, str)) else None
        return None

    def text_of(node: dict[str, Any] | None) -> str | None:
        if node is not None and node["type"].startswith("CLIPTextEncode") and widgets(node):
            first = widgets(node)[0]
            return first if isinstance(first, str) else None
        return None

    result: dict[str, Any] = {"source": "comfyui"}
    samplers = [node for node in nodes if node["type"] in _COMFY_SAMPLER_NODES]
    encoders = [node for node in nodes if node["type"].startswith("CLIPTextEncode")]
    latents = [node for node in nodes if node["type"] == "EmptyLatentImage"]
    loaders = [node for node in nodes if node["type"].startswith("CheckpointLoader")]

    sampler = next((n for n in samplers if any(input_node(n, "latent_image") is m for m in latents)), None)
    sampler = sampler or (samplers[0] if samplers else None)
    if sampler is not None:
        for key, name in (("prompt", "positive"), ("negative_prompt", "negative")):
            text = text_of(input_node(sampler, name))
            if text is not None:
                result[key] = text
        values = widgets(sampler)
        if sampler["type"] == "KSamplerAdvanced":
            # [add_noise, noise_seed, control, steps, cfg, sampler_name, scheduler, start, end, leftover]
            values = [*values[1:7], None] if len(values) >= 7 else []
        elif len(values) >= 2 and values[1] not in _SEED_CONTROLS:
            # Workflows from before "control after generate" have no control widget after the seed.
            values = values[:1] + [None] + values[1:]
        if len(values) >= 6:
            _set_number(result, "seed", values[0], int)
            _set_number(result, "steps", values[2], int)
            _set_number(result, "cfg_scale", values[3], float)
            _set_sampling(result, values[4], values[5], values[6] if len(values) > 6 else None)
    if "prompt" not in result and len(encoders) == 1:
        text = text_of(encoders[0])
        if text is not None:
            result["prompt"] = text
    if len(latents) == 1 and len(widgets(latents[0])) >= 2:
        _set_number(result, "width", widgets(latents[0])[0], int)
        _set_number(result, "height", widgets(latents[0])[1], int)
    if len(loaders) == 1 and widgets(loaders[0]) and isinstance(widgets(loaders[0])[0], str):
        result["model"] = widgets(loaders[0])[0]
    return result
