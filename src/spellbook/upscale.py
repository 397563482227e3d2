"""Model upscalers: ESRGAN-family RRDBNet (the original ESRGAN key layout and Real-ESRGAN's, 1x/2x/4x) from
.safetensors, and the plain resamplers (Lanczos, Nearest). Our own small architecture code: spandrel, which
reads these files elsewhere, needs torchvision, which does not install beside our torch.

Large pictures go through the network in tiles (`tile` input pixels a side, overlapping by `overlap`, the seams
feathered), so memory follows the tile, not the picture.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from spellbook.errors import UserError

RESAMPLERS = {"Lanczos": Image.Resampling.LANCZOS, "Nearest": Image.Resampling.NEAREST}


def _torch():
    import torch

    return torch


def build_rrdbnet(in_ch: int, out_ch: int, nf: int, nb: int, gc: int, upsamples: int, unshuffle: int):
    """RRDBNet as Real-ESRGAN names it (conv_first, body.N.rdbK.convM, conv_body, conv_upN, conv_hr, conv_last):
    `unshuffle` folds the input (Real-ESRGAN x2: 2, x1: 4) before `upsamples` nearest x2 stages."""
    torch = _torch()
    nn, functional = torch.nn, torch.nn.functional

    class ResidualDenseBlock(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(nf, gc, 3, 1, 1)
            self.conv2 = nn.Conv2d(nf + gc, gc, 3, 1, 1)
            self.conv3 = nn.Conv2d(nf + 2 * gc, gc, 3, 1, 1)
            self.conv4 = nn.Conv2d(nf + 3 * gc, gc, 3, 1, 1)
            self.conv5 = nn.Conv2d(nf + 4 * gc, nf, 3, 1, 1)

        def forward(self, x):
            lrelu = functional.leaky_relu
            x1 = lrelu(self.conv1(x), 0.2)
            x2 = lrelu(self.conv2(torch.cat((x, x1), 1)), 0.2)
            x3 = lrelu(self.conv3(torch.cat((x, x1, x2), 1)), 0.2)
            x4 = lrelu(self.conv4(torch.cat((x, x1, x2, x3), 1)), 0.2)
            return self.conv5(torch.cat((x, x1, x2, x3, x4), 1)) * 0.2 + x

    class RRDB(nn.Module):
        def __init__(self):
            super().__init__()
            self.rdb1, self.rdb2, self.rdb3 = ResidualDenseBlock(), ResidualDenseBlock(), ResidualDenseBlock()

        def forward(self, x):
            return self.rdb3(self.rdb2(self.rdb1(x))) * 0.2 + x

    class RRDBNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.unshuffle = unshuffle
            self.conv_first = nn.Conv2d(in_ch * unshuffle * unshuffle, nf, 3, 1, 1)
            self.body = nn.Sequential(*[RRDB() for _ in range(nb)])
            self.conv_body = nn.Conv2d(nf, nf, 3, 1, 1)
            for i in range(upsamples):
                setattr(self, f"conv_up{i + 1}", nn.Conv2d(nf, nf, 3, 1, 1))
            self.upsamples = upsamples
            self.conv_hr = nn.Conv2d(nf, nf, 3, 1, 1)
            self.conv_last = nn.Conv2d(nf, out_ch, 3, 1, 1)

        def forward(self, x):
            feat = functional.pixel_unshuffle(x, self.unshuffle) if self.unshuffle > 1 else x
            feat = self.conv_first(feat)
            feat = feat + self.conv_body(self.body(feat))
            for i in range(self.upsamples):
                up = functional.interpolate(feat, scale_factor=2, mode="nearest")
                feat = functional.leaky_relu(getattr(self, f"conv_up{i + 1}")(up), 0.2)
            return self.conv_last(functional.leaky_relu(self.conv_hr(feat), 0.2))

    return RRDBNet()


_OLD_BODY = re.compile(r"^model\.1\.sub\.(\d+)\.RDB(\d)\.conv(\d)\.0\.(weight|bias)$")
_OLD_TOP = re.compile(r"^model\.(\d+)\.(weight|bias)$")


def to_new_layout(state: dict) -> dict:
    """Real-ESRGAN's key names from the original ESRGAN's (`model.0`, `model.1.sub.N.RDBk.convM.0`, the trunk
    conv `model.1.sub.NB`, then the upsampling convs, HRconv and the last conv in order); a `params_ema.` or
    `params.` prefix (BasicSR's checkpoints) is dropped. A state already in the new layout comes back as is."""
    state = {re.sub(r"^(params_ema|params)\.", "", key): value for key, value in state.items()}
    if "conv_first.weight" in state:
        return state
    if "model.0.weight" not in state:
        raise UserError("not an ESRGAN / Real-ESRGAN (RRDBNet) state dict: no conv_first or model.0", field="upscaler")
    new, trunk, tops = {}, None, []
    blocks = {int(m.group(1)) for key in state if (m := _OLD_BODY.match(key))}
    subs = {int(key.split(".")[3]) for key in state if key.startswith("model.1.sub.") and key.count(".") == 4}
    trunk = max(subs - blocks) if subs - blocks else None
    for key, value in state.items():
        if match := _OLD_BODY.match(key):
            block, rdb, conv, kind = match.groups()
            new[f"body.{block}.rdb{rdb}.conv{conv}.{kind}"] = value
        elif trunk is not None and key.startswith(f"model.1.sub.{trunk}."):
            new[f"conv_body.{key.rsplit('.', 1)[1]}"] = value
        elif match := _OLD_TOP.match(key):
            tops.append((int(match.group(1)), match.group(2), value))
    order = sorted({index for index, _, _ in tops})
    if len(order) < 3 or order[0] != 0:
        raise UserError("an old-layout ESRGAN needs model.0, the upsampling convs, HRconv and the last conv",
                        field="upscaler")  # fmt: skip
    names = ["conv_first", *[f"conv_up{i + 1}" for i in range(len(order) - 3)], "conv_hr", "conv_last"]
    rename = dict(zip(order, names, strict=True))
    for index, kind, value in tops:
        new[f"{rename[index]}.{kind}"] = value
    return new


@dataclass
class ModelUpscaler:
    """An RRDBNet read from a file: its name, scale (output / input side) and content hash."""

    name: str
    net: object
    scale: int
    sha256: str

    def upscale(self, image: Image.Image, tile: int = 256, overlap: int = 16) -> Image.Image:
        """The picture `scale` times larger, through the network tile by tile."""
        return _tiled(self.net, image.convert("RGB"), self.scale, tile, overlap)


def load_model_upscaler(path: Path) -> ModelUpscaler:
    """An ESRGAN / Real-ESRGAN .safetensors (pickled .pth files are refused: convert them first)."""
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise UserError(
            f"{path.name}: upscalers are read from .safetensors only (a .pth is a pickle, which can run code)",
            field="upscaler",
            hint="convert it once where you trust it: safetensors.torch.save_file(torch.load(p), 'x.safetensors')",
        )
    if not path.is_file():
        raise UserError(f"{path} does not exist", field="upscaler")
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = to_new_layout(load_file(str(path)))
        nf, in_folded = state["conv_first.weight"].shape[:2]
        out_ch = state["conv_last.weight"].shape[0]
        nb = len({key.split(".")[1] for key in state if key.startswith("body.")})
        gc = state["body.0.rdb1.conv1.weight"].shape[0]
        upsamples = len({key.split(".")[0] for key in state if key.startswith("conv_up")})
        unshuffle = {3: 1, 12: 2, 48: 4}[int(in_folded)]
        net = build_rrdbnet(3, int(out_ch), int(nf), nb, int(gc), upsamples, unshuffle)
        net.load_state_dict(state, strict=True)
    except UserError:
        raise
    except (KeyError, RuntimeError, ValueError, IndexError, SafetensorError) as error:  # not an RRDBNet we can build
        raise UserError(
            f"{path.name} is not an ESRGAN / Real-ESRGAN (RRDBNet) model: {error}", field="upscaler"
        ) from None
    net.eval()
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return ModelUpscaler(path.stem, net, 2**upsamples // unshuffle, digest)


def _tiled(net, image: Image.Image, scale: int, tile: int, overlap: int) -> Image.Image:
    """Run `net` over `image` in overlapping tiles, blending each output tile with a linear ramp in the
    overlaps (weights sum to one everywhere), so no seam shows and memory follows the tile size."""
    torch = _torch()
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1).unsqueeze(0)
    _, _, height, width = pixels.shape
    if tile <= 0 or (height <= tile and width <= tile):
        with torch.inference_mode():
            out = net(pixels)
        return _to_image(out)
    step = max(1, tile - overlap)
    out = torch.zeros(1, 3, height * scale, width * scale)
    weight = torch.zeros(1, 1, height * scale, width * scale)
    tops, lefts = _tile_starts(height, tile, step), _tile_starts(width, tile, step)
    with torch.inference_mode():
        for top in tops:
            for left in lefts:
                piece = pixels[:, :, top : top + tile, left : left + tile]
                result = net(piece)
                ramp = _ramp(piece.shape[2] * scale, piece.shape[3] * scale, overlap * scale)
                y, x = top * scale, left * scale
                out[:, :, y : y + result.shape[2], x : x + result.shape[3]] += result * ramp
                weight[:, :, y : y + result.shape[2], x : x + result.shape[3]] += ramp
    return _to_image(out / weight.clamp_min(1e-8))


def _ramp(height: int, width: int, fade: int):
    """Weights that rise linearly over `fade` pixels from each edge (never zero, so every pixel counts)."""
    torch = _torch()

    def axis(n: int):
        position = torch.arange(n, dtype=torch.float32)
        edge = torch.minimum(position + 1, n - position)
        return (edge / max(1, fade)).clamp(max=1.0)

    return (axis(height)[:, None] * axis(width)[None, :]).unsqueeze(0).unsqueeze(0)


def _to_image(tensor) -> Image.Image:
    array = tensor[0].clamp(0, 1).permute(1, 2, 0).numpy()
    return Image.fromarray((array * 255.0).round().astype(np.uint8))


def resolve_upscaler(name: str, folder: Path, *, allow_paths: bool = True):
    """ "Lanczos"/"Nearest", a model in `folder` by name (NAME.safetensors), or (CLI) a path to a file."""
    if name in RESAMPLERS:
        return name
    candidate = folder / f"{name}.safetensors"
    if candidate.is_file():
        return load_model_upscaler(candidate)
    if allow_paths and (name.endswith((".safetensors", ".pth", ".pt", ".ckpt")) or "/" in name):
        return load_model_upscaler(Path(name))
    known = [*RESAMPLERS, *installed_models(folder)]
    raise UserError(f"unknown upscaler {name!r}; known: {', '.join(known)} (models go in {folder})", field="upscaler")


def installed_models(folder: Path) -> list[str]:
    """The model upscalers in `folder` (NAME.safetensors), by name."""
    return sorted(path.stem for path in folder.glob("*.safetensors")) if folder.is_dir() else []


def upscale_image(image: Image.Image, factor: float, upscaler, tile: int = 256) -> Image.Image:
    """The picture `factor` times larger: a resampler directly; a model at its own scale (as often as needed),
    then Lanczos to the exact size, as A1111's extras do."""
    size = (round(image.width * factor), round(image.height * factor))
    if isinstance(upscaler, str):
        return image.convert("RGB").resize(size, RESAMPLERS[upscaler])
    result = image.convert("RGB")
    while result.width < size[0] or result.height < size[1]:
        result = upscaler.upscale(result, tile=tile)
    return result if result.size == size else result.resize(size, Image.Resampling.LANCZOS)


def _tile_starts(length: int, tile: int, step: int) -> list[int]:
    return sorted({min(start, max(0, length - tile)) for start in range(0, max(1, length - tile + step), step)})


def sd_upscale(
    studio,
    picture: Image.Image,
    factor: float,
    upscaler,
    request,
    *,
    tile: int = 0,
    overlap: int = 0,
    on_tile=None,
) -> tuple[Image.Image, list]:
    """A1111's "SD upscale": the picture enlarged by `upscaler`, then drawn again tile by tile as img2img under
    `request` (prompt, strength, seed, steps…; the same seed for every tile), the tiles overlapping and their seams
    feathered. Tiles are the model's native size unless `tile` says (multiples of 8). Returns the picture and the
    recipes of its tiles (with where each lies), so the result can be checked tile by tile."""
    import torch

    native = studio.model_info(request.model).defaults.get("width") or 512
    tile = (tile or native) // 8 * 8
    overlap = (overlap or tile // 4) // 8 * 8
    big = upscale_image(picture, factor, upscaler)
    width, height = big.width // 8 * 8, big.height // 8 * 8  # img2img sizes are multiples of 8
    big = big.resize((width, height), Image.Resampling.LANCZOS) if big.size != (width, height) else big
    tile_w, tile_h = min(tile, width), min(tile, height)
    step_w, step_h = max(8, tile_w - overlap), max(8, tile_h - overlap)
    out = torch.zeros(3, height, width)
    weight = torch.zeros(1, height, width)
    recipes = []
    positions = [
        (top, left) for top in _tile_starts(height, tile_h, step_h) for left in _tile_starts(width, tile_w, step_w)
    ]
    for number, (top, left) in enumerate(positions):
        crop = big.crop((left, top, left + tile_w, top + tile_h))
        recipe = studio.plan(request.with_(kind="img2img", init_image=crop, width=tile_w, height=tile_h))
        [result] = studio.run(recipe)
        pixels = torch.from_numpy(np.asarray(result.image, dtype=np.float32) / 255.0).permute(2, 0, 1)
        ramp = _ramp(tile_h, tile_w, overlap)[0]
        out[:, top : top + tile_h, left : left + tile_w] += pixels * ramp[0]
        weight[:, top : top + tile_h, left : left + tile_w] += ramp[0]
        recipes.append({"left": left, "top": top, "recipe": recipe.to_dict()})
        if on_tile is not None:
            on_tile(number + 1, len(positions))
    blended = (out / weight.clamp_min(1e-8)).clamp(0, 1).permute(1, 2, 0).numpy()
    return Image.fromarray((blended * 255.0).round().astype(np.uint8)), recipes


UPSCALE_KIND = "upscale"  # a queued upscale: a job that is not a recipe (as training a concept is)


def upscaler_record(name: str, folder: Path) -> dict:
    """An upscaler by name as a job records it, without loading it: a resampler, or a model file and its hash
    (the worker checks the file it loads is still that one)."""
    if name in RESAMPLERS:
        return {"upscaler": name, "upscaler_sha256": None}
    path = folder / f"{name}.safetensors"
    if not path.is_file():
        known = [*RESAMPLERS, *installed_models(folder)]
        raise UserError(f"unknown upscaler {name!r}; known: {', '.join(known)}", field="upscaler")
    return {"upscaler": name, "upscaler_sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


def upscaled_png(image: Image.Image, source_chunks: dict, record: dict) -> bytes:
    """The PNG of an upscaled picture: the source's A1111 parameters with A1111's Postprocess keys added, and a
    `spellbook-upscale` chunk with `record` (source pixels, upscaler and its hash, scale, tile)."""
    import io
    import json

    from spellbook.infotext import write_png_text

    postprocess = f"Postprocess upscale by: {record['scale']:g}, Postprocess upscaler: {record['upscaler']}"
    parameters = source_chunks.get("parameters")
    chunks = {"parameters": f"{parameters}, {postprocess}" if parameters else postprocess,
              "spellbook-upscale": json.dumps(record)}  # fmt: skip
    buffer = io.BytesIO()
    write_png_text(image, buffer, chunks)
    return buffer.getvalue()


def upscale_cost(width: int, height: int) -> int:
    """Credits for an upscale: one per 2^20 output pixels (a 2048x2048 picture: 4), at least one."""
    return max(1, -(-width * height // 2**20))
