"""A CLIP text transformer that takes input embeddings and grows its attention.

One implementation serves the Arc2Face ID encoder, the prompt inverter and the SD1.5 text
encoder: all three are CLIP-L text transformers whose input token embeddings are replaced
in places. Parameter names follow transformers' ``CLIPTextModel`` (``embeddings.*``,
``encoder.layers.N.*``, ``final_layer_norm.*``), so the files users download load as they are,
whatever transformers version is installed. The attention can hold ``m`` copies of its key and
value projections (AdaFace's dynamic model expansion, paper §2.2): the copies are folded into
the key sequence, so the output keeps its length.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError

_ACTIVATIONS = {
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "gelu": F.gelu,
}


@dataclass(frozen=True)
class ClipTextConfig:
    """The architecture fields of a transformers ``CLIPTextConfig`` that the forward pass uses."""

    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"

    def __post_init__(self) -> None:
        """A damaged or hand-edited config is refused here, in words, not by a model that fails later."""
        sizes = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("layer_norm_eps", "hidden_act")}
        bad = [f"{name}={value!r}" for name, value in sizes.items()
               if isinstance(value, bool) or not isinstance(value, int) or value < 1]
        if bad:
            raise ConfigError(f"the CLIP config needs whole numbers from 1 up: {', '.join(bad)}")
        eps = self.layer_norm_eps
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < 1:
            raise ConfigError(f"the CLIP config's layer_norm_eps must be a small positive number, got {eps!r}")
        if not isinstance(self.hidden_act, str) or self.hidden_act not in _ACTIVATIONS:
            raise ConfigError(f"unsupported CLIP activation {self.hidden_act!r}; expected one of {sorted(_ACTIVATIONS)}")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError("hidden_size must be divisible by num_attention_heads")

    @classmethod
    def from_dict(cls, values: Any) -> "ClipTextConfig":
        """Reads a transformers ``config.json`` dict (extra keys are ignored)."""
        if not isinstance(values, dict):
            raise ConfigError(f"a CLIP config must be a JSON object, got {type(values).__name__}")
        if values.get("text_config"):
            values = values["text_config"]
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_hf_json(self) -> str:
        """A ``config.json`` that transformers' ``CLIPTextModel.from_pretrained`` accepts."""
        values = self.to_dict() | {
            "architectures": ["CLIPTextModel"],
            "model_type": "clip_text_model",
            "bos_token_id": 49406,
            "eos_token_id": 49407,
            "pad_token_id": 1,
            "projection_dim": 768,
        }
        return json.dumps(values, indent=2)


def tile_rows(tensor: torch.Tensor, factor: int) -> torch.Tensor:
    """``factor`` copies along dim 0, copy ``j`` of row ``i`` at row ``j * rows + i``: how an expansion lays
    out the replicated key/value projections (the trainer tiles their optimizer state the same way)."""
    return tensor.repeat(factor, *([1] * (tensor.dim() - 1)))


