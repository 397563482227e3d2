"""Concept files: the layouts textual-inversion embeddings are shared in, read and written.

| layout | file | content |
|---|---|---|
| diffusers | `learned_embeds.safetensors` (or any name) | `{token: tensor (n, width)}`, e.g. `{"<cat-toy>": …}` |
| A1111 safetensors | `name.safetensors` | `{"emb_params": tensor (n, width)}` |
| A1111 `.pt` | `name.pt` (a pickle) | `{"string_to_param": {"*": tensor}, "name": …, "step": …, "sd_checkpoint": …}` |
| diffusers `.bin` | `learned_embeds.bin` (a pickle) | `{token: tensor}` |

We write the first two (safetensors only), with a few facts in the safetensors metadata (the model it was
trained for, steps, init word). Both load in A1111 (which takes any one-tensor file and names it after the
file) and in diffusers' `load_textual_inversion`. Pickles (`.pt`, `.bin`) are refused unless the user allows
them; then they are scanned (models/safety.py) and loaded with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from spellbook.errors import Refused, UserError

DIFFUSERS = "diffusers"
A1111 = "a1111"
FORMATS = (DIFFUSERS, A1111)
SUFFIXES = (".safetensors", ".pt", ".bin")
PICKLE_SUFFIXES = (".pt", ".bin")
MAX_FILE_BYTES = 16 << 20  # an embedding is a few KB; anything this large is a model or a LoRA, not a concept
A1111_KEY = "emb_params"
DIFFUSERS_FILE = "learned_embeds.safetensors"


@dataclass(frozen=True)
class Concept:
    """A learned embedding: `vectors` (n, width) stand for `name` in a prompt."""

    name: str
    vectors: torch.Tensor
    token: str = ""  # the token the file names: "<charlie>" (diffusers), "emb_params" / "*" (A1111)
    layout: str = DIFFUSERS  # diffusers | a1111 | a1111-pt (string_to_param)
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def n_vectors(self) -> int:
        return int(self.vectors.shape[0])

    @property
    def width(self) -> int:
        return int(self.vectors.shape[1])

    @property
    def trained_for(self) -> str | None:
        """The model it was made for, as far as the file says (ours: `model`; A1111: `sd_checkpoint_name`)."""
        return self.metadata.get("model") or self.metadata.get("sd_checkpoint_name") or None


# --- reading ----------------------------------------------------------------------------------------------


def read_concept(path: Path | str, name: str | None = None, *, allow_pickle: bool = False) -> Concept:
    """Read any of the layouts above; `name` defaults to what the file is called (as A1111 names them)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} does not exist or is not a file", field="concept")
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise UserError(
            f"{path.name} is {size / (1 << 20):.0f} MB; a concept file is a few KB (is it a model or a LoRA?)",
            field="concept",
        )
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        state, metadata = _read_safetensors(path)
    elif suffix in PICKLE_SUFFIXES:
        state, metadata = _read_pickle(path, allow_pickle), {}
    else:
        raise UserError(
            f"{path.name}: a concept file is .safetensors (or, with --allow-pickle, .pt / .bin)", field="concept"
        )
    return parse_state(state, name or default_name(path, state), metadata, source=path.name)


