"""Prompt syntax -> conditioning, as the community's prompts are written (AUTOMATIC1111's rules).

- `(word)` multiplies attention by 1.1, `((word))` by 1.21, `[word]` divides by 1.1, `(word:1.5)` sets 1.5;
  `\\(` and `\\)` are literal brackets; `BREAK` starts a new 75-token chunk.
- Prompts longer than 75 tokens are split into chunks of 75, each encoded on its own with its start and end
  tokens, and concatenated (so nothing past token 75 is silently cut off).
- Weights scale each token's embedding, then the chunk is rescaled to keep its original mean (A1111's way,
  so emphasis does not change the overall magnitude).
A prompt without any of this syntax encodes exactly as diffusers' pipelines encode it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

ROUND_MULTIPLIER = 1.1
SQUARE_MULTIPLIER = 1 / 1.1
CHUNK_TOKENS = 75  # + start and end token = the text encoder's 77 positions

_TOKEN = re.compile(
    r"""
    \\[()\[\]\\]            # escaped bracket or backslash: literal
    | \\                    # lone backslash: literal
    | \(                    # open emphasis
    | \[                    # open de-emphasis
    | :\s*([+-]?[.\d]+)\s*\)  # explicit weight, closes a round bracket
    | \)
    | \]
    | [^\\()\[\]:]+         # plain text
    | :                     # a colon that is not a weight
    """,
    re.VERBOSE,
)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.DOTALL)


@dataclass(frozen=True)
class Fragment:
    text: str
    weight: float  # BREAK fragments have text "BREAK" and weight -1


def parse_attention(text: str) -> list[Fragment]:
    """Split a prompt into (text, weight) fragments; adjacent fragments of equal weight are merged."""
    pieces: list[list] = []  # [text, weight]
    round_open: list[int] = []
    square_open: list[int] = []

    def multiply(start: int, factor: float) -> None:
        for piece in pieces[start:]:
            piece[1] *= factor

    for match in _TOKEN.finditer(text):
        token, weight = match.group(0), match.group(1)
        if token.startswith("\\"):
            pieces.append([token[1:] if len(token) > 1 else token, 1.0])
        elif token == "(":
            round_open.append(len(pieces))
        elif token == "[":
            square_open.append(len(pieces))
        elif weight is not None and round_open:
            try:
                multiply(round_open.pop(), float(weight))
            except ValueError:  # e.g. "(word:1.2.3)": keep the text as typed
                pieces.append([token, 1.0])
        elif token == ")" and round_open:
            multiply(round_open.pop(), ROUND_MULTIPLIER)
        elif token == "]" and square_open:
            multiply(square_open.pop(), SQUARE_MULTIPLIER)
        else:
            for i, part in enumerate(_BREAK.split(token)):
                if i > 0:
                    pieces.append(["BREAK", -1.0])
                pieces.append([part, 1.0])
    for start in round_open:  # unclosed brackets still apply, as in A1111
        multiply(start, ROUND_MULTIPLIER)
    for start in square_open:
        multiply(start, SQUARE_MULTIPLIER)

    merged: list[Fragment] = []
    for piece_text, piece_weight in pieces:
        if not piece_text and piece_weight != -1:
            continue
        if merged and merged[-1].weight == piece_weight and piece_weight != -1:
            merged[-1] = Fragment(merged[-1].text + piece_text, piece_weight)
        else:
            merged.append(Fragment(piece_text, piece_weight))
    return merged or [Fragment("", 1.0)]


@dataclass(frozen=True)
class TokenChunks:
    """Token ids (each chunk 77 long, with start/end/padding) and per-token weights."""

    ids: list[list[int]]
    weights: list[list[float]]

    @property
    def plain(self) -> bool:
        return all(w == 1.0 for chunk in self.weights for w in chunk)


def tokenize(tokenizer, text: str, min_chunks: int = 1) -> TokenChunks:
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    chunks: list[tuple[list[int], list[float]]] = []
    ids: list[int] = []
    weights: list[float] = []

    def close_chunk() -> None:
        nonlocal ids, weights
        chunks.append((ids, weights))
        ids, weights = [], []

    for fragment in parse_attention(text):
        if fragment.weight == -1:  # BREAK
            close_chunk()
            continue
        for token in tokenizer(fragment.text, add_special_tokens=False).input_ids:
            if len(ids) == CHUNK_TOKENS:
                close_chunk()
            ids.append(token)
            weights.append(fragment.weight)
    if ids or not chunks:
        close_chunk()
    while len(chunks) < min_chunks:
        chunks.append(([], []))

    out_ids, out_weights = [], []
    for chunk_ids, chunk_weights in chunks:
        padding = CHUNK_TOKENS - len(chunk_ids)
        out_ids.append([bos, *chunk_ids, eos] + [pad] * padding)
        out_weights.append([1.0, *chunk_weights, 1.0] + [1.0] * padding)
    return TokenChunks(out_ids, out_weights)


@torch.no_grad()
def encode_chunks(text_encoder, chunks: TokenChunks, clip_skip: int = 1) -> torch.Tensor:
    """Embeddings of shape (1, 77 * n_chunks, hidden). clip_skip counts as in A1111 (1 = last layer)."""
    device = text_encoder.device
    encoded = []
    for ids, weights in zip(chunks.ids, chunks.weights):
        input_ids = torch.tensor([ids], device=device)
        if clip_skip <= 1:
            z = text_encoder(input_ids)[0]
        else:
            hidden = text_encoder(input_ids, output_hidden_states=True).hidden_states[-clip_skip]
            # transformers 5 flattened CLIPTextModel (no .text_model); older versions nest it.
            z = getattr(text_encoder, "text_model", text_encoder).final_layer_norm(hidden)
        if any(w != 1.0 for w in weights):
            original_mean = z.mean()
            z = z * torch.tensor(weights, device=device, dtype=z.dtype)[None, :, None]
            z = z * (original_mean / z.mean())
        encoded.append(z)
    return torch.cat(encoded, dim=1)


def chunk_count(tokenizer, text: str) -> int:
    return len(tokenize(tokenizer, text).ids)


def encode_prompt_pair(
    tokenizer, text_encoder, prompt: str, negative_prompt: str, clip_skip: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Positive and negative conditioning with the same number of chunks (so they batch together)."""
    n = max(chunk_count(tokenizer, prompt), chunk_count(tokenizer, negative_prompt))
    positive = encode_chunks(text_encoder, tokenize(tokenizer, prompt, n), clip_skip)
    negative = encode_chunks(text_encoder, tokenize(tokenizer, negative_prompt, n), clip_skip)
    return positive, negative
