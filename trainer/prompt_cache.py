"""CLIP embeddings of prompts without a trainable token (stage 2's class prompts, stage 1's empty-prompt
negative), cached by their text.

Why: the frozen SD1.5 text encoder gives "a photo of a person riding a horse" the same embedding at every
step, and stage 2 draws its class prompts from a finite set (the composition pool times the class words of
its photos). The stage encodes that whole set once when it is built (``warm``), so a training step runs
one text-encoder pass (the subject prompts') instead of two. Each prompt is encoded on its own, so its
embedding does not depend on which batch it came with and a resumed run sees exactly the embeddings of
an uninterrupted one.
"""

from __future__ import annotations

import logging
from typing import Any, Iterable, Protocol, Sequence

import torch

logger = logging.getLogger(__name__)


class PromptEncoder(Protocol):
    """What the cache needs of ``trainer.models.Models``."""

    text_encoder: Any

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor: ...


class FrozenPromptCache:
    """``encode(models, prompts)`` -> ``[B, 77, H]``: each prompt's embedding as ``models.encode_prompts([prompt])``
    gives it, computed once per prompt and kept on the encoder's device."""

    def __init__(self) -> None:
        self._embeds: dict[str, torch.Tensor] = {}
        self._encoder = None
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._embeds)

    @property
    def cached_bytes(self) -> int:
        """Device memory the cached embeddings hold."""
        return sum(t.numel() * t.element_size() for t in self._embeds.values())

    @torch.no_grad()
    def encode(self, models: PromptEncoder, prompts: Sequence[str]) -> torch.Tensor:
        """The prompts' embeddings, a new tensor (a caller may change it in place)."""
        if self._encoder is not models.text_encoder:  # another encoder: nothing cached applies
            self._embeds.clear()
            self._encoder = models.text_encoder
        rows = []
        for prompt in prompts:
            embed = self._embeds.get(prompt)
            if embed is None:
                self.misses += 1
                embed = self._embeds[prompt] = models.encode_prompts([prompt])[0]
            else:
                self.hits += 1
            rows.append(embed)
        return torch.stack(rows)

    def warm(self, models: PromptEncoder, prompts: Iterable[str]) -> None:
        """Encodes every prompt not cached yet (call it under the precision training runs in)."""
        for prompt in dict.fromkeys(prompts):
            self.encode(models, [prompt])
        logger.info("%d class-prompt embeddings cached (%.0f MiB)", len(self), self.cached_bytes / 2**20)
