"""Capture cross-attention activations of a diffusers SD1.5 UNet for composition distillation.

Why forward hooks rather than replacement attention processors: with gradient checkpointing on, a
checkpointed region (diffusers checkpoints each ``BasicTransformerBlock``, non-reentrant) runs its forward
again in backward and expects exactly the tensors the first forward saved. Anything the capture does
inside that region must therefore be repeated by the recomputation, long after the capture has ended.
Hooks on ``attn2``, ``attn2.to_q`` and ``attn2.to_k`` only keep references to tensors the layer computes
anyway: they add no autograd op inside the region, so the recomputation (with or without the hooks still
registered) replays the layer's own processor unchanged, and every block keeps its checkpointing. What
costs extra ops (attention maps) is computed when the UNet forward returns, outside every checkpointed
region. A UNet-level pre/post hook pair delimits the forward pass, so the layer calls replayed by a
recomputation in backward are ignored instead of overwriting or duplicating the captures.

What is captured per chosen ``attn2`` (cross-attention) layer, all as ``[B, pixels, ...]`` and with the
autograd graph kept, so losses on them train whatever produced ``encoder_hidden_states``:

- ``out``:  the attention module's output, ``[B, N, C]`` (for SD1.5 ``attn2``: ``to_out`` of the
  attention; no residual, output factor 1);
- ``attn``: softmax(Q K^T / sqrt(d)) averaged over heads, ``[B, N, T]`` (only when ``store_maps``);
- ``q``:    the queries, ``to_q``'s output (heads merged), ``[B, N, inner]`` (only when ``store_queries``).

The UNet's processors are never touched, so a UNet under capture returns the same prediction as without
it. Attention maps cost an extra Q K^T per head; they are computed only when asked for, and under
gradient checkpointing their softmax is itself checkpointed (recomputed in backward from Q and K, which
the capture holds anyway).
"""

from __future__ import annotations

import logging
import math
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from torch.utils.hooks import RemovableHandle

logger = logging.getLogger(__name__)

LayerSpec = Union[str, Sequence[str]]

# The reference implementation captured the three attn2 layers of the last up block.
DEFAULT_CAPTURE_LAYERS: tuple[str, ...] = ("up_blocks.3",)
# Processors that compute softmax(Q K^T / sqrt(d)) V from to_q / to_k / to_v, as the maps assume.
_KNOWN_DEFAULTS = ("AttnProcessor2_0", "AttnProcessor")


@dataclass
class LayerFeatures:
    """Activations of one cross-attention layer from the latest UNet forward."""

    out: torch.Tensor
    attn: Optional[torch.Tensor] = None
    q: Optional[torch.Tensor] = None


@dataclass
class _RawLayer:
    """What the hooks of one layer saw during the current pass, before maps are derived from it."""

    module: torch.nn.Module
    query: Optional[torch.Tensor] = None
    key: Optional[torch.Tensor] = None
    mask: Optional[torch.Tensor] = None
    out: Optional[torch.Tensor] = None


