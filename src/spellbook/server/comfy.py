"""The ComfyUI-compatible API: /prompt, /history, /view, /upload/image, /object_info, /queue, /ws, …

So that ComfyUI clients (Open WebUI's and SillyTavern's ComfyUI engines, scripts written against ComfyUI's
`/prompt`) work unchanged. A graph in ComfyUI's API format is read, node by node, into one `ImageRequest`
(`read_graph`), and submitted like every other entry point's (credits, fairness, batching): one prompt is one
job, and its `prompt_id` is the job id. Every route is also served under `/api`, as ComfyUI does.

What maps: the core nodes of one sampling chain (`NODES`). What does not is refused in ComfyUI's own 400 shape
(`{"error": {type, message, details, extra_info}, "node_errors": {node id: {errors, dependent_outputs,
class_type}}}`), naming the node and the input; Spellbook features that do not exist yet (LoRA, hires fix) are
refused as such (`NOT_YET`), never faked. Inputs a node does not declare are ignored, as ComfyUI ignores them.
"""

from __future__ import annotations

import asyncio
import io
import json
import math
import os
import re
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from fastapi import APIRouter, File, Form, Query, Request, UploadFile, WebSocket
from fastapi import Path as PathParam
from fastapi.responses import FileResponse, JSONResponse, Response
from PIL import Image, ImageFilter, ImageOps
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.websockets import WebSocketDisconnect

from spellbook import __version__
from spellbook.errors import Conflict, Forbidden, NotFound, Refused, SpellbookError, UserError
from spellbook.infotext import COMFY_LATENT_UPSCALERS, COMFY_SAMPLERS, COMFY_SCHEDULES, comfy_upscale_size
from spellbook.queue.jobs import FINAL, Job
from spellbook.recipe import MAX_SEED, SAMPLERS, SCHEDULES, ImageRequest
from spellbook.server.app import Caller, Services, services_of
from spellbook.server.native import submit
from spellbook.server.security import (
    LOCAL,
    SESSION_COOKIE,
    Principal,
    allowed_host,
    authenticate,
    decode_image_bytes,
)

# --------------------------------------------------------------------------------------------- the nodes

MAX_RESOLUTION = 16384  # ComfyUI's limit on latent sizes (ours is SPELLBOOK_MAX_PIXELS, checked when planned)
COMFY_MAX_SEED = 0xFFFFFFFFFFFFFFFF  # ComfyUI's seeds are 64-bit; ours are A1111's 32-bit (taken modulo 2^32)
OUTPUT_NODES = {"SaveImage": "output", "PreviewImage": "temp"}  # output node -> the `type` of its images
HIDDEN_OUTPUT_INPUTS = {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}


@dataclass(frozen=True)
class Choices:
    """An input whose accepted values are a list made per request: `checkpoints`, `samplers`, `schedulers`,
    `uploads` (the caller's uploaded pictures)."""

    name: str


@dataclass(frozen=True)
class NodeSpec:
    """One ComfyUI node as Spellbook reads it: ComfyUI's declaration (`INPUT_TYPES()["required"]`, `RETURN_TYPES`,
    display name, category) and what it does here (`does`: the docs table and `object_info`'s description)."""

    display_name: str
    category: str
    inputs: dict[str, tuple]
    outputs: tuple[str, ...]
    does: str
    output_names: tuple[str, ...] = ()
    output_node: bool = False


# ComfyUI's latent upscale methods; the ones A1111 has as hires-fix latent modes run (infotext.COMFY_LATENT_UPSCALERS).
UPSCALE_METHODS = ["nearest-exact", "bilinear", "area", "bicubic", "bislerp"]
# ComfyUI's image scale methods; those A1111 has as hires-fix pixel upscalers run.
IMAGE_SCALE_METHODS = ["nearest-exact", "bilinear", "area", "bicubic", "lanczos"]
COMFY_PIXEL_UPSCALERS = {"lanczos": "Lanczos", "nearest-exact": "Nearest"}
_SEED = ("INT", {"default": 0, "min": 0, "max": COMFY_MAX_SEED, "control_after_generate": True})
_STEPS = ("INT", {"default": 20, "min": 1, "max": 10000})
_CFG = ("FLOAT", {"default": 8.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01})
_SIDE = ("INT", {"default": 512, "min": 16, "max": MAX_RESOLUTION, "step": 8})

NODES: dict[str, NodeSpec] = {
    "CheckpointLoaderSimple": NodeSpec(
        "Load Checkpoint",
        "loaders",
        {"ckpt_name": (Choices("checkpoints"), {"tooltip": "The name of the checkpoint (model) to load."})},
        ("MODEL", "CLIP", "VAE"),
        "ckpt_name is the model: a name from GET /api/v1/models (a .safetensors or .ckpt suffix is dropped); its "
        "CLIP and VAE are that model's own",
    ),
    "CLIPTextEncode": NodeSpec(
        "CLIP Text Encode (Prompt)",
        "conditioning",
        {"text": ("STRING", {"multiline": True, "dynamicPrompts": True}), "clip": ("CLIP",)},
        ("CONDITIONING",),
        "text is the prompt (on KSampler's positive) or the negative prompt (on negative), in A1111 prompt syntax; "
        "embedding:NAME means the concept <NAME>",
    ),
    "CLIPSetLastLayer": NodeSpec(
        "CLIP Set Last Layer",
        "conditioning",
        {"clip": ("CLIP",), "stop_at_clip_layer": ("INT", {"default": -1, "min": -24, "max": -1, "step": 1})},
        ("CLIP",),
        "stop_at_clip_layer -n is clip skip n (the same for both prompts)",
    ),
    "EmptyLatentImage": NodeSpec(
        "Empty Latent Image",
        "latent",
        {"width": _SIDE, "height": _SIDE, "batch_size": ("INT", {"default": 1, "min": 1, "max": 4096})},
        ("LATENT",),
        "txt2img: width, height and batch_size",
    ),
    "KSampler": NodeSpec(
        "KSampler",
        "sampling",
        {
            "model": ("MODEL",),
            "seed": _SEED,
            "steps": _STEPS,
            "cfg": _CFG,
            "sampler_name": (Choices("samplers"), {"tooltip": "ComfyUI names of the samplers Spellbook runs."}),
            "scheduler": (Choices("schedulers"), {"tooltip": "ComfyUI names of the schedules Spellbook runs."}),
            "positive": ("CONDITIONING",),
            "negative": ("CONDITIONING",),
            "latent_image": ("LATENT",),
            "denoise": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01}),
        },
        ("LATENT",),
        "seed (modulo 2^32), steps, cfg, sampler_name and scheduler (as their A1111 names); denoise below 1 on an "
        "encoded picture is the img2img / inpaint strength",
    ),
    "KSamplerAdvanced": NodeSpec(
        "KSampler (Advanced)",
        "sampling",
        {
            "model": ("MODEL",),
            "add_noise": (["enable", "disable"],),
            "noise_seed": _SEED,
            "steps": _STEPS,
            "cfg": _CFG,
            "sampler_name": (Choices("samplers"), {"tooltip": "ComfyUI names of the samplers Spellbook runs."}),
            "scheduler": (Choices("schedulers"), {"tooltip": "ComfyUI names of the schedules Spellbook runs."}),
            "positive": ("CONDITIONING",),
            "negative": ("CONDITIONING",),
            "latent_image": ("LATENT",),
            "start_at_step": ("INT", {"default": 0, "min": 0, "max": 10000}),
            "end_at_step": ("INT", {"default": 10000, "min": 0, "max": 10000}),
            "return_with_leftover_noise": (["disable", "enable"],),
        },
        ("LATENT",),
        "as KSampler (noise_seed is the seed), for the full run only: add_noise enable, start_at_step 0, "
        "end_at_step at least steps",
    ),
    "LatentUpscale": NodeSpec(
        "Upscale Latent",
        "latent",
        {
            "samples": ("LATENT",),
            "upscale_method": (UPSCALE_METHODS,),
            "width": ("INT", {"default": 512, "min": 0, "max": MAX_RESOLUTION, "step": 8}),
            "height": ("INT", {"default": 512, "min": 0, "max": MAX_RESOLUTION, "step": 8}),
            "crop": (["disabled", "center"],),
        },
        ("LATENT",),
        "the hires fix: a first KSampler's latent upscaled to width x height (0: that side keeps the ratio; as "
        "ComfyUI, at least 64) for "
        "a second KSampler (its denoise, steps and prompts are the hires pass's; seed, cfg, sampler and scheduler "
        "the first's); upscale_method nearest-exact, bilinear or bicubic (A1111's latent modes), crop disabled",
    ),
    "LatentUpscaleBy": NodeSpec(
        "Upscale Latent By",
        "latent",
        {
            "samples": ("LATENT",),
            "upscale_method": (UPSCALE_METHODS,),
            "scale_by": ("FLOAT", {"default": 1.5, "min": 0.01, "max": 8.0, "step": 0.01}),
        },
        ("LATENT",),
        "the hires fix as LatentUpscale, sized by scale_by (at least 1)",
    ),
    "ImageScale": NodeSpec(
        "Upscale Image",
        "image/upscaling",
        {
            "image": ("IMAGE",),
            "upscale_method": (IMAGE_SCALE_METHODS,),
            "width": ("INT", {"default": 512, "min": 0, "max": MAX_RESOLUTION, "step": 1}),
            "height": ("INT", {"default": 512, "min": 0, "max": MAX_RESOLUTION, "step": 1}),
            "crop": (["disabled", "center"],),
        },
        ("IMAGE",),
        "the hires fix on pixels: a first KSampler's decoded images scaled (lanczos or nearest-exact: A1111's "
        "Lanczos and Nearest), VAE-encoded for a second KSampler, as LatentUpscale; elsewhere refused",
    ),
    "ImageScaleBy": NodeSpec(
        "Upscale Image By",
        "image/upscaling",
        {
            "image": ("IMAGE",),
            "upscale_method": (IMAGE_SCALE_METHODS,),
            "scale_by": ("FLOAT", {"default": 1.0, "min": 0.01, "max": 8.0, "step": 0.01}),
        },
        ("IMAGE",),
        "the hires fix on pixels, as ImageScale, sized by scale_by (at least 1)",
    ),
    "VAELoader": NodeSpec(
        "Load VAE",
        "loaders",
        {"vae_name": (Choices("vaes"),)},
        ("VAE",),
        "vae_name is a VAE override from SPELLBOOK_HOME/vae (a folder or a .safetensors file), for every "
        "decode and encode of the chain",
    ),
    "VAEDecode": NodeSpec(
        "VAE Decode",
        "latent",
        {"samples": ("LATENT",), "vae": ("VAE",)},
        ("IMAGE",),
        "the sampler's images, decoded by the model's VAE",
    ),
    "VAEEncode": NodeSpec(
        "VAE Encode",
        "latent",
        {"pixels": ("IMAGE",), "vae": ("VAE",)},
        ("LATENT",),
        "img2img: a LoadImage picture is the init image",
    ),
    "VAEEncodeForInpaint": NodeSpec(
        "VAE Encode (for Inpainting)",
        "latent/inpaint",
        {
            "pixels": ("IMAGE",),
            "vae": ("VAE",),
            "mask": ("MASK",),
            "grow_mask_by": ("INT", {"default": 6, "min": 0, "max": 64, "step": 1}),
        },
        ("LATENT",),
        "inpaint: init image and mask (grown by grow_mask_by pixels, a square dilation)",
    ),
    "SetLatentNoiseMask": NodeSpec(
        "Set Latent Noise Mask",
        "latent/inpaint",
        {"samples": ("LATENT",), "mask": ("MASK",)},
        ("LATENT",),
        "inpaint: a VAEEncode'd LoadImage picture and a mask",
    ),
    "LoadImage": NodeSpec(
        "Load Image",
        "image",
        {"image": (Choices("uploads"), {"image_upload": True})},
        ("IMAGE", "MASK"),
        "a picture the caller uploaded with POST /upload/image; its MASK is the picture's transparency",
    ),
    "LoadImageMask": NodeSpec(
        "Load Image (as Mask)",
        "mask",
        {"image": (Choices("uploads"), {"image_upload": True}), "channel": (["alpha", "red", "green", "blue"],)},
        ("MASK",),
        "a mask from one channel of an uploaded picture (alpha: the transparent part)",
    ),
    "SaveImage": NodeSpec(
        "Save Image",
        "image",
        {"images": ("IMAGE",), "filename_prefix": ("STRING", {"default": "ComfyUI"})},
        (),
        "the job's PNGs (named by Spellbook's image store: filename_prefix is not used), type output",
        output_node=True,
    ),
    "PreviewImage": NodeSpec(
        "Preview Image",
        "image",
        {"images": ("IMAGE",)},
        (),
        "the same PNGs, listed with type temp",
        output_node=True,
    ),
}

