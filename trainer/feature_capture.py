"""Capture cross-attention activations of a diffusers SD1.5 UNet for composition distillation.

Why attention processors: diffusers lets a caller swap the processor of chosen ``Attention`` modules
(``unet.set_attn_processor``), so the capture needs no monkeypatching of library code and the original
processors come back untouched when the context manager exits.

What is captured per chosen ``attn2`` (cross-attention) layer, all as ``[B, pixels, ...]`` and with the
autograd graph kept, so losses on them train whatever produced ``encoder_hidden_states``:

- ``out``:  the attention module's output (after ``to_out``), ``[B, N, C]``;
- ``attn``: softmax(Q K^T / sqrt(d)) averaged over heads, ``[B, N, T]`` (only when ``store_maps``);
- ``q``:    the queries after ``to_q`` (heads merged back), ``[B, N, inner]`` (only when ``store_queries``).

The layer output is computed exactly as ``AttnProcessor2_0`` computes it (same ops, same order), so a
UNet under capture returns the same prediction as without it. Attention maps cost an extra Q K^T per
head; they are computed only when asked for.
"""

from __future__ import annotations

import logging
import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence, Union

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

LayerSpec = Union[str, Sequence[str]]

# The reference implementation captured the three attn2 layers of the last up block.
DEFAULT_CAPTURE_LAYERS: tuple[str, ...] = ("up_blocks.3",)
_KNOWN_DEFAULTS = ("AttnProcessor2_0", "AttnProcessor")


@dataclass
class LayerFeatures:
    """Activations of one cross-attention layer from the latest UNet forward."""

    out: torch.Tensor
    attn: Optional[torch.Tensor] = None
    q: Optional[torch.Tensor] = None


@dataclass
class FeatureCapture:
    """Holder the capturing processors write into; ``features`` maps layer name -> ``LayerFeatures``."""

    layer_names: list[str]
    store_maps: bool = True
    store_queries: bool = True
    enabled: bool = True
    features: dict[str, LayerFeatures] = field(default_factory=dict)

    def clear(self) -> None:
        """Drop stored tensors (and with them their autograd graphs)."""
        self.features.clear()


def select_cross_attention_layers(unet: torch.nn.Module, layers: LayerSpec = DEFAULT_CAPTURE_LAYERS) -> list[str]:
    """Names (without ``.processor``) of the ``attn2`` modules matching ``layers``.

    ``layers`` is ``"all"`` or module-name prefixes such as ``"up_blocks.3"`` or a full layer name.
    """
    names = [k[: -len(".processor")] for k in unet.attn_processors]
    cross = [n for n in names if n.endswith("attn2")]
    if isinstance(layers, str):
        if layers == "all":
            return cross
        layers = [layers]
    chosen = [n for n in cross if any(n == p or n.startswith(p.rstrip(".") + ".") for p in layers)]
    if not chosen:
        raise ValueError(f"no cross-attention layer matches {list(layers)!r}; known: {cross}")
    return chosen


class CapturingAttnProcessor:
    """``AttnProcessor2_0`` plus storage of output, head-averaged maps and queries into a ``FeatureCapture``."""

    def __init__(self, name: str, capture: FeatureCapture) -> None:
        self.name = name
        self.capture = capture

    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        temb: Optional[torch.Tensor] = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        hidden_states = F.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False
        )
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)

        cap = self.capture
        if cap.enabled:
            # Stored before the 4-D reshape / residual so every layer gives [B, pixels, C].
            layer = LayerFeatures(out=hidden_states)
            if cap.store_maps:
                layer.attn = _head_mean_attention(query, key, attention_mask)
            if cap.store_queries:
                layer.q = query.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
            cap.features[self.name] = layer

        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        hidden_states = hidden_states / attn.rescale_output_factor
        return hidden_states


def _head_mean_attention(
    query: torch.Tensor, key: torch.Tensor, attention_mask: Optional[torch.Tensor]
) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d)) as SDPA computes it (default scale), averaged over heads: [B, N, T].

    The softmax runs in float32 (maps feed cosine losses; half precision loses the small entries).
    """
    scores = torch.matmul(query, key.transpose(-1, -2)) * (1.0 / math.sqrt(query.shape[-1]))
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, float("-inf"))
        else:
            scores = scores + attention_mask
    return scores.float().softmax(dim=-1).mean(dim=1)


@contextmanager
def capture_cross_attention(
    unet: torch.nn.Module,
    layers: LayerSpec = DEFAULT_CAPTURE_LAYERS,
    store_maps: bool = True,
    store_queries: bool = True,
) -> Iterator[FeatureCapture]:
    """Install capturing processors on the chosen ``attn2`` layers only; restore all processors on exit.

    Blocks that contain a captured layer have gradient checkpointing switched off for the duration
    (other blocks keep it). Usage::

        with capture_cross_attention(unet, "up_blocks.3") as cap:
            unet(latents, t, encoder_hidden_states=embeds)
            feats = cap.features  # {layer_name: LayerFeatures}
    """
    originals = dict(unet.attn_processors)
    chosen = select_cross_attention_layers(unet, layers)
    capture = FeatureCapture(layer_names=chosen, store_maps=store_maps, store_queries=store_queries)
    procs = dict(originals)
    for name in chosen:
        old = originals[name + ".processor"]
        if type(old).__name__ not in _KNOWN_DEFAULTS:
            logger.warning("replacing non-default processor %s on %s during capture", type(old).__name__, name)
        procs[name + ".processor"] = CapturingAttnProcessor(name, capture)
    # A checkpointed block would recompute its forward in backward with the original processors
    # restored (mismatched graph), so blocks holding a captured layer run without checkpointing here.
    unchecked = [
        m for n, m in unet.named_modules()
        if getattr(m, "gradient_checkpointing", False) is True and any(c.startswith(n + ".") for c in chosen)
    ]
    for m in unchecked:
        m.gradient_checkpointing = False
    unet.set_attn_processor(procs)
    logger.debug("capturing %d cross-attention layers: %s", len(chosen), chosen)
    try:
        yield capture
    finally:
        unet.set_attn_processor(originals)
        for m in unchecked:
            m.gradient_checkpointing = True
        capture.enabled = False


def feature_grid_size(num_pixels: int, height: int, width: int) -> tuple[int, int]:
    """The (h, w) of a layer with ``num_pixels`` positions for a latent of ``height`` x ``width``.

    UNet down-sampling halves each side (rounding up), so try successive power-of-two factors.
    """
    h, w = height, width
    while h * w > num_pixels:
        h, w = (h + 1) // 2, (w + 1) // 2
    if h * w != num_pixels:
        raise ValueError(f"{num_pixels} pixels do not fit a {height}x{width} latent grid")
    return h, w


def resize_mask(mask: torch.Tensor, num_pixels: int) -> torch.Tensor:
    """A [B, 1, H, W] (or [B, H, W]) mask resized to a layer's grid and flattened: [B, num_pixels]."""
    if mask.ndim == 3:
        mask = mask.unsqueeze(1)
    h, w = feature_grid_size(num_pixels, mask.shape[-2], mask.shape[-1])
    small = F.interpolate(mask.float(), size=(h, w), mode="nearest")
    return small.flatten(1)