@dataclass
class FeatureCapture:
    """Holder the hooks write into; ``features`` maps layer name -> ``LayerFeatures`` of the latest pass.

    ``recorded`` counts the layer outputs stored so far: one per captured layer and UNet forward. The
    layer calls a checkpoint recomputation makes in backward fall outside any pass and are not recorded.
    ``checkpoint_maps`` (set when the UNet checkpoints) checkpoints the attention-map softmax as well.
    """

    layer_names: list[str]
    store_maps: bool = True
    store_queries: bool = True
    enabled: bool = True
    checkpoint_maps: bool = False
    features: dict[str, LayerFeatures] = field(default_factory=dict)
    recorded: int = 0
    _raw: dict[str, _RawLayer] = field(default_factory=dict, repr=False)
    _in_pass: bool = field(default=False, repr=False)

    @property
    def recording(self) -> bool:
        """True only inside a UNet forward of an open capture (not during a backward recomputation)."""
        return self.enabled and self._in_pass

    def clear(self) -> None:
        """Drop stored tensors (and with them their autograd graphs)."""
        self.features.clear()
        self._raw.clear()

    def begin_pass(self) -> None:
        """UNet forward starts: forget any half-finished record (e.g. of a forward that raised)."""
        self._raw.clear()
        self._in_pass = self.enabled

    def end_pass(self) -> None:
        """UNet forward returned: turn the raw records into features, outside every checkpointed region."""
        if not self._in_pass:
            return
        self._in_pass = False
        self.features.clear()
        for name, raw in self._raw.items():
            self.features[name] = self._finish(name, raw)
        self._raw.clear()

    def store(self, name: str, module: torch.nn.Module, what: str, value: Any) -> None:
        """Keep a reference to one tensor of ``name``'s call (no op is added to the autograd graph)."""
        if self.recording:
            raw = self._raw.setdefault(name, _RawLayer(module))
            setattr(raw, what, value)
            if what == "out":
                self.recorded += 1

    def _finish(self, name: str, raw: _RawLayer) -> LayerFeatures:
        """``LayerFeatures`` of one layer; a hook that saw nothing is an error, not a missing loss term."""
        if raw.out is None:
            raise RuntimeError(f"{name} started but did not return during the UNet forward")
        missing_q = raw.query is None and (self.store_maps or self.store_queries)
        if missing_q or (self.store_maps and raw.key is None):
            raise RuntimeError(f"{name}: to_q/to_k were not called (fused projections?); cannot capture Q/K")
        layer = LayerFeatures(out=raw.out, q=raw.query if self.store_queries else None)
        if self.store_maps:
            layer.attn = self._maps(raw)
        return layer

    def _maps(self, raw: _RawLayer) -> torch.Tensor:
        """Head-averaged maps; checkpointed (softmax recomputed in backward) when the UNet checkpoints."""
        attn, query, key = raw.module, raw.query, raw.key
        mask = _prepare_mask(attn, raw.mask, query.shape[0], key.shape[1])
        if self.checkpoint_maps and torch.is_grad_enabled() and (query.requires_grad or key.requires_grad):
            return checkpoint(_head_mean_attention, query, key, attn.heads, mask, use_reentrant=False)
        return _head_mean_attention(query, key, attn.heads, mask)


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


def _check_capturable(name: str, attn: torch.nn.Module) -> None:
    """Refuse layers whose Q/K are not ``to_q`` / ``to_k``'s outputs (the maps would be silently wrong)."""
    if getattr(attn, "norm_q", None) is not None or getattr(attn, "norm_k", None) is not None:
        raise ValueError(f"{name} normalizes Q/K after the projections; its maps cannot be captured from to_q/to_k")
    if getattr(attn, "fused_projections", False):
        raise ValueError(f"{name} uses fused QKV projections; unfuse them before capturing")
    processor = type(getattr(attn, "processor", None)).__name__
    if processor not in _KNOWN_DEFAULTS:
        logger.warning("%s runs %s; captured maps assume plain softmax(QK^T/sqrt(d)) attention", name, processor)


def _prepare_mask(
    attn: torch.nn.Module, mask: Optional[torch.Tensor], batch_size: int, tokens: int
) -> Optional[torch.Tensor]:
    """The attention mask as ``AttnProcessor2_0`` hands it to SDPA: ``[B, heads, 1|N, T]``."""
    if mask is None:
        return None
    mask = attn.prepare_attention_mask(mask, tokens, batch_size)
    return mask.view(batch_size, attn.heads, -1, mask.shape[-1])