def looks_like_pickle(data: bytes) -> bool:
    """A pickle (protocol 2-5) or torch's zip of pickles, whatever the file is called."""
    return data[:4] == b"PK\x03\x04" or (data[:1] == b"\x80" and data[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"))


def looks_like_safetensors(data: bytes) -> bool:
    """A safetensors file starts with the 8-byte length of its JSON header, then the header's `{`."""
    if len(data) < 10:
        return False
    header_length = int.from_bytes(data[:8], "little")
    return 2 <= header_length <= len(data) - 8 and data[8:9] == b"{"


def default_name(path: Path, state: Any = None) -> str:
    """A1111 names a concept after its file; diffusers' generic `learned_embeds` file after its token."""
    if path.stem == "learned_embeds" and isinstance(state, dict) and len(state) == 1:
        token = str(next(iter(state)))
        if token.strip("<>"):
            return token.strip("<>")
    return path.stem


def _read_safetensors(path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = dict(handle.metadata() or {})
            keys = list(handle.keys())
            if len(keys) > 8:  # read no further: a concept holds one tensor (A1111 SDXL files two)
                raise UserError(
                    f"{path.name} holds {len(keys)} tensors; a concept file holds one (is it a model or a LoRA?)",
                    field="concept",
                )
            state = {key: handle.get_tensor(key) for key in keys}
    except SafetensorError as error:
        raise UserError(f"{path.name} is not a readable safetensors file: {error}", field="concept") from None
    return state, metadata


def _read_pickle(path: Path, allow_pickle: bool) -> Any:
    from spellbook.models.safety import scan_pickle

    # 1. Refuse unless the user opted in (the same rule and flag as pickled models).
    if not allow_pickle:
        raise Refused(
            f"{path.name} is a pickle file ({path.suffix}): loading it could run code hidden inside it",
            field="concept",
            hint="convert it to .safetensors, or pass --allow-pickle to scan it and load only its tensors",
        )
    # 2. Scan: nothing but plain tensors and containers may be imported by the pickle.
    dangerous = scan_pickle(path)
    if dangerous:
        raise Refused(
            f"{path.name} imports {', '.join(dangerous)} when unpickled, which an embedding of plain tensors never "
            "needs; it was not loaded",
            field="concept",
        )
    # 3. torch's restricted unpickler as a second gate.
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, ValueError, EOFError) as error:
        raise UserError(f"could not load {path.name} as a torch file: {error}", field="concept") from error


def parse_state(state: Any, name: str, metadata: dict[str, str] | None = None, source: str = "") -> Concept:
    """A loaded file (a dict, or a bare tensor) -> Concept; says which layout it expected when none fits."""
    source = source or name
    metadata = dict(metadata or {})
    if isinstance(state, torch.Tensor):  # torch.save(tensor): a bare embedding, named by its file
        return Concept(name, _vectors(state, source), token=name, layout=DIFFUSERS, metadata=metadata)
    if not isinstance(state, dict) or not state:
        raise UserError(f"{source} holds no embedding (an empty file or not a dict of tensors)", field="concept")
    # A1111 .pt: {"string_to_param": {"*": tensor}, "name", "step", "sd_checkpoint", "sd_checkpoint_name"}.
    nested = state.get("string_to_param")
    if isinstance(nested, dict) and nested:
        for key in ("step", "sd_checkpoint", "sd_checkpoint_name"):
            if state.get(key) is not None:
                metadata[key] = str(state[key])
        token = next(iter(nested))
        return Concept(name, _vectors(nested[token], source), token=str(token), layout="a1111-pt", metadata=metadata)
    # The same layout with its keys flattened ("string_to_param.*"), as converters to safetensors write it.
    flat = [key for key in state if str(key).startswith("string_to_param.")]
    if flat:
        token = str(flat[0]).removeprefix("string_to_param.")
        return Concept(name, _vectors(state[flat[0]], source), token=token, layout="a1111-pt", metadata=metadata)
    if "clip_l" in state and "clip_g" in state:
        raise UserError(
            f"{source} is an SDXL embedding (clip_l + clip_g); Spellbook's concepts are for SD 1.x / 2.x text encoders",
            field="concept",
        )
    tensors = {str(key): value for key, value in state.items() if isinstance(value, torch.Tensor)}
    if len(tensors) != 1:
        raise UserError(
            f"{source} holds {len(tensors)} tensors ({', '.join(list(tensors)[:4])}); a concept file holds one: "
            f"{{token: tensor}} (diffusers), {{{A1111_KEY!r}: tensor}} or string_to_param (A1111)",
            field="concept",
        )
    token, vectors = next(iter(tensors.items()))
    layout = A1111 if token == A1111_KEY else DIFFUSERS
    return Concept(name, _vectors(vectors, source), token=token, layout=layout, metadata=metadata)


def _vectors(tensor: Any, source: str) -> torch.Tensor:
    if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
        raise UserError(f"{source}: the embedding is not a tensor of floats", field="concept")
    if tensor.ndim == 1:
        tensor = tensor[None]
    if tensor.ndim != 2 or tensor.shape[0] == 0:
        raise UserError(
            f"{source}: the embedding has shape {tuple(tensor.shape)}; expected (vectors, width)", field="concept"
        )
    if not torch.isfinite(tensor).all():
        raise UserError(f"{source}: the embedding holds NaN or infinite values", field="concept")
    return tensor.detach().to(torch.float32).contiguous()


# --- writing ----------------------------------------------------------------------------------------------


def state_for(concept: Concept, fmt: str = DIFFUSERS) -> dict[str, torch.Tensor]:
    """The tensors of a file in `fmt`: diffusers {"<name>": vectors}, a1111 {"emb_params": vectors}."""
    if fmt == DIFFUSERS:
        token = concept.token if concept.token.startswith("<") and concept.token.endswith(">") else ""
        return {token or f"<{concept.name}>": concept.vectors.contiguous()}
    if fmt == A1111:
        return {A1111_KEY: concept.vectors.contiguous()}
    raise UserError(f"unknown concept format {fmt!r}; known: {', '.join(FORMATS)}", field="format")


def write_concept(concept: Concept, path: Path | str, fmt: str = DIFFUSERS) -> Path:
    """Write a safetensors file (atomically: a crash never leaves half a file). A folder gets
    `learned_embeds.safetensors`, the name diffusers' `load_textual_inversion(folder)` looks for."""
    path = Path(path)
    if path.is_dir():
        path = path / DIFFUSERS_FILE
    if path.suffix.lower() != ".safetensors":
        raise UserError(f"{path.name}: concepts are written as .safetensors", field="out")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(concept_bytes(concept, fmt))
    tmp.replace(path)
    return path


def concept_bytes(concept: Concept, fmt: str = DIFFUSERS) -> bytes:
    """The bytes of the safetensors file `write_concept` writes (what the server sends as a download)."""
    metadata = {"format": "pt", **{str(k): str(v) for k, v in concept.metadata.items()}}
    return safetensors_bytes(state_for(concept, fmt), metadata)


def safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """A safetensors file, byte for byte the same for the same content (keys sorted), so that training the
    same concept twice gives the same hash. (safetensors' own writer orders metadata keys at random.)"""
    header: dict[str, Any] = {"__metadata__": dict(sorted(metadata.items()))}
    blobs, offset = [], 0
    for key in sorted(tensors):
        data = tensors[key].detach().to(torch.float32).contiguous().cpu().numpy().astype("<f4").tobytes()
        header[key] = {"dtype": "F32", "shape": list(tensors[key].shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    return len(text).to_bytes(8, "little") + text + b"".join(blobs)
