"""Files shipped inside the package: configs and tokenizer needed to load checkpoints offline.

The CLIP vocabulary (49408 tokens and their BPE merges, the same for SD 1.x, SD 2.x and the shapes model)
ships once: as the fast-tokenizer file of the shapes model (`toy/weights/shapes-v3/tokenizer/tokenizer.json`),
which keeps that folder a complete diffusers folder with an unchanged sha256. The bundled tokenizer folders
(`configs/clip_tokenizer`, `configs/sd-v1/tokenizer`, `configs/sd-v2/tokenizer`) hold only their settings
(`tokenizer_config.json`: SD 2.x pads with `!`) and take the vocabulary from that file: `load_clip_tokenizer`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

PACKAGE_DIR = Path(__file__).resolve().parent.parent
CONFIGS_DIR = Path(__file__).resolve().parent / "configs"
VOCABULARY_FILES = ("tokenizer.json", "vocab.json")  # a tokenizer folder that has either brings its own


def bundled_tokenizer_dir() -> Path:
    """The real CLIP BPE tokenizer's settings, as SD 1.x uses it (load it with `load_clip_tokenizer`)."""
    return CONFIGS_DIR / "clip_tokenizer"


def bundled_shapes_model_dir() -> Path:
    """The embedded default model `shapes` (a diffusers folder)."""
    return PACKAGE_DIR / "toy" / "weights" / "shapes-v3"


def clip_vocabulary_file() -> Path:
    """The one shipped copy of the CLIP vocabulary and merges (a `tokenizers` JSON file)."""
    return bundled_shapes_model_dir() / "tokenizer" / "tokenizer.json"


def load_clip_tokenizer(folder: Path, **overrides: Any):
    """A CLIPTokenizer from a tokenizer folder (offline). A folder shipped in the package without vocabulary
    files takes the shared CLIP vocabulary; any other folder must bring its own."""
    from transformers import CLIPTokenizer

    from spellbook.errors import UserError

    folder = Path(folder)
    if not any((folder / name).is_file() for name in VOCABULARY_FILES):
        if not folder.resolve().is_relative_to(PACKAGE_DIR):
            # transformers would build a two-token tokenizer here and every prompt would silently become noise.
            raise UserError(
                f"{folder} has no tokenizer vocabulary: expected tokenizer.json, or vocab.json and merges.txt",
                field="model",
            )
        overrides.setdefault("tokenizer_file", str(clip_vocabulary_file()))
    return CLIPTokenizer.from_pretrained(folder, local_files_only=True, **overrides)
