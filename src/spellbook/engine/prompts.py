"""Prompt syntax -> conditioning, as the community's prompts are written (AUTOMATIC1111's rules).

- `(word)` multiplies attention by 1.1, `((word))` by 1.21, `[word]` divides by 1.1, `(word:1.5)` sets 1.5;
  `\\(` and `\\)` are literal brackets; `BREAK` starts a new 75-token chunk.
- Prompts longer than 75 tokens are split into chunks of 75, each encoded on its own with its start and end
  tokens, and concatenated (so nothing past token 75 is silently cut off).
- Weights scale each token's embedding, then the chunk is rescaled to keep its original mean (A1111's way,
  so emphasis does not change the overall magnitude).
- Concepts (textual inversion): a concept's name in the prompt, `<charlie>` or `charlie`, stands for its vectors.
  They get token ids past the end of the text encoder's vocabulary and a per-call view of the text encoder
  looks them up; the shared (cached) text encoder and tokenizer are never changed.
A prompt without any of this syntax encodes exactly as diffusers' pipelines encode it.
Encodings are cached by signature (`prompt_signature`: model, text-encoder state, concepts' vectors, prompts,
clip skip) in the components' `PromptCache`, so a repeated prompt costs no text-encoder pass.
"""

from __future__ import annotations

import copy
import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from spellbook.errors import UserError

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
                factor = float(weight)
            except ValueError:  # e.g. "(word:1.2.3)": the text as typed, and the bracket stays open (x1.1)
                pieces.append([token, 1.0])
            else:
                multiply(round_open.pop(), factor)
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


# --- concepts (textual inversion) ----------------------------------------------------------------------------

# Text encoder widths of the model families, to say which family a concept of another width was made for.
FAMILY_BY_WIDTH = {768: "SD 1.x", 1024: "SD 2.x", 1280: "SDXL", 64: "the shapes model"}


def concept_pattern(names: list[str] | tuple[str, ...]) -> re.Pattern | None:
    """Matches a concept's name in a prompt, `<name>` or `name` as a whole word (case-insensitive, as CLIP's
    tokenizer lowercases); longer names first, so `cat-toy` wins over `cat`. A name given as `<name>` matches
    only in brackets (a concept whose owner did not give it the bare word)."""
    if not names:
        return None

    def alternatives(words) -> str:
        return "|".join(re.escape(word) for word in sorted(set(words), key=len, reverse=True))

    pattern = rf"<(?:{alternatives(name.strip('<>') for name in names)})>"
    bare = [name for name in names if not name.startswith("<")]
    if bare:
        pattern += rf"|(?<![\w-])(?:{alternatives(bare)})(?![\w-])"
    return re.compile(pattern, re.IGNORECASE)


def concepts_in(text: str, names: list[str] | tuple[str, ...]) -> list[str]:
    """The names (as given, `<name>` for a bracket-only one) that `text` mentions, in order of first mention."""
    pattern = concept_pattern(names)
    if pattern is None:
        return []
    by_key = {name.strip("<>").lower(): name for name in names}
    found: list[str] = []
    for match in pattern.finditer(text):
        name = by_key[match.group(0).strip("<>").lower()]
        if name not in found:
            found.append(name)
    return found


@dataclass(frozen=True)
class ConceptTokens:
    """Concepts given to one encoding: each name's token ids (past the end of the vocabulary) and their rows."""

    token_ids: dict[str, list[int]]  # lowercased name -> one id per vector
    rows: torch.Tensor  # (all vectors, width), row i is token id vocab_size + i
    pattern: re.Pattern

    @classmethod
    def build(cls, concepts: Mapping[str, torch.Tensor], vocab_size: int) -> ConceptTokens | None:
        if not concepts:
            return None
        token_ids, rows, next_id = {}, [], vocab_size
        for name, vectors in concepts.items():
            vectors = vectors.reshape(-1, vectors.shape[-1])
            token_ids[name.strip("<>").lower()] = list(range(next_id, next_id + len(vectors)))
            rows.append(vectors)
            next_id += len(vectors)
        return cls(token_ids, torch.cat(rows), concept_pattern(list(concepts)))

    def split(self, text: str) -> list[tuple[str, list[int] | None]]:
        """Text pieces and concept ids, in order: [("a blue ", None), ("", [49408]), (", white background", None)]."""
        pieces: list[tuple[str, list[int] | None]] = []
        position = 0
        for match in self.pattern.finditer(text):
            pieces.append((text[position : match.start()], None))
            pieces.append(("", self.token_ids[match.group(0).strip("<>").lower()]))
            position = match.end()
        pieces.append((text[position:], None))
        return pieces


