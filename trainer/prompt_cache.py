"""CLIP embeddings of prompts without a trainable token (stage 2's class prompts), cached by their text.

Why: the frozen SD1.5 text encoder gives "a photo of a person riding a horse" the same embedding at every
step, and stage 2 draws its class prompts from a pool of a few hundred compositions, so after a short
while every class prompt is a cache hit and a step runs one text-encoder pass (the subject prompts')
instead of two. Each prompt is encoded on its own, so its embedding does not depend on the batch that
first needed it and a resumed run (cache empty) sees the embeddings an uninterrupted run cached.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import torch

DEFAULT_MAX_PROMPTS = 2048
"""About 240 MB at CLIP-L width in bf16; the packaged pool has 407 compositions per class word."""


class FrozenPromptCache:
    """``encode(models, prompts)`` -> ``[B, 77, H]``, equal to ``models.encode_prompts(prompts)``; least recently
    used prompts are dropped beyond ``max_prompts``."""

    def __init__(self, max_prompts: int = DEFAULT_MAX_PROMPTS):
        self.max_prompts = max(0, int(max_prompts))
        self._embeds: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._encoder = None
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._embeds)

    @torch.no_grad()
    def encode(self, models, prompts: Sequence[str]) -> torch.Tensor:
        if self._encoder is not models.text_encoder:  # another encoder: nothing cached applies
            self._embeds.clear()
            self._encoder = models.text_encoder
        rows = []
        for prompt in prompts:
            embed = self._embeds.get(prompt)
            if embed is None:
                self.misses += 1
                embed = models.encode_prompts([prompt])[0]
                if self.max_prompts:
                    self._embeds[prompt] = embed
                    if len(self._embeds) > self.max_prompts:
                        self._embeds.popitem(last=False)
            else:
                self.hits += 1
                self._embeds.move_to_end(prompt)
            rows.append(embed)
        return torch.stack(rows)
