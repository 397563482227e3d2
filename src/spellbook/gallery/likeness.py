"""Perceptual hash (pHash): 64 bits that change little when an image is resized, re-encoded or retouched.

The classic DCT hash: grey 32x32 -> 2-D DCT -> the 8x8 lowest frequencies -> one bit each, set where the
coefficient is above their median (the DC term is left out of the median, as it only measures brightness).
Near-identical images differ in a few bits; unrelated ones in about 32.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from PIL import Image

HASH_SIZE = 8
SAMPLE_SIZE = 32


@lru_cache(maxsize=1)
def _dct_matrix() -> np.ndarray:
    n = SAMPLE_SIZE
    k = np.arange(n)[:, None]
    x = np.arange(n)[None, :]
    matrix = np.sqrt(2 / n) * np.cos(np.pi * (2 * x + 1) * k / (2 * n))
    matrix[0] /= np.sqrt(2)
    return matrix


def phash(image: Image.Image) -> str:
    """16 hex digits."""
    grey = image.convert("L").resize((SAMPLE_SIZE, SAMPLE_SIZE), Image.Resampling.LANCZOS)
    pixels = np.asarray(grey, dtype=np.float64)
    dct = _dct_matrix()
    low = (dct @ pixels @ dct.T)[:HASH_SIZE, :HASH_SIZE].flatten()
    bits = low > np.median(low[1:])
    return f"{int(''.join('1' if b else '0' for b in bits), 2):016x}"


def distances(hashes: np.ndarray, query: str) -> np.ndarray:
    return np.bitwise_count(hashes ^ np.uint64(int(query, 16)))