# ComfyUI core nodes for features Spellbook does not have yet: refused by name, never run as something else.
NOT_YET: dict[str, str] = {
    "UNETLoader": "Spellbook loads whole checkpoints only (CheckpointLoaderSimple), not diffusion models alone",
    "LoraLoader": "Spellbook has no LoRA support yet",
    "LoraLoaderModelOnly": "Spellbook has no LoRA support yet",
}

# Listed in object_info, with an empty model list, though no graph may use them: SillyTavern reads
# `UNETLoader.input.required.unet_name` when it lists models, and fails without it. Empty is the truth here
# (ComfyUI lists it the same way when it has no such files); a graph that uses it is refused (NOT_YET).
LISTED_ONLY: dict[str, NodeSpec] = {
    "UNETLoader": NodeSpec(
        "Load Diffusion Model",
        "advanced/loaders",
        {
            "unet_name": (Choices("unets"),),
            "weight_dtype": (["default", "fp8_e4m3fn", "fp8_e4m3fn_fast", "fp8_e5m2"],),
        },
        ("MODEL",),
        "listed with no models, for clients that read it; refused in a graph: " + NOT_YET["UNETLoader"],
    ),
}


def runnable_samplers() -> list[str]:
    """ComfyUI sampler names whose A1111 sampler Spellbook runs (infotext.COMFY_SAMPLERS is the one table)."""
    return [name for name, a1111 in COMFY_SAMPLERS.items() if a1111 in SAMPLERS]


def runnable_schedulers() -> list[str]:
    return [name for name, a1111 in COMFY_SCHEDULES.items() if a1111 in SCHEDULES]


def checkpoint_name(value: str) -> str:
    """`tiny.safetensors` -> `tiny`: ComfyUI names checkpoints by file, Spellbook by model name."""
    for suffix in (".safetensors", ".ckpt"):
        if value.lower().endswith(suffix):
            return value[: -len(suffix)]
    return value


# --------------------------------------------------------------------------------------------- errors


def comfy_error(kind: str, message: str, details: str = "", **extra_info: Any) -> dict[str, Any]:
    return {"type": kind, "message": message, "details": details, "extra_info": extra_info}


class GraphRefused(UserError):
    """A graph this server will not run, answered in ComfyUI's 400 shape instead of ours (the app's error
    handler calls `to_dict`), so ComfyUI clients show the node and the input at fault."""

    def __init__(self, error: dict[str, Any], node_errors: dict[str, Any] | None = None, *, field: str | None = None):
        detail = f": {error['details']}" if error.get("details") else ""
        super().__init__(f"{error['message']}{detail}", field=field)
        self.error = error
        self.node_errors = node_errors if node_errors is not None else {}

    def to_dict(self) -> dict:
        return {"error": self.error, "node_errors": self.node_errors}


class _NodeErrors:
    """Errors per node, as ComfyUI's validate_prompt reports them; `raise_if_any` ends the request with them."""

    def __init__(self, graph: _Graph):
        self.graph = graph
        self.by_node: dict[str, dict[str, Any]] = {}
        self.first_field: str | None = None

    def add(self, node_id: str, error: dict[str, Any], input_name: str | None = None) -> None:
        entry = self.by_node.setdefault(
            node_id, {"errors": [], "dependent_outputs": [], "class_type": self.graph.class_of(node_id)}
        )
        entry["errors"].append(error)
        if self.first_field is None:
            self.first_field = f"prompt.{node_id}" + (f".inputs.{input_name}" if input_name else "")

    def refuse(self, node_id: str, input_name: str | None, message: str, value: Any = None) -> None:
        """A value or a connection Spellbook cannot run, said in our words."""
        details = f"{input_name}: {message}" if input_name else message
        extra = {"input_name": input_name, "received_value": value} if input_name else {}
        self.add(node_id, comfy_error("not_supported", "Not supported by Spellbook", details, **extra), input_name)

    def __bool__(self) -> bool:
        return bool(self.by_node)

    def raise_if_any(self, outputs: list[str]) -> None:
        if not self.by_node:
            return
        for output in outputs:
            upstream = set(self.graph.upstream([output]))
            for node_id, entry in self.by_node.items():
                if node_id in upstream:
                    entry["dependent_outputs"].append(output)
        lines = [
            f"{error['message']}: {error['details']}" if error["details"] else error["message"]
            for entry in self.by_node.values()
            for error in entry["errors"]
        ]
        error = comfy_error("prompt_outputs_failed_validation", "Prompt outputs failed validation", "\n".join(lines))
        raise GraphRefused(error, self.by_node, field=self.first_field)


# --------------------------------------------------------------------------------------------- the graph


def _is_link(value: Any) -> bool:
    return (
        isinstance(value, list)
        and len(value) == 2
        and isinstance(value[0], (str, int))
        and not isinstance(value[0], bool)
        and isinstance(value[1], int)
        and not isinstance(value[1], bool)
    )


def _finite(value: Any) -> bool:
    """No NaN or infinity anywhere in a JSON value (Python's JSON reader accepts them; no answer could hold them)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, float) and not math.isfinite(item):
            return False
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return True


class _Graph:
    """An API-format graph: {node id: {"class_type", "inputs": {name: value | [node id, output slot]}}}."""

    def __init__(self, nodes: dict[str, dict[str, Any]]):
        self.nodes = nodes

    def class_of(self, node_id: str) -> str | None:
        node = self.nodes.get(node_id)
        return node["class_type"] if node else None

    def inputs(self, node_id: str) -> dict[str, Any]:
        return self.nodes[node_id]["inputs"]

    def link(self, node_id: str, name: str) -> tuple[str, int] | None:
        value = self.inputs(node_id).get(name)
        return (str(value[0]), value[1]) if _is_link(value) else None

    def upstream(self, starts: list[str]) -> list[str]:
        """The nodes `starts` depend on (themselves included), dependencies first; cycles end the walk."""
        order: list[str] = []
        seen: set[str] = set()
        for start in starts:
            if start in seen or start not in self.nodes:
                continue
            seen.add(start)
            stack: list[tuple[str, Iterator[Any]]] = [(start, iter(self.inputs(start).values()))]
            while stack:
                node_id, pending = stack[-1]
                for value in pending:
                    if _is_link(value) and str(value[0]) in self.nodes and str(value[0]) not in seen:
                        child = str(value[0])
                        seen.add(child)
                        stack.append((child, iter(self.inputs(child).values())))
                        break
                else:
                    stack.pop()
                    order.append(node_id)
        return order


def _node_title(node: Any, fallback: str) -> str:
    meta = node.get("_meta") if isinstance(node, dict) else None
    title = meta.get("title") if isinstance(meta, dict) else None
    return title if isinstance(title, str) else fallback


def parse_graph(prompt: Any) -> tuple[_Graph, list[str]]:
    """The graph and its output nodes, or ComfyUI's errors for a graph that cannot be read at all."""
    if not isinstance(prompt, dict) or not _finite(prompt):
        error = comfy_error("invalid_prompt", "Invalid prompt", "prompt must be an object of nodes with finite numbers")
        raise GraphRefused(error, field="prompt")
    nodes: dict[str, dict[str, Any]] = {}
    unknown: dict[str, Any] = {}
    for node_id, node in prompt.items():
        class_type = node.get("class_type") if isinstance(node, dict) else None
        if not isinstance(class_type, str):
            title = _node_title(node, node_id)
            message = (
                f"Node '{title}' has no class_type. The workflow may be corrupted or a custom node may be missing."
            )
            error = comfy_error("missing_node_type", message, f"Node ID '#{node_id}'", node_id=node_id, class_type=None)
            raise GraphRefused(error, field=f"prompt.{node_id}.class_type")
        inputs = node.get("inputs", {})
        if not isinstance(inputs, dict):
            details = f"Node ID '#{node_id}': inputs must be an object"
            raise GraphRefused(
                comfy_error("invalid_prompt", "Invalid prompt", details), field=f"prompt.{node_id}.inputs"
            )
        nodes[node_id] = {"class_type": class_type, "inputs": inputs, "title": _node_title(node, class_type)}
        if class_type not in NODES and class_type not in NOT_YET:
            unknown[node_id] = nodes[node_id]
    graph = _Graph(nodes)
    if unknown:
        # ComfyUI's answer for a class it does not have (missing_node_type), with every such node in node_errors.
        node_id, node = next(iter(unknown.items()))
        supported = ", ".join(NODES)
        message = f"Node '{node['title']}' not found: Spellbook does not run {node['class_type']!r}"
        error = comfy_error(
            "missing_node_type",
            message,
            f"Node ID '#{node_id}'",
            node_id=node_id,
            class_type=node["class_type"],
            node_title=node["title"],
        )
        errors = _NodeErrors(graph)
        for other_id, other in unknown.items():
            details = f"{other['class_type']} is not a node Spellbook runs; it runs {supported}"
            errors.add(other_id, comfy_error("missing_node_type", "Node class not supported", details))
        raise GraphRefused(error, errors.by_node, field=f"prompt.{node_id}.class_type")
    outputs = sorted((n for n in nodes if nodes[n]["class_type"] in OUTPUT_NODES), key=_node_order)
    if not outputs:
        raise GraphRefused(comfy_error("prompt_no_outputs", "Prompt has no outputs"), field="prompt")
    return graph, outputs


