"""The Arc2Face ID encoder: an ArcFace vector becomes image-space prompt embeddings (Arc2Face §3.3).

The prompt ``"photo of a id person"`` is tokenised; the input embedding of the ordinary BPE token
``id`` is replaced by the 512-d ArcFace vector zero-padded to the encoder width; Arc2Face's
fine-tuned CLIP text encoder runs on it. Its output conditions the Arc2Face UNet (the teacher),
and positions 4..20 of it are the 16 ID tokens the AdaFace inverter reads. The encoder is causal,
so those positions are the same whether the prompt is padded to 22 tokens (reference) or 77.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Union

import torch
import torch.nn.functional as F
from torch import nn

from .clip_text import ClipTextTransformer
from .errors import ConfigError, ModelFileMissingError
from .weights import load_clip_text_folder

ID_PROMPT = "photo of a id person"
ID_WORD = "id"
NUM_ID_TOKENS = 16
ID_TOKEN_START = 4


@dataclass
class Arc2FaceOutput:
    prompt_embeds: torch.Tensor
    """``[B, 77, H]``: the teacher UNet's context."""
    id_tokens: torch.Tensor
    """``[B, 16, H]``: positions 4..20, the inverter's input."""


class Arc2FaceEncoder(nn.Module):
    """Arc2Face's CLIP text encoder with the ID pseudo-prompt built in."""

    def __init__(self, clip: ClipTextTransformer, tokenizer):
        super().__init__()
        self.clip = clip
        ids = tokenizer(ID_PROMPT, padding="max_length", max_length=77, truncation=True)["input_ids"]
        id_token = tokenizer(ID_WORD, add_special_tokens=False)["input_ids"]
        if len(id_token) != 1 or id_token[0] not in ids:
            raise ConfigError("the tokenizer does not encode 'id' as one token; use the SD1.5 / CLIP-L tokenizer")
        self.register_buffer("prompt_ids", torch.tensor(ids, dtype=torch.long), persistent=False)
        self.id_position = ids.index(id_token[0])
        empty = tokenizer("", padding="max_length", max_length=77)["input_ids"]
        self.register_buffer("empty_ids", torch.tensor(empty, dtype=torch.long), persistent=False)

    @classmethod
    def from_folder(cls, encoder_dir: Union[str, Path], tokenizer) -> "Arc2FaceEncoder":
        """Loads Arc2Face's ``encoder/`` folder (transformers CLIPTextModel layout)."""
        encoder_dir = Path(encoder_dir)
        if not encoder_dir.is_dir():
            raise ModelFileMissingError(
                f"Arc2Face encoder folder not found: {encoder_dir} (expected the 'encoder' folder of "
                "FoivosPar/Arc2Face with config.json and pytorch_model.bin or model.safetensors)"
            )
        if (encoder_dir / "encoder").is_dir() and not (encoder_dir / "config.json").exists():
            encoder_dir = encoder_dir / "encoder"
        return cls(load_clip_text_folder(encoder_dir), tokenizer)

    @property
    def hidden_size(self) -> int:
        return self.clip.config.hidden_size

    def forward(self, id_vectors: torch.Tensor) -> Arc2FaceOutput:
        """``id_vectors``: ``[B, D]`` unit ArcFace vectors (D <= encoder width)."""
        if id_vectors.ndim != 2:
            raise ConfigError(f"expected [batch, dim] ID vectors, got shape {tuple(id_vectors.shape)}")
        batch, dim = id_vectors.shape
        if dim > self.hidden_size:
            raise ConfigError(f"{dim}-d ID vectors do not fit an encoder of width {self.hidden_size}")
        token_embeds = self.clip.token_embeds(self.prompt_ids).unsqueeze(0).repeat(batch, 1, 1)
        padded = F.pad(id_vectors.to(token_embeds.dtype), (0, self.hidden_size - dim))
        token_embeds[:, self.id_position] = padded
        prompt_embeds = self.clip(token_embeds=token_embeds).last_hidden_state
        return Arc2FaceOutput(prompt_embeds, prompt_embeds[:, ID_TOKEN_START : ID_TOKEN_START + NUM_ID_TOKENS])

    def empty_prompt_embeds(self) -> torch.Tensor:
        """``[1, 77, H]``: the empty prompt through this encoder, the teacher's negative (Arc2Face's default)."""
        return self.clip(input_ids=self.empty_ids.unsqueeze(0)).last_hidden_state
