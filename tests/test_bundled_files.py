"""Files shipped in the package: the CLIP vocabulary ships once and every bundled tokenizer reads it unchanged."""

from __future__ import annotations

import pytest

from spellbook.errors import UserError
from spellbook.models.files import (
    CONFIGS_DIR,
    PACKAGE_DIR,
    bundled_shapes_model_dir,
    clip_vocabulary_file,
    load_clip_tokenizer,
)
from spellbook.models.registry import sha256_folder

# Token ids as the tokenizers gave them when each folder shipped its own vocab.json + merges.txt.
RED_CIRCLE = [49406, 320, 736, 7117, 525, 518, 1823, 267, 1449, 5994, 49407]
PHOTO = [49406, 320, 1125, 539, 283, 6393, 285, 3309, 320, 3801, 267, 638, 7943, 14973, 17649]
UNICODE = [49406, 15304, 1097, 35689, 563, 39121, 44353, 34002, 508, 14860, 49407]


def test_the_clip_vocabulary_ships_once():
    vocabularies = [p for p in PACKAGE_DIR.rglob("*") if p.name in ("vocab.json", "merges.txt", "tokenizer.json")]
    assert vocabularies == [clip_vocabulary_file()]


@pytest.mark.parametrize(
    ("folder", "pad_id", "bangs"),
    [
        (CONFIGS_DIR / "clip_tokenizer", 49407, [748]),
        (CONFIGS_DIR / "sd-v1" / "tokenizer", 49407, [748]),
        # SD 2.x pads with "!", a special token there, so "!!" is two of them (as in the original files).
        (CONFIGS_DIR / "sd-v2" / "tokenizer", 0, [0, 0]),
    ],
    ids=["clip", "sd-v1", "sd-v2"],
)
def test_bundled_tokenizers_tokenize_as_before(folder, pad_id, bangs):
    tokenizer = load_clip_tokenizer(folder)
    assert (tokenizer.pad_token_id, tokenizer.model_max_length, len(tokenizer)) == (pad_id, 77, 49408)
    assert tokenizer("a red circle on the left, black background").input_ids == RED_CIRCLE
    padded = tokenizer("a red circle on the left, black background", padding="max_length", max_length=12).input_ids
    assert padded == [*RED_CIRCLE, pad_id]
    photo = tokenizer("A Photo of <charlie> wearing a HAT, by greg rutkowski!!").input_ids
    assert photo == [*PHOTO, *bangs, 49407]
    assert tokenizer("café naïve 日本語 🙂").input_ids == UNICODE


def test_the_shapes_model_keeps_its_tokenizer_and_its_hash():
    """Images made with the shapes model record this hash, and `reproduce` checks it: sharing the vocabulary
    must not change the folder (it stays a complete diffusers folder)."""
    shapes = load_clip_tokenizer(bundled_shapes_model_dir() / "tokenizer")
    assert shapes("a red circle on the left, black background").input_ids == RED_CIRCLE
    assert (
        sha256_folder(bundled_shapes_model_dir()) == "538a5a201a7ad91c213b913257f8741326593c13abbac54ea73fc053611973fc"
    )


def test_a_folder_outside_the_package_must_bring_its_own_vocabulary(tmp_path):
    load_clip_tokenizer(CONFIGS_DIR / "sd-v1" / "tokenizer").save_pretrained(tmp_path / "tokenizer")
    assert load_clip_tokenizer(tmp_path / "tokenizer")("a red circle on the left, black background").input_ids == (
        RED_CIRCLE
    )
    (tmp_path / "tokenizer" / "tokenizer.json").unlink()
    with pytest.raises(UserError, match="no tokenizer vocabulary"):
        load_clip_tokenizer(tmp_path / "tokenizer")