def _node_order(node_id: str) -> tuple[int, str]:
    """Numeric ids in number order (ComfyUI's are "3", "10", …), then the others."""
    numeric = node_id.isascii() and node_id.isdigit() and len(node_id) < 18
    return (int(node_id) if numeric else 1 << 62, node_id)


# --------------------------------------------------------------------------------------------- validation


@dataclass
class Lists:
    """The per-request lists the `Choices` inputs accept."""

    checkpoints: list[str]
    samplers: list[str]
    schedulers: list[str]
    uploads: list[str]
    vaes: list[str] = field(default_factory=list)
    unets: list[str] = field(default_factory=list)  # always empty: Spellbook loads whole checkpoints

    def of(self, choices: Choices) -> list[str]:
        return getattr(self, choices.name)


def _config_json(config: tuple, lists: Lists) -> list:
    """An input's declaration as ComfyUI's object_info writes it: [type or [choices...], {options}]."""
    kind = config[0]
    if isinstance(kind, Choices):
        kind = lists.of(kind)
    return [kind, *config[1:]]


def _as_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and re.fullmatch(r"\s*[+-]?\d{1,30}\s*", value):
        return int(value)
    return None


def _as_float(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    numeric = isinstance(value, (int, float))
    if not numeric and not (
        isinstance(value, str) and re.fullmatch(r"\s*[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?\s*", value)
    ):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def _upload_value(value: str) -> str:
    """ComfyUI's annotated name `photo.png [input]` is the upload `photo.png`."""
    return value.removesuffix(" [input]").strip()


def validate_inputs(graph: _Graph, outputs: list[str], lists: Lists) -> dict[str, dict[str, Any]]:
    """ComfyUI's input checks on every node the outputs depend on (missing inputs, link types, numbers and their
    ranges, values from lists), then refusals for nodes Spellbook does not run yet. Returns each node's widget
    values, converted (int, float, str)."""
    errors = _NodeErrors(graph)
    values: dict[str, dict[str, Any]] = {}
    for node_id in graph.upstream(outputs):
        class_type = graph.class_of(node_id)
        if class_type in NOT_YET:
            details = f"{class_type}: {NOT_YET[class_type]}; remove the node (or use the native API)"
            errors.add(node_id, comfy_error("node_not_supported_yet", "Node not supported yet", details))
            continue
        spec = NODES[class_type]
        inputs = graph.inputs(node_id)
        values[node_id] = {}
        for name, config in spec.inputs.items():
            kind = config[0]
            options = config[1] if len(config) > 1 else {}
            info = {"input_name": name, "input_config": _config_json(config, lists)}
            if name not in inputs:
                errors.add(
                    node_id,
                    comfy_error("required_input_missing", "Required input is missing", name, input_name=name),
                    name,
                )
                continue
            value = inputs[name]
            expected = kind if isinstance(kind, str) else "COMBO"
            if isinstance(value, list):
                _check_link(graph, errors, node_id, name, value, expected, info)
                continue
            if expected not in ("INT", "FLOAT", "STRING", "COMBO"):
                message = "Bad linked input, must be a length-2 list of [node_id, slot_index]"
                errors.add(node_id, comfy_error("bad_linked_input", message, name, received_value=value, **info), name)
                continue
            converted = _convert(errors, node_id, name, value, expected, options, info)
            if converted is None:
                continue
            if expected == "COMBO":
                choices = lists.of(kind) if isinstance(kind, Choices) else kind
                if not _in_choices(kind, converted, choices):
                    if isinstance(kind, Choices) and kind.name == "uploads":
                        details = f"{name} - Invalid image file: {converted}"
                        error = comfy_error(
                            "custom_validation_failed",
                            "Custom validation failed for node",
                            details,
                            received_value=converted,
                            **info,
                        )
                    else:
                        listed = str(choices) if len(choices) <= 20 else f"(list of length {len(choices)})"
                        error = comfy_error(
                            "value_not_in_list",
                            "Value not in list",
                            f"{name}: '{converted}' not in {listed}",
                            received_value=converted,
                            **info,
                        )
                    errors.add(node_id, error, name)
                    continue
            values[node_id][name] = converted
    errors.raise_if_any(outputs)
    return values


def _check_link(
    graph: _Graph, errors: _NodeErrors, node_id: str, name: str, value: list, expected: str, info: dict
) -> None:
    if not _is_link(value):
        message = "Bad linked input, must be a length-2 list of [node_id, slot_index]"
        errors.add(node_id, comfy_error("bad_linked_input", message, name, received_value=value, **info), name)
        return
    source, slot = str(value[0]), value[1]
    source_class = graph.class_of(source)
    if source_class is None:
        details = f"{name}: node {source} is not in the prompt"
        errors.add(
            node_id, comfy_error("bad_linked_input", "Linked node is missing", details, linked_node=value, **info), name
        )
        return
    if source_class in NOT_YET:
        return  # refused as a node of its own
    returns = NODES[source_class].outputs
    received = returns[slot] if 0 <= slot < len(returns) else None
    if received != expected:
        details = f"{name}, received_type({received}) mismatch input_type({expected})"
        error = comfy_error(
            "return_type_mismatch",
            "Return type mismatch between linked nodes",
            details,
            received_type=received,
            linked_node=value,
            **info,
        )
        errors.add(node_id, error, name)


def _convert(errors: _NodeErrors, node_id: str, name: str, value: Any, expected: str, options: dict, info: dict) -> Any:
    if expected == "INT":
        converted: Any = _as_int(value)
    elif expected == "FLOAT":
        converted = _as_float(value)
    elif expected == "STRING" or expected == "COMBO":
        converted = value if isinstance(value, str) else None
        if (
            expected == "STRING"
            and converted is None
            and isinstance(value, (int, float))
            and not isinstance(value, bool)
        ):
            converted = str(value)
    else:
        converted = None
    if converted is None:
        message = f"Failed to convert an input value to a {expected} value"
        errors.add(
            node_id,
            comfy_error("invalid_input_type", message, f"{name}, {value!r}", received_value=value, **info),
            name,
        )
        return None
    if "min" in options and converted < options["min"]:
        message = f"Value {converted} smaller than min of {options['min']}"
        errors.add(
            node_id, comfy_error("value_smaller_than_min", message, name, received_value=converted, **info), name
        )
        return None
    if "max" in options and converted > options["max"]:
        message = f"Value {converted} bigger than max of {options['max']}"
        errors.add(node_id, comfy_error("value_bigger_than_max", message, name, received_value=converted, **info), name)
        return None
    return converted


def _in_choices(kind: Any, value: str, choices: list[str]) -> bool:
    if isinstance(kind, Choices) and kind.name == "checkpoints":
        return checkpoint_name(value) in choices
    if isinstance(kind, Choices) and kind.name == "uploads":
        return _upload_value(value) in choices
    return value in choices


# --------------------------------------------------------------------------------------------- the chain


@dataclass
class Chain:
    """One sampling chain read from a graph: the request's fields, where its pictures come from, and which node
    and input each of our fields came from (so a refusal names them)."""

    fields: dict[str, Any]
    sources: dict[str, tuple[str, str]]  # our field -> (node id, ComfyUI input)
    sampler: str
    outputs: dict[str, str]  # output node -> the type of its images (output / temp)
    before: list[str]  # nodes that run before the sampler, in order
    after: list[str]  # nodes that run after it (decode, outputs), in order
    init_image: tuple[str, str] | None = None  # (LoadImage node, upload name)
    mask: tuple[str, str, str] | None = None  # (node, upload name, channel)
    grow_mask_by: int = 0
    texts: dict[str, str] = field(default_factory=dict)  # prompt / negative_prompt -> CLIPTextEncode node
    classes: dict[str, str] = field(default_factory=dict)  # node id -> class_type, for the chain's nodes


class _Reader:
    """Follows one chain's links from the outputs back to the checkpoint, refusing what does not map."""

    def __init__(self, graph: _Graph, values: dict[str, dict[str, Any]]):
        self.graph = graph
        self.values = values
        self.errors = _NodeErrors(graph)
        self.vaes: dict[str, tuple[str, str | None]] = {}  # decode/encode node -> (VAE source, VAELoader name)

    def follow(self, node_id: str, name: str, accepted: dict[str, int], wanted: str) -> str | None:
        """The node linked to `name` when it is one of `accepted` (class -> output slot); else a refusal."""
        link = self.graph.link(node_id, name)
        if link is None:
            return None  # already reported by validate_inputs
        source, slot = link
        if accepted.get(self.graph.class_of(source)) == slot:
            return source
        got = self.graph.class_of(source)
        if got in ("KSampler", "KSamplerAdvanced") and name in ("latent_image", "samples"):
            message = f"a second sampling pass on {got} {source}'s latent (hires fix) is not supported yet"
        else:
            message = f"must come from {wanted} here, not {got} {source} (output {slot})"
        self.errors.refuse(node_id, name, message, [source, slot])
        return None

    def checkpoint_of(self, node_id: str, name: str, slot: int, what: str, model: str | None) -> None:
        """A VAE or CLIP input must be the model's own (slot 2 / 1 of a loader of the same checkpoint)."""
        loader = self.follow(node_id, name, {"CheckpointLoaderSimple": slot}, f"a CheckpointLoaderSimple's {what}")
        if loader is None or model is None:
            return
        other = checkpoint_name(self.values[loader]["ckpt_name"])
        if other != model:
            message = f"a {what} from another checkpoint ({other}) is not supported: Spellbook uses {model}'s own"
            self.errors.refuse(node_id, name, message, [loader, slot])

    def clip_skip(self, encoder: str, model: str | None) -> tuple[int | None, str | None]:
        """The clip skip an encoder's CLIP carries (CLIPSetLastLayer -n -> n; None: the model's default)."""
        link = self.graph.link(encoder, "clip")
        if link is None:
            return None, None
        source, _ = link
        if self.graph.class_of(source) == "CLIPSetLastLayer":
            layer = self.values[source].get("stop_at_clip_layer")
            holder = source
            for _ in range(8):  # ComfyUI applies the one nearest the encoder last: it wins
                upstream = self.graph.link(holder, "clip")
                if upstream is None or self.graph.class_of(upstream[0]) != "CLIPSetLastLayer":
                    break
                holder = upstream[0]
            self.checkpoint_of(holder, "clip", 1, "CLIP", model)
            return (-layer if layer is not None else None), source
        self.checkpoint_of(encoder, "clip", 1, "CLIP", model)
        return None, None

    def mask_of(self, node_id: str) -> tuple[str, str, str] | None:
        source = self.follow(node_id, "mask", {"LoadImage": 1, "LoadImageMask": 0}, "LoadImage's MASK or LoadImageMask")
        if source is None:
            return None
        channel = "alpha" if self.graph.class_of(source) == "LoadImage" else self.values[source]["channel"]
        return source, _upload_value(self.values[source]["image"]), channel

    def vae_of(self, node_id: str, model: str | None) -> None:
        """Which VAE a decode or encode uses (the model's own, or a VAELoader's), recorded in `vaes`."""
        accepted = {"CheckpointLoaderSimple": 2, "VAELoader": 0}
        source = self.follow(node_id, "vae", accepted, "a CheckpointLoaderSimple's VAE or a VAELoader")
        if source is None:
            return
        if self.graph.class_of(source) == "VAELoader":
            self.vaes[node_id] = (source, self.values[source]["vae_name"])
        else:
            self.checkpoint_of(node_id, "vae", 2, "VAE", model)
            self.vaes[node_id] = (source, None)

    def picture_of(self, encoder: str, model: str | None) -> tuple[str, str] | None:
        """The LoadImage picture a VAEEncode / VAEEncodeForInpaint encodes."""
        self.vae_of(encoder, model)
        loader = self.follow(encoder, "pixels", {"LoadImage": 0}, "a LoadImage's IMAGE")
        return (loader, _upload_value(self.values[loader]["image"])) if loader else None


def read_graph(graph: _Graph, outputs: list[str], values: dict[str, dict[str, Any]]) -> Chain:
    """The one sampling chain the outputs show, as request fields; refusals in ComfyUI's shape otherwise."""
    reader = _Reader(graph, values)
    errors = reader.errors
    # 1. Outputs show decoded images of one sampler.
    samplers: dict[str, str] = {}
    decoders: set[str] = set()
    for output in outputs:
        decoder = reader.follow(output, "images", {"VAEDecode": 0}, "a VAEDecode (the images a sampler made)")
        if decoder is None:
            continue
        decoders.add(decoder)
        sampler = reader.follow(decoder, "samples", {"KSampler": 0, "KSamplerAdvanced": 0}, "a KSampler")
        if sampler is not None:
            samplers[output] = sampler
    chains = sorted(set(samplers.values()), key=_node_order)
    if len(chains) > 1:
        listed = ", ".join(chains)
        for output, sampler in samplers.items():
            if sampler != chains[0]:
                message = (
                    f"this graph has {len(chains)} sampling chains (KSampler nodes {listed}); Spellbook runs one "
                    "chain per prompt: send each as a prompt of its own"
                )
                errors.refuse(output, "images", message)
    errors.raise_if_any(outputs)
    sampler = chains[0]
    # A hires fix: the outputs' sampler re-draws an upscaled latent of a first sampler, which holds the settings.
    second = upscale = None
    link = graph.link(sampler, "latent_image")
    latent_source = graph.class_of(link[0]) if link is not None else None
    scaled = graph.link(link[0], "pixels") if latent_source == "VAEEncode" else None
    if latent_source in ("LatentUpscale", "LatentUpscaleBy"):
        upscale = link[0]
        first = reader.follow(upscale, "samples", {"KSampler": 0}, "a KSampler (the first pass of a hires fix)")
    elif scaled is not None and graph.class_of(scaled[0]) in ("ImageScale", "ImageScaleBy"):
        # the hires fix on pixels: KSampler -> VAEDecode -> ImageScale(By) -> VAEEncode -> this KSampler
        upscale = scaled[0]
        decoded = reader.follow(upscale, "image", {"VAEDecode": 0}, "a VAEDecode of the first pass")
        first = reader.follow(decoded, "samples", {"KSampler": 0}, "a KSampler (the first pass of a hires fix)")
        decoders.update(node for node in (decoded, link[0]) if node)  # their VAE must be the job's too
    if upscale is not None:
        if graph.class_of(sampler) != "KSampler":
            errors.refuse(sampler, "latent_image", "a hires fix's second pass must be a KSampler")
        errors.raise_if_any(outputs)
        second, sampler = sampler, first
    sources: dict[str, tuple[str, str]] = {}
    fields: dict[str, Any] = {}
    texts: dict[str, str] = {}
    settings = values[sampler]

    # 2. The model, and the model's own VAE for every decode.
    loader = reader.follow(sampler, "model", {"CheckpointLoaderSimple": 0}, "a CheckpointLoaderSimple's MODEL")
    model = checkpoint_name(values[loader]["ckpt_name"]) if loader else None
    if loader:
        fields["model"] = model
        sources["model"] = (loader, "ckpt_name")
    for decoder in sorted(decoders, key=_node_order):
        reader.vae_of(decoder, model)

    # 3. Prompts and clip skip.
    skips: dict[str, tuple[int | None, str | None]] = {}
    for key, name in (("prompt", "positive"), ("negative_prompt", "negative")):
        encoder = reader.follow(sampler, name, {"CLIPTextEncode": 0}, "a CLIPTextEncode")
        if encoder is None:
            continue
        fields[key] = values[encoder]["text"]
        sources[key] = (encoder, "text")
        texts[key] = encoder
        skips[key] = reader.clip_skip(encoder, model)
    if len({skip for skip, _ in skips.values()}) > 1:
        (positive, _), (negative, _) = skips["prompt"], skips["negative_prompt"]
        message = (
            f"the negative prompt's CLIP skips {negative or 1} layer(s) and the positive prompt's {positive or 1}: "
            "Spellbook uses one clip skip for both"
        )
        errors.refuse(texts["negative_prompt"], "clip", message)
    elif skips:
        skip, holder = next(iter(skips.values()))
        if skip is not None:
            fields["clip_skip"] = skip
            sources["clip_skip"] = (holder, "stop_at_clip_layer")

    # 4. Sampling: seed, steps, cfg, sampler and schedule by their A1111 names, strength.
    advanced = graph.class_of(sampler) == "KSamplerAdvanced"
    seed_input = "noise_seed" if advanced else "seed"
    fields["seed"] = settings[seed_input] % (MAX_SEED + 1)  # ComfyUI's 64-bit seed, modulo A1111's 2^32
    fields["steps"] = settings["steps"]
    fields["guidance"] = settings["cfg"]
    fields["sampler"] = COMFY_SAMPLERS[settings["sampler_name"]]
    fields["schedule"] = COMFY_SCHEDULES[settings["scheduler"]]
    sources.update(
        seed=(sampler, seed_input),
        steps=(sampler, "steps"),
        guidance=(sampler, "cfg"),
        sampler=(sampler, "sampler_name"),
        schedule=(sampler, "scheduler"),
        strength=(sampler, "denoise" if not advanced else "steps"),
    )
    denoise = 1.0
    if advanced:
        if settings["add_noise"] != "enable":
            errors.refuse(
                sampler,
                "add_noise",
                "only 'enable' maps to a Spellbook run (it starts from noise)",
                settings["add_noise"],
            )
        if settings["start_at_step"] != 0:
            errors.refuse(
                sampler,
                "start_at_step",
                "only 0 is supported: Spellbook runs every step of the schedule",
                settings["start_at_step"],
            )
        if settings["end_at_step"] < settings["steps"]:
            message = f"must be at least steps ({settings['steps']}): Spellbook runs every step of the schedule"
            errors.refuse(sampler, "end_at_step", message, settings["end_at_step"])
    else:
        denoise = settings["denoise"]

    # 5. What the sampler starts from: an empty latent (txt2img), an encoded picture (img2img), with a mask (inpaint).
    chain = Chain(fields, sources, sampler, {o: OUTPUT_NODES[graph.class_of(o)] for o in outputs}, [], [], texts=texts)
    accepted = {"EmptyLatentImage": 0, "VAEEncode": 0, "VAEEncodeForInpaint": 0, "SetLatentNoiseMask": 0}
    wanted = "EmptyLatentImage, VAEEncode, VAEEncodeForInpaint or SetLatentNoiseMask"
    latent = reader.follow(sampler, "latent_image", accepted, wanted)
    latent_class = graph.class_of(latent) if latent else None
    if latent_class == "EmptyLatentImage":
        fields.update(kind="txt2img", width=values[latent]["width"], height=values[latent]["height"])
        fields["batch_size"] = values[latent]["batch_size"]
        sources.update(size=(latent, "width"), batch_size=(latent, "batch_size"))
        if denoise < 1:
            message = (
                "below 1 needs a picture to start from (VAEEncode of a LoadImage); from an empty latent Spellbook "
                "draws the whole image (denoise 1)"
            )
            errors.refuse(sampler, "denoise", message, denoise)
    elif latent_class is not None:
        encoder = latent
        if latent_class == "SetLatentNoiseMask":
            encoder = reader.follow(latent, "samples", {"VAEEncode": 0}, "a VAEEncode of a LoadImage")
        if latent_class in ("VAEEncodeForInpaint", "SetLatentNoiseMask"):
            chain.mask = reader.mask_of(latent)
            if chain.mask:
                sources["mask"] = (chain.mask[0], "image")
            if latent_class == "VAEEncodeForInpaint":
                chain.grow_mask_by = values[latent]["grow_mask_by"]
        chain.init_image = reader.picture_of(encoder, model) if encoder else None
        if chain.init_image:
            sources["init_image"] = sources["size"] = (chain.init_image[0], "image")
        fields["kind"] = "inpaint" if chain.mask or latent_class != "VAEEncode" else "img2img"
        fields["strength"] = denoise

    if second is not None:
        if latent_class != "EmptyLatentImage":
            errors.refuse(sampler, "latent_image", "a hires fix's first pass must start from an EmptyLatentImage")
        _read_hires(reader, chain, second, upscale, model, skips.get("prompt", (None, None))[0])

    # 6. One VAE for every decode and encode: the model's own, or one VAELoader's.
    vaes = {name for _, name in reader.vaes.values()}
    if len(vaes) > 1:
        own = "the model's own"
        used = ", ".join(f"{node}: {name or own}" for node, (_, name) in reader.vaes.items())
        for node_id in reader.vaes:
            errors.refuse(node_id, "vae", f"the chain uses different VAEs ({used}); Spellbook uses one per job")
    elif vaes and None not in vaes:
        source, name = next(iter(reader.vaes.values()))
        fields["vae"] = name
        sources["vae"] = (source, "vae_name")
    errors.raise_if_any(outputs)

    # 7. The order ComfyUI would run the nodes in, for the websocket's `executing` messages.
    before = graph.upstream([sampler])
    chain.before = [n for n in before if n != sampler]
    chain.after = [n for n in graph.upstream(outputs) if n not in before]
    chain.classes = {n: graph.class_of(n) for n in graph.upstream(outputs)}
    return chain


def _read_hires(reader: _Reader, chain: Chain, second: str, upscale: str, model: str | None, skip: int | None) -> None:
    """The second KSampler of a hires-fix graph and its latent upscale, as the request's `hires`. What A1111's hires
    pass cannot vary (seed, cfg, sampler, scheduler, model, clip skip) must be the first pass's; refused by name."""
    graph, values, errors = reader.graph, reader.values, reader.errors
    first, up, again = values[chain.sampler], values[upscale], values[second]
    for name in ("seed", "cfg", "sampler_name", "scheduler"):
        if again[name] != first[name]:
            message = (f"the hires pass uses the first KSampler's {name} ({first[name]}, node {chain.sampler}); "
                       "a different one is not supported")  # fmt: skip
            errors.refuse(second, name, message, again[name])
    loader = reader.follow(second, "model", {"CheckpointLoaderSimple": 0}, "a CheckpointLoaderSimple's MODEL")
    if loader and model and checkpoint_name(values[loader]["ckpt_name"]) != model:
        errors.refuse(second, "model", f"the hires pass uses the first pass's model ({model})", [loader, 0])
    pixels = graph.class_of(upscale) in ("ImageScale", "ImageScaleBy")
    methods = COMFY_PIXEL_UPSCALERS if pixels else COMFY_LATENT_UPSCALERS
    method = up["upscale_method"]
    if method not in methods:
        kind = "pixel upscalers" if pixels else "latent modes"
        message = f"{method!r} is not one of the hires fix's {kind}: use {', '.join(methods)}"
        errors.refuse(upscale, "upscale_method", message, method)
    hires: dict[str, Any] = {"upscaler": methods.get(method, next(iter(methods.values()))), "steps": again["steps"],
                             "denoise": again["denoise"]}  # fmt: skip
    sources = chain.sources
    sources.update({"hires": (second, "latent_image"), "hires.steps": (second, "steps"),
                    "hires.denoise": (second, "denoise"), "hires.upscaler": (upscale, "upscale_method")})  # fmt: skip
    width, height = chain.fields.get("width") or 0, chain.fields.get("height") or 0
    kind = graph.class_of(upscale)
    if kind in ("LatentUpscaleBy", "ImageScaleBy"):
        sources["hires.width"] = sources["hires.scale"] = (upscale, "scale_by")
    else:
        sources["hires.width"], sources["hires.height"] = (upscale, "width"), (upscale, "height")
        if up["crop"] != "disabled":
            errors.refuse(upscale, "crop", "only 'disabled' is supported (the hires fix keeps the whole picture)")
        if not up["width"] and not up["height"]:
            errors.refuse(upscale, "width", "give a width or a height (both 0 keep the first pass's size)")
    size = comfy_upscale_size(kind, up, width, height) if width and height else None
    if size is not None:  # as ComfyUI sizes it (see infotext.comfy_upscale_size)
        hires["width"], hires["height"] = size
    for key, name in (("prompt", "positive"), ("negative_prompt", "negative")):
        encoder = reader.follow(second, name, {"CLIPTextEncode": 0}, "a CLIPTextEncode")
        if encoder is None:
            continue
        if reader.clip_skip(encoder, model)[0] != skip:
            errors.refuse(encoder, "clip", "the hires pass's prompts use the first pass's clip skip")
        if values[encoder]["text"] != chain.fields.get(key):
            hires[key] = values[encoder]["text"]
            sources[f"hires.{key}"] = (encoder, "text")
            chain.texts[f"hires.{key}"] = encoder
    chain.fields["hires"] = hires


# --------------------------------------------------------------------------------------------- uploads

_UPLOAD_NAME = re.compile(r"^\w[\w .()+,\-]{0,199}$")
_IMAGE_SUFFIX = re.compile(r"\.[A-Za-z0-9]{1,5}$")


def upload_folder(services: Services, who: Principal) -> Path:
    """Where the caller's ComfyUI uploads are kept (LoadImage finds them there by name; no one else sees them)."""
    owner = "local" if who.id is None else f"user-{who.id}"
    return services.settings.inputs_dir / "comfy" / owner


def _check_name(name: str, field: str) -> str:
    if not _UPLOAD_NAME.match(name) or name.endswith((" ", ".")):
        raise UserError(
            f"{name!r} is not an accepted file name: letters, digits, spaces and _ . ( ) + , - only, starting with a "
            "letter or digit, no paths",
            field=field,
        )
    return name


def _check_subfolder(subfolder: str, field: str) -> str:
    parts = [part for part in subfolder.replace("\\", "/").split("/") if part]
    if len(parts) > 4:
        raise UserError(f"subfolder {subfolder!r} is too deep: at most 4 levels", field=field)
    return "/".join(_check_name(part, field) for part in parts)


def list_uploads(services: Services, who: Principal) -> list[str]:
    """The caller's uploads as LoadImage names (`sub/name.png` in a subfolder), sorted."""
    folder = upload_folder(services, who)
    if not folder.is_dir():
        return []
    names = []
    for path in folder.rglob("*"):
        if path.is_file() and not any(part.startswith(".") for part in path.relative_to(folder).parts):
            names.append(path.relative_to(folder).as_posix())
    return sorted(names)


def _open_upload(services: Services, who: Principal, name: str, field: str) -> Image.Image:
    """An upload by the name listed for it (the name was checked against the caller's listing)."""
    path = upload_folder(services, who) / name
    image = decode_image_bytes(path.read_bytes(), field, services.settings.max_pixels)
    return ImageOps.exif_transpose(image)


def _mask_picture(image: Image.Image, channel: str, name: str) -> Image.Image:
    """ComfyUI's masks from a picture: white = repaint. Alpha: the transparent part; a colour: that channel."""
    if channel == "alpha" and "A" not in image.getbands():
        raise UserError(
            f"{name} has no transparency, so its alpha mask is empty: upload a picture whose area to repaint is "
            "transparent, or use LoadImageMask with a colour channel",
            field="mask",
        )
    rgba = image.convert("RGBA")
    mask = rgba.getchannel(channel[0].upper())
    if channel == "alpha":
        mask = ImageOps.invert(mask)
    if mask.getextrema() == (0, 0):
        raise UserError(f"the {channel} mask of {name} is empty: nothing would be repainted", field="mask")
    return mask


# --------------------------------------------------------------------------------------------- the request

_EMBEDDING = re.compile(r"(?<![\w:])embedding:([\w.+\-]+)")


def _embeddings_to_concepts(text: str, known: set[str]) -> str:
    """ComfyUI's `embedding:NAME` (file suffix optional) -> our `<NAME>`; an unknown name is refused."""

    def concept(match: re.Match) -> str:
        name = re.sub(r"\.(safetensors|pt|bin|ckpt|pth)$", "", match.group(1), flags=re.IGNORECASE)
        if name not in known:
            raise UserError(
                f"embedding:{name} is not a concept on this server (GET /embeddings lists them)", field="concepts"
            )
        return f"<{name}>"

    return _EMBEDDING.sub(concept, text)


def _grown(mask: Image.Image, pixels: int) -> Image.Image:
    """VAEEncodeForInpaint's grow_mask_by: a square dilation (an even size is taken as the next odd one)."""
    if pixels <= 0:
        return mask
    return mask.filter(ImageFilter.MaxFilter(pixels if pixels % 2 else pixels + 1))


def chain_request(services: Services, who: Principal, chain: Chain) -> ImageRequest:
    """The chain's ImageRequest: prompts with ComfyUI's embedding syntax read, uploads decoded under the pixel
    cap (the mask scaled to the picture, as ComfyUI scales it)."""
    fields = dict(chain.fields)
    known = {info.name for info in services.studio.concepts.for_owner(who.concepts_of).list()}
    for key in ("prompt", "negative_prompt"):
        if key in fields and "embedding:" in fields[key]:
            try:
                fields[key] = _embeddings_to_concepts(fields[key], known)
            except UserError as error:
                raise _refused_at(chain, key, error) from None
    if "hires" in fields:
        fields["hires"] = hires = dict(fields["hires"])
        for key in ("prompt", "negative_prompt"):
            if "embedding:" in hires.get(key, ""):
                try:
                    hires[key] = _embeddings_to_concepts(hires[key], known)
                except UserError as error:
                    raise _refused_at(chain, f"hires.{key}", error) from None
    request = ImageRequest(**fields)
    if chain.init_image is not None:
        _, name = chain.init_image
        try:
            picture = _open_upload(services, who, name, "init_image")
        except SpellbookError as error:
            raise _refused_at(chain, "init_image", error) from None
        request = request.with_(init_image=picture.convert("RGB"))
        if chain.mask is not None:
            _, mask_name, channel = chain.mask
            try:
                mask = _mask_picture(_open_upload(services, who, mask_name, "mask"), channel, mask_name)
            except SpellbookError as error:
                raise _refused_at(chain, "mask", error) from None
            if mask.size != picture.size:
                mask = mask.resize(picture.size, Image.Resampling.BILINEAR)
            request = request.with_(mask=_grown(mask, chain.grow_mask_by))
    return request


def _refused_at(chain: Chain, our_field: str | None, error: SpellbookError) -> SpellbookError:
    """An error from planning, said at the node and input it came from; errors that are not about the graph
    (credits, rate limits, sizes of uploads) stay as they are."""
    if not isinstance(error, (UserError, NotFound, Refused)) or isinstance(error, GraphRefused):
        return error
    key = {"width": "size", "height": "size", "concepts": "prompt"}.get(our_field or "", our_field)
    node_id, input_name = chain.sources.get(key or "", (chain.sampler, our_field or "inputs"))
    errors = _NodeErrors(_Graph({}))
    errors.first_field = f"prompt.{node_id}.inputs.{input_name}"
    details = f"{input_name}: {error.message}"
    errors.by_node[node_id] = {
        "errors": [comfy_error("invalid_value", "Value not accepted", details, input_name=input_name)],
        "dependent_outputs": sorted(chain.outputs, key=_node_order),
        "class_type": chain.classes.get(node_id),
    }
    failed = comfy_error("prompt_outputs_failed_validation", "Prompt outputs failed validation", details)
    return GraphRefused(failed, errors.by_node, field=errors.first_field)


# --------------------------------------------------------------------------------------------- state


class ComfyHub:
    """What the websocket needs that the store does not keep: which client asked for which prompt, and ComfyUI's
    queue numbers. One per app (`hub_of`); a restart loses nothing a client could still be waiting on (a socket
    also follows the caller's unfinished prompts with its client id from the store)."""

    KEEP_SECONDS = 6 * 3600

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.number = 0
        self.prompts: dict[tuple[int | None, str], dict[str, float]] = {}

    def next_number(self) -> int:
        with self.lock:
            number = self.number
            self.number += 1
            return number

    def register(self, owner: int | None, client_id: str, prompt_id: str) -> None:
        now = time.time()
        with self.lock:
            for key in list(self.prompts):
                kept = {p: t for p, t in self.prompts[key].items() if now - t < self.KEEP_SECONDS}
                if kept:
                    self.prompts[key] = kept
                else:
                    del self.prompts[key]
            self.prompts.setdefault((owner, client_id), {})[prompt_id] = now

    def prompts_of(self, owner: int | None, client_id: str) -> list[str]:
        with self.lock:
            return list(self.prompts.get((owner, client_id), {}))


_HUB_LOCK = threading.Lock()  # guards only the creation of each app's hub


def hub_of(app: Any) -> ComfyHub:
    with _HUB_LOCK:
        hub = getattr(app.state, "comfy_hub", None)
        if hub is None:
            hub = app.state.comfy_hub = ComfyHub()
        return hub


# --------------------------------------------------------------------------------------------- answers


def _ms(seconds: float | None) -> int:
    return int((seconds or time.time()) * 1000)


def _images(job: Job, kind: str) -> list[dict[str, str]]:
    """A done job's PNGs as ComfyUI lists them: the subfolder is the prompt id, which /view needs to find them."""
    return [
        {"filename": Path(record["path"]).name, "subfolder": job.id, "type": kind}
        for record in (job.result or {}).get("images", [])
    ]


def _queue_item(job: Job) -> list:
    comfy = job.request["comfy"]
    extra = {"client_id": comfy["client_id"]} if comfy.get("client_id") else {}
    return [comfy["number"], job.id, comfy["graph"], extra, list(comfy["outputs"])]


def _ending(job: Job) -> tuple[str, dict[str, Any]]:
    """The message that ends a prompt: execution_success / execution_error / execution_interrupted."""
    comfy = job.request["comfy"]
    base = {"prompt_id": job.id, "timestamp": _ms(job.finished)}
    if job.state == "done":
        return "execution_success", base
    sampler = comfy["sampler"]
    node_type = comfy["graph"].get(sampler, {}).get("class_type")
    where = {"node_id": sampler, "node_type": node_type, "executed": []}
    if job.state == "cancelled":
        return "execution_interrupted", {**base, **where}
    error = job.error or {}
    return "execution_error", {
        **base,
        **where,
        "exception_message": error.get("message", f"the job {job.state}"),
        "exception_type": f"spellbook.{error.get('code', 'error')}",
        "traceback": [],
        "current_inputs": {},
        "current_outputs": {},
    }


def history_entry(job: Job) -> dict[str, Any]:
    """A finished prompt as ComfyUI's /history shows it."""
    comfy = job.request["comfy"]
    done = job.state == "done"
    outputs = {node: {"images": _images(job, kind)} for node, kind in comfy["outputs"].items()} if done else {}
    start = {"prompt_id": job.id, "timestamp": _ms(job.started or job.created)}
    messages = [["execution_start", start], ["execution_cached", {"nodes": [], **start}], list(_ending(job))]
    return {
        "prompt": _queue_item(job),
        "outputs": outputs,
        "status": {"status_str": "success" if done else "error", "completed": done, "messages": messages},
        "meta": {
            node: {"node_id": node, "display_node": node, "parent_node": None, "real_node_id": node} for node in outputs
        },
    }


def _comfy_job(services: Services, who: Principal, prompt_id: str) -> Job:
    job = services.queue.get(prompt_id, viewer=who.id, admin=who.admin)  # another's: 404, as if it did not exist
    if "comfy" not in job.request:
        raise NotFound(
            f"job {prompt_id} was not submitted over the ComfyUI API; see /api/v1/jobs/{prompt_id}", field="prompt_id"
        )
    return job


def active_prompts(services: Services, who: Principal) -> list[Job]:
    """The caller's ComfyUI prompts that are queued or running (everyone's for the local user), oldest first."""
    rows = services.db.execute(
        "SELECT id FROM jobs WHERE state IN ('queued', 'running') AND (owner IS ? OR ?) "
        "AND json_extract(request, '$.comfy') IS NOT NULL ORDER BY created",
        (who.id, who.user is None),
    ).fetchall()
    return [services.queue.get(row[0]) for row in rows]


def queue_info(services: Services, who: Principal) -> dict[str, Any]:
    return {"exec_info": {"queue_remaining": len(active_prompts(services, who))}}


# --------------------------------------------------------------------------------------------- routes

_routes = APIRouter()
PromptId = Annotated[str, PathParam(min_length=1, max_length=64, description="prompt id (the job id)")]


class PromptBody(BaseModel):
    """ComfyUI's POST /prompt body. `extra_data` may carry `client_id`; its other keys (such as the UI's
    `extra_pnginfo` workflow) are not written into the PNGs, which carry Spellbook's recipe and A1111 infotext."""

    model_config = ConfigDict(extra="allow")

    prompt: dict[str, Any] | None = Field(None, description="the graph in ComfyUI's API format")
    client_id: str | None = Field(None, max_length=200, description="the /ws clientId that receives its progress")
    extra_data: dict[str, Any] = Field(default_factory=dict)
    number: float | None = Field(None, description="not supported: Spellbook's queue is fair across users")
    front: bool | None = Field(None, description="not supported: Spellbook's queue is fair across users")


def _lists(services: Services, who: Principal) -> Lists:
    return Lists(
        checkpoints=[entry.name for entry in services.studio.cache.registry.list()],
        samplers=runnable_samplers(),
        schedulers=runnable_schedulers(),
        uploads=list_uploads(services, who),
        vaes=services.studio.cache.vae_names(),
    )


def _prompt_body_schema() -> dict[str, Any]:
    """PromptBody's schema as clients must send it: `prompt` required and a graph (an object), which the
    model leaves optional only so that its absence gets ComfyUI's own `no_prompt` error."""
    schema = PromptBody.model_json_schema()
    schema["properties"]["prompt"] = {"type": "object", "description": "the graph in ComfyUI's API format"}
    return {**schema, "required": ["prompt"]}


_PROMPT_SCHEMA = {"required": True, "content": {"application/json": {"schema": _prompt_body_schema()}}}
# ComfyUI's own 400: a graph error names its nodes (what its clients read); other 400s are Spellbook's shape.
_COMFY_400 = {
    "description": "the graph was refused: ComfyUI's error shape with node_errors, or Spellbook's error shape",
    "content": {
        "application/json": {
            "schema": {
                "anyOf": [
                    {
                        "type": "object",
                        "required": ["error", "node_errors"],
                        "properties": {
                            "error": {
                                "type": "object",
                                "required": ["type", "message"],
                                "properties": {
                                    "type": {"type": "string"},
                                    "message": {"type": "string"},
                                    "details": {"type": "string"},
                                    "extra_info": {"type": "object"},
                                },
                            },
                            "node_errors": {"type": "object"},
                        },
                    },
                    {"$ref": "#/components/schemas/Error"},
                ]
            }
        }
    },
}
_EMPTY_200 = {200: {"description": "done (an empty body, as ComfyUI answers)", "content": {}}}


@_routes.post("/prompt", openapi_extra={"requestBody": _PROMPT_SCHEMA}, responses={400: _COMFY_400})
async def post_prompt(request: Request, who: Caller) -> dict[str, Any]:
    """Queue a graph: it is read into one job (paid now, refunded if it fails); `prompt_id` is the job's id.

    The body is JSON whatever its Content-Type says, as ComfyUI reads it (SillyTavern sends it as text/plain)."""
    try:
        data = json.loads(await request.body())
    except (ValueError, UnicodeDecodeError):
        raise UserError('the body is not JSON: send {"prompt": {…}, "client_id": "…"}', field="body") from None
    try:
        body = PromptBody.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        path = ".".join(str(part) for part in first["loc"]) or None
        raise UserError(f"{path}: {first['msg']}" if path else str(first["msg"]), field=path) from None
    return await run_in_threadpool(queue_prompt, request, who, body)


def queue_prompt(request: Request, who: Principal, body: PromptBody) -> dict[str, Any]:
    """POST /prompt's work, in the thread pool: read, plan, pay, queue."""
    services = services_of(request)
    # 1. Check inputs: what ComfyUI's queue would do that ours will not.
    for name, value in (("front", body.front), ("number", body.number)):
        if value:
            raise UserError(
                f"{name} is not supported: Spellbook's queue orders prompts fairly across users, without priorities",
                field=name,
            )
    if body.prompt is None:
        raise GraphRefused(comfy_error("no_prompt", "No prompt provided", "No prompt provided"), {}, field="prompt")
    client_id = body.client_id or body.extra_data.get("client_id")
    if client_id is not None and (not isinstance(client_id, str) or len(client_id) > 200):
        raise UserError("client_id must be a string of at most 200 characters", field="client_id")
    # 2. Read the graph: nodes, inputs, then the one chain they make.
    graph, outputs = parse_graph(body.prompt)
    values = validate_inputs(graph, outputs, _lists(services, who))
    chain = read_graph(graph, outputs, values)
    # 3. The request, planned and paid like every other API's.
    image_request = chain_request(services, who, chain)
    number = hub_of(request.app).next_number()
    extra = {
        "comfy": {
            "number": number,
            "client_id": client_id,
            "graph": body.prompt,
            "outputs": chain.outputs,
            "sampler": chain.sampler,
            "before": chain.before,
            "after": chain.after,
        }
    }
    try:
        job = submit(services, who, image_request, extra=extra)
    except SpellbookError as error:
        raise _refused_at(chain, error.field, error) from None
    if client_id:
        hub_of(request.app).register(who.id, client_id, job.id)
    return {"prompt_id": job.id, "number": number, "node_errors": {}}


@_routes.get("/prompt")
def get_prompt(request: Request, who: Caller) -> dict[str, Any]:
    """`{"exec_info": {"queue_remaining": n}}`: the caller's prompts queued or running."""
    return queue_info(services_of(request), who)


@_routes.get("/history/{prompt_id}")
def history_of(prompt_id: PromptId, request: Request, who: Caller) -> dict[str, Any]:
    """`{prompt_id: {prompt, outputs, status, meta}}` once it ended; `{}` while it is queued or running."""
    job = _comfy_job(services_of(request), who, prompt_id)
    return {job.id: history_entry(job)} if job.state in FINAL else {}


@_routes.get("/history")
def history(request: Request, who: Caller, max_items: Annotated[int, Query(ge=1, le=1000)] = 100) -> dict[str, Any]:
    """The caller's last `max_items` finished prompts, oldest first (ComfyUI's order)."""
    services = services_of(request)
    rows = services.db.execute(
        "SELECT id FROM jobs WHERE state IN ('done', 'failed', 'cancelled') AND (owner IS ? OR ?) "
        "AND json_extract(request, '$.comfy') IS NOT NULL ORDER BY created DESC LIMIT ?",
        (who.id, who.user is None, max_items),
    ).fetchall()
    jobs = [services.queue.get(row[0]) for row in reversed(rows)]
    return {job.id: history_entry(job) for job in jobs}


@_routes.get("/queue")
def get_queue(request: Request, who: Caller) -> dict[str, Any]:
    """`queue_running` and `queue_pending`: the caller's prompts as ComfyUI's queue items."""
    jobs = active_prompts(services_of(request), who)
    return {
        "queue_running": [_queue_item(job) for job in jobs if job.state == "running"],
        "queue_pending": [_queue_item(job) for job in jobs if job.state == "queued"],
    }


class QueueBody(BaseModel):
    model_config = ConfigDict(strict=True)  # `clear: 0` is not `false`: the schema says boolean

    clear: bool = False
    delete: list[str] = Field(default_factory=list, max_length=1000)


@_routes.post("/queue", response_class=Response, responses=_EMPTY_200)
def post_queue(body: QueueBody, request: Request, who: Caller) -> Response:
    """`{"clear": true}` cancels the caller's pending prompts, `{"delete": [ids]}` those (refunded)."""
    services = services_of(request)
    for prompt_id in body.delete:
        _comfy_job(services, who, prompt_id)  # another's or unknown: 404
    pending = [job for job in active_prompts(services, who) if job.state == "queued"]
    chosen = pending if body.clear else [job for job in pending if job.id in set(body.delete)]
    _cancel(services, who, chosen)
    return Response(status_code=200)


class InterruptBody(BaseModel):
    prompt_id: str | None = Field(None, max_length=64)


@_routes.post("/interrupt", response_class=Response, responses=_EMPTY_200)
def interrupt(request: Request, who: Caller, body: InterruptBody | None = None) -> Response:
    """Cancel the caller's running prompts, or only `prompt_id` (refunded)."""
    services = services_of(request)
    running = [job for job in active_prompts(services, who) if job.state == "running"]
    if body is not None and body.prompt_id:
        _comfy_job(services, who, body.prompt_id)
        running = [job for job in running if job.id == body.prompt_id]
    _cancel(services, who, running)
    return Response(status_code=200)


def _cancel(services: Services, who: Principal, jobs: list[Job]) -> None:
    for job in jobs:
        try:
            services.queue.cancel(job.id, viewer=who.id, admin=who.admin)
        except Conflict:
            pass  # it ended meanwhile: nothing left to cancel


@_routes.get("/view", response_class=FileResponse)
def view(
    request: Request,
    who: Caller,
    filename: Annotated[str, Query(min_length=1, max_length=255)],
    subfolder: Annotated[str, Query(max_length=255)] = "",
    kind: Annotated[Literal["output", "temp", "input"], Query(alias="type")] = "output",
    channel: Annotated[str | None, Query(pattern="^(rgba)?$", description="only rgba (the whole picture)")] = None,
    preview: Annotated[
        str | None, Query(max_length=30, pattern=r"^(webp|jpeg|png)(;\d{1,3})?$", description="e.g. webp;90")
    ] = None,
):
    """A picture: a prompt's PNG (type output/temp, subfolder = its prompt id) or one of the caller's uploads
    (type input). Only names this server listed for the caller are served; nothing is read by path."""
    services = services_of(request)
    if channel not in (None, "", "rgba"):
        raise UserError("only the whole picture (channel rgba) is served", field="channel")
    if kind in ("output", "temp"):
        job = _comfy_job(services, who, subfolder) if subfolder else None
        for record in (job.result or {}).get("images", []) if job else []:
            if Path(record["path"]).name == filename:
                path = services.settings.home / record["path"]
                return _preview(path, preview) if preview else FileResponse(path, media_type="image/png")
        raise NotFound(f"no image {filename!r} in prompt {subfolder!r}", field="filename")
    # Looked up in the caller's own listing, never opened by the name given: a name that is not there (a path,
    # '..', a name an upload could not have) is simply not found.
    name = "/".join(part for part in (subfolder.strip("/"), filename) if part)
    if name not in list_uploads(services, who):
        raise NotFound(f"no upload {name!r}", field="filename")
    path = upload_folder(services, who) / name
    if preview:
        return _preview(path, preview)
    with Image.open(path) as image:
        media_type = Image.MIME.get(image.format or "", "application/octet-stream")
    return FileResponse(path, media_type=media_type)


def _preview(path: Path, preview: str) -> Response:
    """ComfyUI's `preview=format;quality`: the picture re-encoded (webp, jpeg or png), quality 1-100."""
    kind, _, quality = preview.partition(";")
    with Image.open(path) as image:
        picture = image.convert("RGB") if kind == "jpeg" else image.copy()
    buffer = io.BytesIO()
    picture.save(buffer, format=kind.upper(), quality=min(100, max(1, int(quality or 90))))
    return Response(buffer.getvalue(), media_type=f"image/{kind}")


@_routes.post("/upload/image")
def upload_image(
    request: Request,
    who: Caller,
    image: Annotated[UploadFile, File(description="a PNG, JPEG or WebP picture")],
    overwrite: Annotated[str | None, Form(max_length=10)] = None,
    subfolder: Annotated[str, Form(max_length=200)] = "",
    kind: Annotated[
        Literal["input"], Form(alias="type", description="uploads are kept as input (LoadImage)")
    ] = "input",
) -> dict[str, str]:
    """Keep a picture for LoadImage / LoadImageMask under its own name (decoded under the pixel cap first). An
    existing name is kept unless `overwrite` is true: a different picture gets `name (1).png`, the same one its
    old name."""
    services = services_of(request)
    services.limiter.check(who.name)
    raw_name = (image.filename or "").replace("\\", "/").rsplit("/", 1)[-1]
    name = _check_name(raw_name, "image")
    folder = _check_subfolder(subfolder, "subfolder")
    data = image.file.read()
    decode_image_bytes(data, "image", services.settings.max_pixels)  # refused before anything is kept
    target_dir = upload_folder(services, who) / folder if folder else upload_folder(services, who)
    target_dir.mkdir(parents=True, exist_ok=True)
    target = target_dir / name
    if overwrite not in ("true", "1"):
        stem, suffix = (name[: -len(m.group())], m.group()) if (m := _IMAGE_SUFFIX.search(name)) else (name, "")
        number = 1
        while target.exists() and target.read_bytes() != data:
            target = target_dir / f"{stem} ({number}){suffix}"
            number += 1
    if not (target.exists() and target.read_bytes() == data):
        temporary = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
        temporary.write_bytes(data)
        os.replace(temporary, target)
    return {"name": target.name, "subfolder": folder, "type": "input"}


def node_info(name: str, spec: NodeSpec, lists: Lists) -> dict[str, Any]:
    """One node as ComfyUI's object_info shows it."""
    inputs: dict[str, Any] = {"required": {key: _config_json(config, lists) for key, config in spec.inputs.items()}}
    if spec.output_node:
        inputs["hidden"] = HIDDEN_OUTPUT_INPUTS
    return {
        "input": inputs,
        "input_order": {group: list(entries) for group, entries in inputs.items()},
        "output": list(spec.outputs),
        "output_is_list": [False] * len(spec.outputs),
        "output_name": list(spec.output_names or spec.outputs),
        "name": name,
        "display_name": spec.display_name,
        "description": spec.does,
        "python_module": "nodes",
        "category": spec.category,
        "output_node": spec.output_node,
    }


@_routes.get("/object_info")
def object_info(request: Request, who: Caller) -> dict[str, Any]:
    """The nodes Spellbook runs, in ComfyUI's shape: ckpt_name lists our models, sampler_name and scheduler the
    ComfyUI names we map, LoadImage's image the caller's uploads."""
    lists = _lists(services_of(request), who)
    return {name: node_info(name, spec, lists) for name, spec in {**NODES, **LISTED_ONLY}.items()}


@_routes.get("/object_info/{node_class}")
def object_info_of(node_class: Annotated[str, PathParam(max_length=100)], request: Request, who: Caller) -> dict:
    """One node's info; `{}` for a node Spellbook does not run (as ComfyUI answers for an unknown class)."""
    listed = {**NODES, **LISTED_ONLY}
    if node_class not in listed:
        return {}
    return {node_class: node_info(node_class, listed[node_class], _lists(services_of(request), who))}


@_routes.get("/embeddings")
def embeddings(request: Request, who: Caller) -> list[str]:
    """The concepts the caller's prompts can use (write `embedding:NAME` or `<NAME>`)."""
    return [info.name for info in services_of(request).studio.concepts.for_owner(who.concepts_of).list()]


@_routes.get("/models")
def model_folders(_who: Caller) -> list[str]:
    return ["checkpoints", "embeddings"]


@_routes.get("/models/{folder}")
def models_in(folder: Annotated[str, PathParam(max_length=50)], request: Request, who: Caller) -> list[str]:
    """`checkpoints`: our model names (what ckpt_name takes); `embeddings`: concept names."""
    if folder == "checkpoints":
        return [entry.name for entry in services_of(request).studio.cache.registry.list()]
    if folder == "embeddings":
        return embeddings(request, who)
    raise NotFound(f"no model folder {folder!r}; there are checkpoints and embeddings", field="folder")


@_routes.get("/system_stats")
def system_stats(request: Request, _who: Caller) -> dict[str, Any]:
    """ComfyUI's system_stats. The devices entry names the configured device; its memory figures are 0, since the
    API process never touches the accelerator (the workers do)."""
    import torch

    services = services_of(request)
    device = services.settings.device
    pages = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 0
    total = pages * os.sysconf("SC_PHYS_PAGES") if pages else 0
    free = pages * os.sysconf("SC_AVPHYS_PAGES") if pages else 0
    return {
        "system": {
            "os": os.name,
            "ram_total": total,
            "ram_free": free,
            "comfyui_version": f"spellbook {__version__}",
            "python_version": sys.version,
            "pytorch_version": torch.__version__,
            "embedded_python": False,
            "argv": ["spellbook", "serve"],
        },
        "devices": [
            {
                "name": device,
                "type": device.split(":")[0],
                "index": int(device.split(":")[1]) if device.count(":") == 1 and device.split(":")[1].isdigit() else 0,
                "vram_total": 0,
                "vram_free": 0,
                "torch_vram_total": 0,
                "torch_vram_free": 0,
            }
        ],
    }


# --------------------------------------------------------------------------------------------- websocket


def socket_caller(websocket: WebSocket, services: Services) -> Principal:
    """The websocket's caller, by the rules every request follows (app.principal and the HostCheck middleware,
    which see HTTP requests only): the Host must name this server without auth; a browser page from another
    origin may not listen in; a token (Bearer or the session cookie) or Basic password when auth is on."""
    settings = services.settings
    host = websocket.headers.get("host", "")
    if not services.auth and not allowed_host(host, settings.host, tuple(settings.allowed_hosts.split(","))):
        raise Forbidden(f"this server does not answer to the name {host!r} without authentication", field="host")
    origin = websocket.headers.get("origin")
    if origin and (origin == "null" or urlsplit(origin).netloc != host):
        raise Forbidden(f"websocket connections from origin {origin} are not accepted", field="origin")
    if not services.auth and not (websocket.headers.get("authorization") or websocket.cookies.get(SESSION_COOKIE)):
        return LOCAL
    return authenticate(websocket, services.accounts, required=services.auth, limiter=services.signin_limiter)


@dataclass
class _Track:
    phase: int = 0  # 0: nothing sent, 1: started, 2: ended
    progress: tuple[int, int] = (0, 0)


class Follower:
    """Turns the store's view of one client's prompts into ComfyUI's websocket messages, poll by poll."""

    def __init__(self, services: Services, who: Principal, hub: ComfyHub, client_id: str):
        self.services, self.who, self.hub, self.client_id = services, who, hub, client_id
        self.tracks: dict[str, _Track] = {}
        self.remaining: int | None = None
        # Prompts with this client id that had ended before the socket connected are not told again; the
        # unfinished ones (also those queued before a restart) are followed.
        for prompt_id in hub.prompts_of(who.id, client_id):
            if services.queue.get(prompt_id).state in FINAL:
                self.tracks[prompt_id] = _Track(phase=2)
        for job in active_prompts(services, who):
            if job.owner == who.id and job.request["comfy"].get("client_id") == client_id:
                self.tracks.setdefault(job.id, _Track())

    def status(self, sid: str | None = None) -> dict[str, Any]:
        info = queue_info(self.services, self.who)
        self.remaining = info["exec_info"]["queue_remaining"]
        return {"type": "status", "data": {"status": info, **({"sid": sid} if sid else {})}}

    def poll(self) -> list[dict[str, Any]]:
        messages: list[dict[str, Any]] = []
        for prompt_id in self.hub.prompts_of(self.who.id, self.client_id):
            self.tracks.setdefault(prompt_id, _Track())
        if queue_info(self.services, self.who)["exec_info"]["queue_remaining"] != self.remaining:
            messages.append(self.status())
        for prompt_id, track in self.tracks.items():
            if track.phase < 2:
                messages += self._advance(self.services.queue.get(prompt_id), track)
        return messages

    def _advance(self, job: Job, track: _Track) -> list[dict[str, Any]]:
        if job.state == "queued":
            return []
        comfy, pid = job.request["comfy"], job.id
        sampler = comfy["sampler"]
        messages: list[dict[str, Any]] = []

        def send(kind: str, **data: Any) -> None:
            messages.append({"type": kind, "data": data})

        def executing(node: str | None) -> None:
            send("executing", node=node, **({"display_node": node} if node else {}), prompt_id=pid)

        if track.phase == 0:
            started = _ms(job.started or job.created)
            send("execution_start", prompt_id=pid, timestamp=started)
            send("execution_cached", nodes=[], prompt_id=pid, timestamp=started)
            if job.state in ("running", "done"):
                for node in [*comfy["before"], sampler]:
                    executing(node)
            track.phase = 1
        if job.state == "running":
            step, total = self._progress(job)
            if total and (step, total) != track.progress:
                send("progress", value=step, max=total, prompt_id=pid, node=sampler)
                track.progress = (step, total)
            return messages
        if job.state == "done":
            step, total = track.progress
            if total == 0 or step < total:
                total = total or job.recipe.steps
                send("progress", value=total, max=total, prompt_id=pid, node=sampler)
            for node in comfy["after"]:
                executing(node)
                if node in comfy["outputs"]:
                    send(
                        "executed",
                        node=node,
                        display_node=node,
                        output={"images": _images(job, comfy["outputs"][node])},
                        prompt_id=pid,
                    )
        kind, data = _ending(job)
        send(kind, **data)
        executing(None)
        track.phase = 2
        return messages

    def _progress(self, job: Job) -> tuple[int, int]:
        live = self.services.live(job.id)
        if live is not None and live.total:
            return live.step, live.total
        steps = job.recipe.steps  # scale-out: the fraction the worker's heartbeat reported
        return round(job.progress * steps), steps


async def _until_closed(websocket: WebSocket) -> None:
    """Read (and drop: ComfyUI's server acts on none of them) what the client sends, until it disconnects."""
    while True:
        message = await websocket.receive()
        if message["type"] == "websocket.disconnect":
            return


@_routes.websocket("/ws")
async def comfy_socket(
    websocket: WebSocket, client_id: Annotated[str | None, Query(alias="clientId", max_length=200)] = None
):
    """ComfyUI's messages for this client's prompts: status, execution_start, execution_cached, executing,
    progress, executed, execution_success / execution_error / execution_interrupted, then executing null."""
    services: Services = websocket.app.state.services
    try:
        who = socket_caller(websocket, services)
    except SpellbookError as error:
        if "websocket.http.response" in websocket.scope.get("extensions", {}):
            await websocket.send_denial_response(JSONResponse(error.to_dict(), status_code=error.http_status))
        else:
            await websocket.close(code=1008, reason=str(error)[:120])
        return
    await websocket.accept()
    sid = client_id or uuid.uuid4().hex
    follower = Follower(services, who, hub_of(websocket.app), sid)
    closed = asyncio.ensure_future(_until_closed(websocket))
    try:
        await websocket.send_json(follower.status(sid))
        while not services.stopping.is_set():
            for message in follower.poll():
                await websocket.send_json(message)
            done, _ = await asyncio.wait({closed}, timeout=0.2)
            if done:
                return
        await websocket.close(code=1001)  # the server is shutting down
    except WebSocketDisconnect:
        return
    finally:
        if closed.done() and not closed.cancelled():
            closed.exception()  # read, so asyncio does not report it: the client went away
        closed.cancel()


# ComfyUI serves every route both at / and under /api (Open WebUI uploads to /api/upload/image).
router = APIRouter(tags=["comfyui"])
router.include_router(_routes)
router.include_router(_routes, prefix="/api", include_in_schema=False)
