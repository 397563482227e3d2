"""Components: the loaded parts of one model, named as diffusers names them. A plain dataclass."""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from spellbook.recipe import ModelRef

Conditioning = tuple[torch.Tensor, torch.Tensor]  # (positive, negative) prompt embeddings


class PromptCache:
    """Encoded prompts by signature (ComfyUI's idea): a repeated prompt costs no text-encoder pass.

    A bounded LRU, safe to share between threads. The caller builds the key from everything the encoding
    depends on (engine/prompts.py `prompt_signature`); each entry also remembers which text encoder made it,
    so a key can never be answered by another encoder that happens to reuse a freed one's id. Callers get
    clones: nothing they do to the tensors reaches the cache. `max_entries=0` disables it.
    """

    def __init__(self, max_entries: int = 64):
        if max_entries < 0:
            raise ValueError(f"max_entries must be 0 (disabled) or more, got {max_entries}")
        self.max_entries = max_entries
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[Hashable, tuple[weakref.ref, Conditioning]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def get_or_encode(
        self, key: Hashable | None, text_encoder: Any, encode: Callable[[], Conditioning]
    ) -> Conditioning:
        """The cached encoding for `key`, or `encode()`'s result (stored). A `None` key is never cached."""
        if key is not None and self.max_entries:
            with self._lock:
                entry = self._entries.get(key)
                if entry is not None and entry[0]() is text_encoder:
                    self._entries.move_to_end(key)
                    self.hits += 1
                    return _clones(entry[1])
                self.misses += 1
        # Encoded outside the lock: two threads may both encode a new prompt once, but never wait on each other.
        positive, negative = encode()
        if key is not None and self.max_entries:
            with self._lock:
                self._entries[key] = (weakref.ref(text_encoder), (positive.detach().clone(), negative.detach().clone()))
                self._entries.move_to_end(key)
                while len(self._entries) > self.max_entries:
                    self._entries.popitem(last=False)
        return positive, negative

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


def _clones(conditioning: Conditioning) -> Conditioning:
    positive, negative = conditioning
    return positive.clone(), negative.clone()


@dataclass
class Components:
    vae: Any  # diffusers.AutoencoderKL
    text_encoder: Any  # transformers.CLIPTextModel
    tokenizer: Any  # transformers.CLIPTokenizer
    unet: Any  # diffusers.UNet2DConditionModel
    scheduler_config: dict[str, Any]
    ref: ModelRef
    family: str = "sd-v1"  # sd-v1 | sd-v2 | shapes
    defaults: dict[str, Any] = field(default_factory=dict)  # width, height, steps, sampler, guidance, ...
    # Shared by copies made with `dataclasses.replace` (`with_vae`): same text encoder, same encodings.
    prompt_cache: PromptCache = field(default_factory=PromptCache, repr=False, compare=False)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def native_size(self) -> int:
        return int(self.unet.config.sample_size) * self.vae_scale_factor

    def with_vae(self, vae: Any) -> Components:
        return replace(self, vae=vae)

    def recipe_defaults(self) -> dict[str, Any]:
        """What `spellbook generate PROMPT` uses when the user names nothing else (as ModelInfo.defaults)."""
        from spellbook.models.info import recipe_defaults

        return recipe_defaults(self.native_size, self.defaults)