class ClipAttention(nn.Module):
    """Causal multi-head self-attention whose keys and values may be replicated ``multiplier`` times.

    With ``multiplier == m`` the key and value projections output ``m * hidden`` features per
    token; they are read as ``m`` extra key/value tokens per position, all under the same causal
    mask. Identical copies leave the output unchanged (softmax splits the weight evenly).
    """

    def __init__(self, config: ClipTextConfig, multiplier: int = 1):
        super().__init__()
        hidden = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = hidden // self.num_heads
        self.multiplier = multiplier
        self.q_proj = nn.Linear(hidden, hidden)
        self.k_proj = nn.Linear(hidden, hidden * multiplier)
        self.v_proj = nn.Linear(hidden, hidden * multiplier)
        self.out_proj = nn.Linear(hidden, hidden)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch, length, hidden = hidden_states.shape
        m = self.multiplier
        query = self.q_proj(hidden_states).view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
        # [B, T, m*hidden] -> [B, T*m, heads, head_dim]: copy j of token t sits at key index t*m + j.
        key = self.k_proj(hidden_states).view(batch, length * m, self.num_heads, self.head_dim).transpose(1, 2)
        value = self.v_proj(hidden_states).view(batch, length * m, self.num_heads, self.head_dim).transpose(1, 2)
        causal = torch.ones(length, length, dtype=torch.bool, device=hidden_states.device).tril()
        if m > 1:
            causal = causal.repeat_interleave(m, dim=1)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=causal)
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, hidden))

    @torch.no_grad()
    def expand(self, factor: int, perturb_std: float = 0.1, generator: Optional[torch.Generator] = None) -> None:
        """Replicates the key/value projections ``factor`` times and perturbs the new copies.

        ``perturb_std`` is relative to each weight's own standard deviation; with 0 the layer's
        output is exactly what it was.
        """
        if factor < 1:
            raise ConfigError(f"expansion factor must be >= 1, got {factor}")
        if factor == 1:
            return
        for name in ("k_proj", "v_proj"):
            old: nn.Linear = getattr(self, name)
            new = nn.Linear(old.in_features, old.out_features * factor, device=old.weight.device, dtype=old.weight.dtype)
            new.weight.copy_(tile_rows(old.weight, factor))
            new.bias.copy_(tile_rows(old.bias, factor))
            if perturb_std > 0:
                added = new.weight[old.out_features :]
                noise = torch.randn(added.shape, generator=generator, device="cpu", dtype=torch.float32)
                added.add_((noise * perturb_std * old.weight.float().std().cpu()).to(added))
            new.weight.requires_grad_(old.weight.requires_grad)
            new.bias.requires_grad_(old.bias.requires_grad)
            setattr(self, name, new)
        self.multiplier *= factor


class ClipMLP(nn.Module):
    def __init__(self, config: ClipTextConfig):
        super().__init__()
        self.activation = _ACTIVATIONS[config.hidden_act]
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation(self.fc1(x)))


class ClipEncoderLayer(nn.Module):
    def __init__(self, config: ClipTextConfig, multiplier: int = 1):
        super().__init__()
        self.self_attn = ClipAttention(config, multiplier)
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = ClipMLP(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class ClipEmbeddings(nn.Module):
    def __init__(self, config: ClipTextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embedding = nn.Embedding(config.max_position_embeddings, config.hidden_size)

    def forward(self, token_embeds: torch.Tensor) -> torch.Tensor:
        length = token_embeds.shape[1]
        return token_embeds + self.position_embedding.weight[:length].to(token_embeds.dtype)


class ClipEncoder(nn.Module):
    def __init__(self, config: ClipTextConfig, multipliers: Optional[list[int]] = None):
        super().__init__()
        multipliers = multipliers or [1] * config.num_hidden_layers
        self.layers = nn.ModuleList(ClipEncoderLayer(config, m) for m in multipliers)


@dataclass
class ClipTextOutput:
    last_hidden_state: torch.Tensor
    """After ``final_layer_norm``: what SD1.5's UNet reads as context."""
    hidden_states: list[torch.Tensor]
    """Embedding output, then each layer's output (before the final layer norm)."""


class ClipTextTransformer(nn.Module):
    """CLIP's text transformer, fed with token ids or with already-looked-up token embeddings."""

    def __init__(self, config: ClipTextConfig, multipliers: Optional[list[int]] = None):
        super().__init__()
        if multipliers is not None and len(multipliers) != config.num_hidden_layers:
            raise ConfigError(
                f"{len(multipliers)} attention multipliers given for {config.num_hidden_layers} layers"
            )
        self.config = config
        self.embeddings = ClipEmbeddings(config)
        self.encoder = ClipEncoder(config, multipliers)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    @property
    def attention_multipliers(self) -> list[int]:
        return [layer.self_attn.multiplier for layer in self.encoder.layers]

    def token_embeds(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Input token embeddings (no position), the level where subject tokens are spliced in."""
        return self.embeddings.token_embedding(input_ids)

    def forward(
        self,
        input_ids: Optional[torch.Tensor] = None,
        token_embeds: Optional[torch.Tensor] = None,
        output_hidden_states: bool = False,
    ) -> ClipTextOutput:
        if token_embeds is None:
            if input_ids is None:
                raise ValueError("pass input_ids or token_embeds")
            token_embeds = self.token_embeds(input_ids)
        x = self.embeddings(token_embeds)
        hidden_states = [x] if output_hidden_states else []
        for layer in self.encoder.layers:
            x = layer(x)
            if output_hidden_states:
                hidden_states.append(x)
        return ClipTextOutput(self.final_layer_norm(x), hidden_states)
