"""Prompt syntax as the community writes it (A1111 emphasis, BREAK, long prompts)."""

from __future__ import annotations

import pytest
import torch

from spellbook.engine.prompts import CHUNK_TOKENS, encode_chunks, encode_prompt_pair, parse_attention, tokenize


@pytest.mark.parametrize(
    "text, expected",
    [
        ("a red circle", [("a red circle", 1.0)]),
        ("a (red) circle", [("a ", 1.0), ("red", 1.1), (" circle", 1.0)]),
        ("a ((red)) circle", [("a ", 1.0), ("red", pytest.approx(1.21)), (" circle", 1.0)]),
        ("a [red] circle", [("a ", 1.0), ("red", pytest.approx(1 / 1.1)), (" circle", 1.0)]),
        ("a (red:1.5) circle", [("a ", 1.0), ("red", 1.5), (" circle", 1.0)]),
        ("an otter \\(wearing a hat\\)", [("an otter (wearing a hat)", 1.0)]),
        ("(unclosed", [("unclosed", 1.1)]),
        ("time: noon", [("time: noon", 1.0)]),
        # a weight that is not a number: its text as typed, the bracket still open (as an unclosed one)
        ("a (red:1.2.3) circle", [("a ", 1.0), ("red:1.2.3) circle", pytest.approx(1.1))]),
    ],
)
def test_attention_syntax(text, expected):
    assert [(f.text, f.weight) for f in parse_attention(text)] == expected


def test_plain_prompt_encodes_exactly_as_diffusers(tiny):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=tiny.vae,
        text_encoder=tiny.text_encoder,
        tokenizer=tiny.tokenizer,
        unet=tiny.unet,
        scheduler=None,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    theirs, _ = pipe.encode_prompt("a photo of an otter, by greg rutkowski", "cpu", 1, False)
    ours, _ = encode_prompt_pair(tiny.tokenizer, tiny.text_encoder, "a photo of an otter, by greg rutkowski", "")
    assert torch.equal(ours, theirs)


def test_clip_skip_counts_as_a1111(tiny):
    # A1111's clip skip 2 = the penultimate layer's hidden states through the final layer norm. (diffusers'
    # own clip_skip path calls text_encoder.text_model, which transformers 5 no longer has.)
    ids = tokenize(tiny.tokenizer, "an otter")
    skip1 = encode_chunks(tiny.text_encoder, ids, clip_skip=1)
    skip2 = encode_chunks(tiny.text_encoder, ids, clip_skip=2)
    hidden = tiny.text_encoder(torch.tensor(ids.ids), output_hidden_states=True).hidden_states
    assert torch.equal(skip1, tiny.text_encoder(torch.tensor(ids.ids))[0])
    assert torch.allclose(skip2, tiny.text_encoder.final_layer_norm(hidden[-2]), atol=1e-6)
    assert not torch.allclose(skip1, skip2)


def test_long_prompts_are_chunked_not_truncated(tiny):
    long_prompt = ", ".join(["a red circle on the left"] * 20)  # well over 75 tokens
    chunks = tokenize(tiny.tokenizer, long_prompt)
    assert len(chunks.ids) >= 2 and all(len(ids) == CHUNK_TOKENS + 2 for ids in chunks.ids)
    positive, negative = encode_prompt_pair(tiny.tokenizer, tiny.text_encoder, long_prompt, "blurry")
    assert positive.shape == negative.shape == (1, 77 * len(chunks.ids), 32)


def test_break_starts_a_new_chunk(tiny):
    assert len(tokenize(tiny.tokenizer, "a red circle BREAK black background").ids) == 2


def test_emphasis_changes_the_conditioning_but_keeps_its_mean(tiny):
    plain = encode_chunks(tiny.text_encoder, tokenize(tiny.tokenizer, "a red circle"))
    weighted = encode_chunks(tiny.text_encoder, tokenize(tiny.tokenizer, "a (red:1.5) circle"))
    assert not torch.allclose(plain, weighted)
    assert torch.allclose(plain.mean(), weighted.mean(), atol=1e-6)
