"""Files shipped inside the package: configs and tokenizer needed to load checkpoints offline."""

from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent.parent
CONFIGS_DIR = Path(__file__).resolve().parent / "configs"


def bundled_tokenizer_dir() -> Path:
    """The real CLIP BPE tokenizer (vocab.json + merges.txt), as SD 1.x uses it."""
    return CONFIGS_DIR / "clip_tokenizer"


def bundled_shapes_model_dir() -> Path:
    """The embedded default model `shapes` (a diffusers folder)."""
    return PACKAGE_DIR / "toy" / "weights" / "shapes-v3"