def check_concepts(concepts: Mapping[str, torch.Tensor], text_encoder, model_name: str = "") -> None:
    """Every concept's vectors must be as wide as the text encoder's token embeddings."""
    check_concept_widths(concepts, text_encoder.get_input_embeddings().embedding_dim, model_name)


def check_concept_widths(concepts: Mapping[str, torch.Tensor], width: int, model_name: str = "") -> None:
    """Every concept's vectors must be `width` wide (the model's text-encoder width, from its metadata)."""
    for name, vectors in concepts.items():
        if vectors.shape[-1] != width:
            made_for = FAMILY_BY_WIDTH.get(int(vectors.shape[-1]))
            model = f"model {model_name!r}" if model_name else "this model"
            raise UserError(
                f"concept {name!r} has {vectors.shape[-1]}-dimensional vectors"
                + (f" (made for {made_for})" if made_for else "")
                + f", but the text encoder of {model} takes {width}-dimensional ones"
                + (f" ({FAMILY_BY_WIDTH[width]})" if width in FAMILY_BY_WIDTH else ""),
                field="concepts",
                hint="use a concept trained for this model, or train one with `spellbook concept train`",
            )


class ExtendedEmbedding(torch.nn.Module):
    """A token table with rows appended (concept vectors), without copying or changing the original table."""

    def __init__(self, base: torch.nn.Embedding, extra: torch.Tensor):
        super().__init__()
        self.base = base
        self.extra = extra
        self.num_embeddings = base.num_embeddings + len(extra)
        self.embedding_dim = base.embedding_dim

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        vocab = self.base.num_embeddings
        is_extra = input_ids >= vocab
        embedded = self.base(torch.where(is_extra, 0, input_ids))
        if not bool(is_extra.any()):
            return embedded
        extra = self.extra.to(embedded.dtype)[torch.where(is_extra, input_ids - vocab, 0)]
        return torch.where(is_extra[..., None], extra, embedded)


def with_token_rows(text_encoder, extra: torch.Tensor):
    """A view of `text_encoder` whose token embedding also knows `extra` rows (ids vocab_size, vocab_size+1, …).

    Only the modules on the path to the token embedding are shallow-copied (their child lists too); weights are
    shared, and the original text encoder, which other requests use at the same time, is left as it was. This
    is what diffusers' `load_textual_inversion` does by resizing the table, minus the permanent change.
    """
    base = text_encoder.get_input_embeddings()
    path = next(name for name, module in text_encoder.named_modules() if module is base).split(".")
    root = parent = _shallow_copy(text_encoder)
    for part in path[:-1]:
        child = _shallow_copy(parent._modules[part])
        parent._modules[part] = child
        parent = child
    parent._modules[path[-1]] = ExtendedEmbedding(base, extra)
    return root


def _shallow_copy(module: torch.nn.Module) -> torch.nn.Module:
    clone = copy.copy(module)
    clone._modules = dict(module._modules)
    return clone


# --- tokens and encoding -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenChunks:
    """Token ids (each chunk 77 long, with start/end/padding) and per-token weights."""

    ids: list[list[int]]
    weights: list[list[float]]

    @property
    def plain(self) -> bool:
        return all(w == 1.0 for chunk in self.weights for w in chunk)


def tokenize(tokenizer, text: str, min_chunks: int = 1, concepts: ConceptTokens | None = None) -> TokenChunks:
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
        pieces = concepts.split(fragment.text) if concepts is not None else [(fragment.text, None)]
        for piece, concept_ids in pieces:
            if concept_ids is not None and len(ids) + len(concept_ids) > CHUNK_TOKENS >= len(concept_ids):
                close_chunk()  # a concept's vectors stay together in one chunk, as in A1111
            tokens = concept_ids if concept_ids is not None else tokenizer(piece, add_special_tokens=False).input_ids
            for token in tokens:
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
def encode_chunks(
    text_encoder, chunks: TokenChunks, clip_skip: int = 1, concepts: ConceptTokens | None = None
) -> torch.Tensor:
    """Embeddings of shape (1, 77 * n_chunks, hidden). clip_skip counts as in A1111 (1 = last layer)."""
    device = text_encoder.device
    if concepts is not None:
        text_encoder = with_token_rows(text_encoder, concepts.rows.to(device))
    encoded = []
    for ids, weights in zip(chunks.ids, chunks.weights):
        input_ids = torch.tensor([ids], device=device)
        if clip_skip <= 1:
            z = text_encoder(input_ids)[0]
        else:
            # transformers 5 flattened CLIPTextModel (no .text_model); older versions nest it.
            z = getattr(text_encoder, "text_model", text_encoder).final_layer_norm(
                _hidden_state(text_encoder, input_ids, clip_skip)
            )
        if any(w != 1.0 for w in weights):
            original_mean = z.mean()
            z = z * torch.tensor(weights, device=device, dtype=z.dtype)[None, :, None]
            z = z * (original_mean / z.mean())
        encoded.append(z)
    return torch.cat(encoded, dim=1)