def _head_mean_attention(
    query: torch.Tensor, key: torch.Tensor, heads: int, attention_mask: Optional[torch.Tensor]
) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d)) as SDPA computes it (default scale), averaged over heads: [B, N, T].

    ``query`` ``[B, N, inner]`` and ``key`` ``[B, T, inner]`` as the projections return them. The softmax
    runs in float32 (maps feed cosine losses; half precision loses the small entries).
    """
    batch, head_dim = query.shape[0], query.shape[-1] // heads
    q = query.view(batch, -1, heads, head_dim).transpose(1, 2)
    k = key.view(batch, -1, heads, head_dim).transpose(1, 2)
    scores = torch.matmul(q, k.transpose(-1, -2)) * (1.0 / math.sqrt(head_dim))
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, float("-inf"))
        else:
            scores = scores + attention_mask
    return scores.float().softmax(dim=-1).mean(dim=1)


def _keep(capture: FeatureCapture, name: str, attn: torch.nn.Module, what: str) -> Callable[..., None]:
    """Forward hook storing a projection's output as ``what`` of layer ``name``."""

    def hook(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
        capture.store(name, attn, what, output)

    return hook


def _keep_output(capture: FeatureCapture, name: str) -> Callable[..., None]:
    """Forward hook (with kwargs) storing the layer's output and the attention mask it was called with."""

    def hook(module: torch.nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> None:
        mask = kwargs.get("attention_mask", args[2] if len(args) > 2 else None)
        capture.store(name, module, "mask", mask)
        capture.store(name, module, "out", output)

    return hook


def _hook_layer(capture: FeatureCapture, name: str, attn: torch.nn.Module) -> list[RemovableHandle]:
    """Reference-only hooks on one ``attn2`` and, as far as needed, its ``to_q`` / ``to_k``."""
    _check_capturable(name, attn)
    handles = [attn.register_forward_hook(_keep_output(capture, name), with_kwargs=True)]
    if capture.store_maps or capture.store_queries:
        handles.append(attn.to_q.register_forward_hook(_keep(capture, name, attn, "query")))
    if capture.store_maps:
        handles.append(attn.to_k.register_forward_hook(_keep(capture, name, attn, "key")))
    return handles


def _prediction(output: Any) -> Any:
    """The noise prediction in a UNet's return value (``UNet2DConditionOutput`` or a tuple)."""
    if isinstance(output, tuple):
        return output[0]
    return getattr(output, "sample", output)


def _end_pass_hook(capture: FeatureCapture) -> Callable[..., None]:
    """UNet forward hook closing the pass; warns about captures cut off from the graph.

    A reentrant checkpoint (``use_reentrant=True``) runs its region without autograd, so the captures
    would carry no gradient while the prediction still does: a loss on them would silently train nothing.
    """

    def hook(module: torch.nn.Module, args: tuple, output: Any) -> None:
        capture.end_pass()
        pred = _prediction(output)
        if not (capture.checkpoint_maps and torch.is_grad_enabled() and torch.is_tensor(pred) and pred.requires_grad):
            return
        detached = [n for n, f in capture.features.items() if not f.out.requires_grad]
        if detached:
            warnings.warn(
                f"captured {detached} carry no gradient although the UNet output does: reentrant gradient "
                "checkpointing? diffusers' default enable_gradient_checkpointing() (non-reentrant) keeps them.",
                RuntimeWarning,
                stacklevel=2,
            )

    return hook


@contextmanager
def capture_cross_attention(
    unet: torch.nn.Module,
    layers: LayerSpec = DEFAULT_CAPTURE_LAYERS,
    store_maps: bool = True,
    store_queries: bool = True,
) -> Iterator[FeatureCapture]:
    """Record the chosen ``attn2`` layers during every UNet forward inside the block; unhook on exit.

    Gradient checkpointing is left as it is (every block keeps it), and backward may run inside the
    block or after it: the captures hold references only, so recomputation never depends on the hooks,
    and calls replayed by a recomputation are not recorded. Usage::

        with capture_cross_attention(unet, "up_blocks.3") as cap:
            unet(latents, t, encoder_hidden_states=embeds)
            feats = cap.features  # {layer_name: LayerFeatures}
        loss_on(feats).backward()
    """
    chosen = select_cross_attention_layers(unet, layers)
    capture = FeatureCapture(
        layer_names=chosen,
        store_maps=store_maps,
        store_queries=store_queries,
        checkpoint_maps=bool(getattr(unet, "is_gradient_checkpointing", False)),
    )
    handles = [
        unet.register_forward_pre_hook(lambda module, args: capture.begin_pass()),
        unet.register_forward_hook(_end_pass_hook(capture)),
    ]
    try:
        for name in chosen:
            handles += _hook_layer(capture, name, unet.get_submodule(name))
        logger.debug("capturing %d cross-attention layers: %s", len(chosen), chosen)
        yield capture
    finally:
        for handle in handles:
            handle.remove()
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
