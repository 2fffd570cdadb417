"""The AdaFace prompt inverter: image-space ID tokens in, text-space subject tokens out (paper §2.2).

A CLIP-L text transformer reads the template ``"photo of a " + ", " * (N + 2)`` whose input
embeddings at positions ``offset .. offset+N`` are the Arc2Face ID tokens; a learned mix of its
last hidden states, after the final layer norm, at those positions, is the subject. The template
is stored as token ids in the configuration, so no tokenizer is needed at inference.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Sequence

import torch
from torch import nn

from .clip_text import ClipTextConfig, ClipTextTransformer
from .errors import ConfigError

# "photo of a , , , ..." for 16 tokens, with the OpenAI CLIP-L vocabulary (49406 = start, 49407 = end/pad).
_PHOTO_OF_A = [49406, 1125, 539, 320]
_COMMA = 267
_END = 49407


def reference_template_ids(num_tokens: int = 16, length: int = 77) -> list[int]:
    """Token ids of the reference template ``"photo of a " + ", " * (N + 2)`` padded to ``length``."""
    ids = _PHOTO_OF_A + [_COMMA] * (num_tokens + 2) + [_END]
    if len(ids) > length:
        raise ConfigError(f"{num_tokens} subject tokens do not fit a {length}-token prompt")
    return ids + [_END] * (length - len(ids))


@dataclass
class InverterConfig:
    """Everything needed to rebuild an inverter before loading its weights (stored in checkpoints)."""

    clip: ClipTextConfig = field(default_factory=ClipTextConfig)
    num_tokens: int = 16
    token_offset: int = 4
    attention_multipliers: list[int] = field(default_factory=lambda: [1] * 12)
    num_hidden_state_layers: int = 3
    template_ids: list[int] = field(default_factory=reference_template_ids)
    pad_token_id: int = _END
    id_encoder: str = "arc2face"
    expansion_history: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if isinstance(self.clip, dict):
            self.clip = ClipTextConfig.from_dict(self.clip)
        if len(self.attention_multipliers) != self.clip.num_hidden_layers:
            raise ConfigError(
                f"attention_multipliers has {len(self.attention_multipliers)} entries, "
                f"the CLIP text model has {self.clip.num_hidden_layers} layers"
            )
        if any(m < 1 for m in self.attention_multipliers):
            raise ConfigError(f"attention multipliers must be >= 1, got {self.attention_multipliers}")
        if self.num_tokens < 1 or self.token_offset < 1:
            raise ConfigError(f"num_tokens and token_offset must be >= 1 (position 0 is the start token), "
                              f"got {self.num_tokens} and {self.token_offset}")
        if self.token_offset + self.num_tokens > len(self.template_ids):
            raise ConfigError("subject tokens run past the end of the template")
        if len(self.template_ids) > self.clip.max_position_embeddings:
            raise ConfigError(f"the template has {len(self.template_ids)} tokens, the CLIP text model "
                              f"{self.clip.max_position_embeddings} positions")
        ids = [*self.template_ids, self.pad_token_id]
        if not all(0 <= i < self.clip.vocab_size for i in ids):
            raise ConfigError(f"template and pad token ids must lie in the CLIP vocabulary (0..{self.clip.vocab_size - 1}), "
                              f"got {min(ids)}..{max(ids)}")
        if not 1 <= self.num_hidden_state_layers <= self.clip.num_hidden_layers + 1:
            raise ConfigError("num_hidden_state_layers must be between 1 and the number of layers + 1")

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "InverterConfig":
        values = json.loads(text)
        values["clip"] = ClipTextConfig.from_dict(values["clip"])
        return cls(**values)


class PromptInverter(nn.Module):
    """Maps ``[B, N, H]`` Arc2Face ID tokens to ``[B, N, H]`` SD1.5 text-input-space subject tokens."""

    def __init__(self, config: InverterConfig):
        super().__init__()
        self.config = config
        self.clip = ClipTextTransformer(config.clip, list(config.attention_multipliers))
        k = config.num_hidden_state_layers
        # Reference initialisation [1, 2, 4] for three layers: deeper layers weigh more.
        self.hidden_state_layer_weights = nn.Parameter(torch.tensor([2.0**i for i in range(k)]))
        self.register_buffer("template_ids", torch.tensor(config.template_ids, dtype=torch.long), persistent=False)

    @classmethod
    def from_clip(cls, clip: ClipTextTransformer, config: Optional[InverterConfig] = None) -> "PromptInverter":
        """A fresh inverter initialised from CLIP text weights (the reference starts from OpenAI CLIP-L)."""
        config = config or InverterConfig(clip=clip.config, attention_multipliers=clip.attention_multipliers)
        inverter = cls(config)
        inverter.clip.load_state_dict(clip.state_dict())
        return inverter.to(next(clip.parameters()).dtype)

    def freeze_embeddings(self) -> None:
        """Token and position embeddings stay CLIP's: only the transformer learns (reference setting)."""
        self.clip.embeddings.requires_grad_(False)

    @property
    def num_tokens(self) -> int:
        return self.config.num_tokens

    def pad_embeddings(self) -> torch.Tensor:
        """Input embedding (token + position) of the pad token at the subject positions: ``[N, H]``."""
        start = self.config.token_offset
        positions = torch.arange(start, start + self.num_tokens, device=self.template_ids.device)
        pad = torch.full_like(positions, self.config.pad_token_id)
        embeds = self.clip.embeddings
        return embeds.token_embedding(pad) + embeds.position_embedding(positions)

    def forward(self, id_tokens: torch.Tensor, id_guidance_scale: float = 1.0) -> torch.Tensor:
        batch, n, _ = id_tokens.shape
        if n != self.num_tokens:
            raise ConfigError(f"the inverter takes {self.num_tokens} ID tokens, got {n}")
        start = self.config.token_offset
        token_embeds = self.clip.token_embeds(self.template_ids).unsqueeze(0).repeat(batch, 1, 1)
        token_embeds[:, start : start + n] = id_tokens.to(token_embeds.dtype)
        out = self.clip(token_embeds=token_embeds, output_hidden_states=True)
        k = self.config.num_hidden_state_layers
        weights = self.hidden_state_layer_weights / self.hidden_state_layer_weights.sum()
        mixed = sum(w * h for w, h in zip(weights.to(token_embeds.dtype), out.hidden_states[-k:]))
        subject = self.clip.final_layer_norm(mixed)[:, start : start + n]
        if id_guidance_scale != 1.0:
            subject = id_guidance_scale * subject + (1.0 - id_guidance_scale) * self.pad_embeddings().to(subject.dtype)
        return subject

    def expand(
        self,
        factors: Sequence[int],
        perturb_std: float = 0.1,
        generator: Optional[torch.Generator] = None,
        step: Optional[int] = None,
    ) -> None:
        """Dynamic model expansion: multiplies layer ``i``'s key/value copies by ``factors[i]``.

        New parameters replace the old ones, so an optimizer must be rebuilt afterwards. The
        configuration (multipliers and history) follows, so a checkpoint written after this
        reloads with the same shapes.
        """
        layers = self.clip.encoder.layers
        if len(factors) != len(layers):
            raise ConfigError(f"{len(factors)} expansion factors for {len(layers)} layers")
        for layer, factor in zip(layers, factors):
            layer.self_attn.expand(int(factor), perturb_std, generator)
        self.config.attention_multipliers = self.clip.attention_multipliers
        self.config.expansion_history.append({"step": step, "factors": [int(f) for f in factors], "perturb_std": perturb_std})