def _hidden_state(text_encoder, input_ids: torch.Tensor, clip_skip: int) -> torch.Tensor:
    """What `output_hidden_states=True` would give at index -clip_skip, read by a hook on that one layer.

    transformers 5 collects hidden states with hooks it installs per model object; a concept's view of the text
    encoder (`with_token_rows`, which shares the layers) installs a second set, after which the original model
    records every layer twice and hidden_states[-2] is the last layer. A hook of our own, removed at once, avoids
    that machinery."""
    model = getattr(text_encoder, "text_model", text_encoder)
    layers = model.encoder.layers
    if clip_skip > len(layers) + 1:
        raise UserError(
            f"clip skip {clip_skip}: this text encoder has {len(layers)} layers; use at most {len(layers) + 1}",
            field="clip_skip",
        )
    target = layers[-clip_skip] if clip_skip <= len(layers) else model.embeddings
    captured: list[torch.Tensor] = []

    def keep(_module, _inputs, output) -> None:
        captured.append(output[0] if isinstance(output, tuple) else output)

    hook = target.register_forward_hook(keep)
    try:
        text_encoder(input_ids)
    finally:
        hook.remove()
    return captured[-1]


def chunk_count(tokenizer, text: str, concepts: ConceptTokens | None = None) -> int:
    return len(tokenize(tokenizer, text, concepts=concepts).ids)


def encode_prompt_pair(
    tokenizer,
    text_encoder,
    prompt: str,
    negative_prompt: str,
    clip_skip: int = 1,
    concepts: Mapping[str, torch.Tensor] | None = None,
    min_chunks: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Positive and negative conditioning with the same number of chunks (so they batch together), at least
    `min_chunks` (the texts of a scheduled prompt are encoded to one length, so any step's can replace another's).

    `concepts` maps a concept's name to its vectors (n, width); the name in either prompt stands for them.
    """
    if concepts:
        check_concepts(concepts, text_encoder)
    tokens = ConceptTokens.build(concepts or {}, text_encoder.get_input_embeddings().num_embeddings)
    n = max(min_chunks, chunk_count(tokenizer, prompt, tokens), chunk_count(tokenizer, negative_prompt, tokens))
    positive = encode_chunks(text_encoder, tokenize(tokenizer, prompt, n, tokens), clip_skip, tokens)
    negative = encode_chunks(text_encoder, tokenize(tokenizer, negative_prompt, n, tokens), clip_skip, tokens)
    return positive, negative


# --- signatures (the prompt cache's keys) -------------------------------------------------------------------


def prompt_signature(
    model_sha256: str,
    text_encoder,
    prompt: str,
    negative_prompt: str,
    clip_skip: int,
    concepts: Mapping[str, torch.Tensor] | None = None,
    min_chunks: int = 1,
) -> tuple | None:
    """Everything `encode_prompt_pair` depends on, as a hashable key; None when it cannot be told (then the
    encoding is not cached)."""
    encoder = text_encoder_fingerprint(text_encoder)
    if encoder is None:
        return None
    key = (model_sha256, encoder, concept_fingerprint(concepts or {}), prompt, negative_prompt, clip_skip)
    return key if min_chunks == 1 else (*key, min_chunks)


def text_encoder_fingerprint(text_encoder) -> tuple | None:
    """Which text encoder, in which state: its identity, dtype and device, and every parameter's storage and
    version counter (an optimizer step, `load_state_dict` or `.to()` changes one of them). Cheap: no weights are
    read. None for parameters made under inference mode, which keep no version counter."""
    parameters = list(text_encoder.parameters())
    try:
        versions = sum(p._version for p in parameters)
    except RuntimeError:
        return None
    first = parameters[0] if parameters else None
    return (
        id(text_encoder),
        str(getattr(first, "dtype", None)),
        str(getattr(first, "device", None)),
        versions,
        hash(tuple(p.data_ptr() for p in parameters)),
    )


def concept_fingerprint(concepts: Mapping[str, torch.Tensor]) -> tuple:
    """(name, dtype, shape, sha256 of the bytes) per concept, by name: the vectors, not just their names."""
    return tuple(
        (name, str(vectors.dtype), tuple(vectors.shape), _tensor_sha256(vectors))
        for name, vectors in sorted(concepts.items())
    )


def _tensor_sha256(tensor: torch.Tensor) -> str:
    raw = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
    return hashlib.sha256(raw.numpy().tobytes()).hexdigest()
