"""Composition-distillation losses (AdaFace paper §2.3-2.4, eq. 3-8).

Reading of the equations, as implemented here:

- Orthogonal subtraction (eq. 5-6): ``Δ(s, c) = f(s,c) − ⟨f(s,c), f̂(s)⟩ f̂(s)`` with ``f̂(s) = f(s)/‖f(s)‖``.
  Eq. 6 writes the projection with ``f(s)`` itself; it is a projection (and Δ is orthogonal to f(s), as
  the text requires) only when f(s) has unit length, so we project on the unit direction. The inner
  product runs over the LAST axis: one feature vector per pixel (cross-attn outputs: channels;
  attention maps: tokens) or per token (CLIP prompt embeddings: hidden width). Δ depends on f(s) only
  through its direction, hence is invariant to f(s)'s scale, the property the paper wants.
- Delta loss (eq. 4): ``L_Δ = Σ_i w_i (1 − mean cos(Δ_i(subject), Δ_i(class)))``; the cosine is per
  feature vector (last axis) and the mean runs over batch, positions and captured layers (the
  expectation over compositions is the mean over the batch). The class branch is the teacher: detached.
  The prompt-embedding term weighs its token positions as the reference code does
  (``prompt_delta_weights``): a per-sample weighted mean, then the mean over the batch.
- Elastic face-preserving loss (eq. 7-8): ``CA = softmax(Q_single Q_comp^T)`` unscaled (footnote 2),
  softmax over subject-composition pixels; ``warped = CA @ f(comp)`` ("⊙" read as the matrix product,
  as the text says); loss = mean over face-mask pixels of ``1 − cos(warped, f(single))``, averaged over
  every captured layer. Gradients flow through both subject branches (features and queries).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import torch
import torch.nn.functional as F

from .compositions import TokenAlignment
from .feature_capture import DEFAULT_CAPTURE_LAYERS, LayerSpec, capture_cross_attention, resize_mask

logger = logging.getLogger(__name__)

EPS = 1e-6


def orthogonal_delta(f_comp: torch.Tensor, f_single: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """Δ(s,c): the part of ``f_comp`` orthogonal to ``f_single``, per vector along the last axis."""
    unit = f_single / f_single.norm(dim=-1, keepdim=True).clamp_min(eps)
    return f_comp - (f_comp * unit).sum(dim=-1, keepdim=True) * unit


def prompt_delta_weights(single_ids: torch.Tensor, comp_ids: torch.Tensor, special_ids: Sequence[int]) -> torch.Tensor:
    """Weights of the prompt-embedding delta per aligned position, ``[B, K]`` from two ``[B, K]`` id tensors.

    The reference code's scheme (AdaFace-dev ``ldm/util.py`` ``calc_prompt_emb_delta_loss``):
    ``((m_single + m_comp) / 2)²`` with ``m`` = 1 on a word token and 0 on BOS, EOS and padding
    (``embedding_manager.py`` ``update_prompt_masks``). A token of the single prompt (so of both) weighs 1,
    a composition-only token 1/4, BOS/EOS/padding 0: the padding after EOS, most of the 77 positions,
    would otherwise outweigh the composition words, where the deltas live.
    """
    special = torch.tensor(sorted(set(special_ids)), dtype=single_ids.dtype)
    words = (~torch.isin(single_ids, special)).float() + (~torch.isin(comp_ids, special)).float()
    return words.pow(2) / 4


def _weighted_mean_per_sample(values: torch.Tensor, weights: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """Mean over the batch of each sample's ``weights``-weighted mean (the reference's reduction); a sample
    whose weights are all 0 contributes 0."""
    w = weights.to(values).expand_as(values).flatten(1)
    return ((values.flatten(1) * w).sum(1) / w.sum(1).clamp_min(eps)).mean()


def delta_alignment_loss(
    subj_single: torch.Tensor,
    subj_comp: torch.Tensor,
    cls_single: torch.Tensor,
    cls_comp: torch.Tensor,
    weights: Optional[torch.Tensor] = None,
    eps: float = EPS,
) -> torch.Tensor:
    """``1 − mean cos(Δ(subject), Δ(class))`` for one feature type; the class deltas carry no gradient.

    ``weights`` (broadcastable to the cosines, batch first; e.g. ``prompt_delta_weights``) makes the mean a
    per-sample weighted one; None weighs every vector alike.
    """
    d_subj = orthogonal_delta(subj_comp, subj_single, eps)
    d_cls = orthogonal_delta(cls_comp.detach(), cls_single.detach(), eps)
    cos = F.cosine_similarity(d_subj, d_cls, dim=-1, eps=eps)
    if weights is None:
        return 1.0 - cos.mean()
    return _weighted_mean_per_sample(1.0 - cos, weights, eps)


def compositional_delta_loss(
    features: Mapping[str, Sequence[Sequence[torch.Tensor]]],
    weights: Optional[Mapping[str, float]] = None,
) -> dict[str, torch.Tensor]:
    """L_Δ over feature types.

    ``features[type]`` is a list (one entry per layer, or a single entry) of 4-tuples
    ``(subj_single, subj_comp, cls_single, cls_comp)``, or 5-tuples ending with the positions' weights
    (``delta_alignment_loss``). Per type the loss is averaged over layers;
    the total is the weighted sum over types. Returns ``{"delta_<type>": ..., "delta": total}``.
    """
    out: dict[str, torch.Tensor] = {}
    total: Optional[torch.Tensor] = None
    for kind, layers in features.items():
        if not layers:
            continue
        per_type = torch.stack([delta_alignment_loss(*quad) for quad in layers]).mean()
        out[f"delta_{kind}"] = per_type
        w = 1.0 if weights is None else float(weights.get(kind, 1.0))
        total = w * per_type if total is None else total + w * per_type
    if total is None:
        raise ValueError("no features given to compositional_delta_loss")
    out["delta"] = total
    return out


def elastic_face_preserving_loss(
    q_single: torch.Tensor,
    q_comp: torch.Tensor,
    feat_single: torch.Tensor,
    feat_comp: torch.Tensor,
    mask: torch.Tensor,
    scale: float = 1.0,
    eps: float = EPS,
) -> torch.Tensor:
    """Eq. 7-8 on one layer.

    Shapes: queries ``[B, N, D]``, features ``[B, N, C]``, ``mask`` ``[B, N]`` over subject-single pixels
    (non-zero = face). ``scale`` multiplies the logits (1.0 = the paper's unscaled product; the
    reference code's cached queries amount to 1/sqrt(d)). Only masked positions enter the mean.
    """
    ca = torch.softmax(torch.bmm(q_single, q_comp.transpose(1, 2)) * scale, dim=-1)  # [B, N, N]
    warped = torch.bmm(ca, feat_comp)
    cos = F.cosine_similarity(warped, feat_single, dim=-1, eps=eps)  # [B, N]
    m = (mask > 0).to(cos.dtype)
    # m counts pixels, so clamping at 1 changes nothing but an empty mask, which then gives 0 (graph kept)
    # without the host reading the count back (a device sync per layer).
    return ((1.0 - cos) * m).sum() / m.sum().clamp_min(1.0)


def face_preserving_loss_over_layers(
    layers: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]],
    scale: float = 1.0,
) -> torch.Tensor:
    """Mean of ``elastic_face_preserving_loss`` over layers of ``(q_single, q_comp, f_single, f_comp, mask)``."""
    return torch.stack([elastic_face_preserving_loss(*layer, scale=scale) for layer in layers]).mean()


@dataclass(frozen=True)
class CompositionLossWeights:
    """Weights of the composition-distillation terms (0 disables a term and skips its work)."""

    delta_attn_out: float = 1.0
    delta_attn_map: float = 1.0
    delta_prompt: float = 1.0
    face_preserve: float = 1.0
    face_preserve_scale: float = 1.0  # logit scale of eq. 7; 1.0 = the paper's unscaled product

    def delta_weights(self) -> dict[str, float]:
        return {"attn_out": self.delta_attn_out, "attn_map": self.delta_attn_map, "prompt": self.delta_prompt}


def combine_composition_losses(
    delta_features: Mapping[str, Sequence[Sequence[torch.Tensor]]],
    face_layers: Optional[Sequence[tuple[torch.Tensor, ...]]],
    weights: CompositionLossWeights = CompositionLossWeights(),
) -> dict[str, torch.Tensor]:
    """Weighted sum of L_Δ and the face-preserving loss; named scalars for logging, ``"loss"`` = total.

    Feature types with zero weight are skipped, not computed.
    """
    dw = weights.delta_weights()
    active = {k: v for k, v in delta_features.items() if dw.get(k, 1.0) != 0.0 and v}
    out: dict[str, torch.Tensor] = {}
    total: Optional[torch.Tensor] = None
    if active:
        out.update(compositional_delta_loss(active, dw))
        total = out["delta"]
    if face_layers and weights.face_preserve != 0.0:
        fp = face_preserving_loss_over_layers(face_layers, scale=weights.face_preserve_scale)
        out["face_preserve"] = fp
        total = weights.face_preserve * fp if total is None else total + weights.face_preserve * fp
    if total is None:
        raise ValueError("every composition loss term is disabled or has no features")
    out["loss"] = total
    return out


def _split4(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    if x.shape[0] % 4:
        raise ValueError(f"batch {x.shape[0]} is not 4 stacked instances")
    a, b, c, d = x.chunk(4, dim=0)
    return a, b, c, d


def _align_tokens(quad: Sequence[torch.Tensor], token_index: Optional[torch.Tensor], dim: int) -> list[torch.Tensor]:
    """Pick, per instance kind (and per sample for a ``[B, 4, K]`` index), the positions that correspond."""
    if token_index is None:
        return list(quad)
    if token_index.ndim == 2:
        return [x.index_select(dim, token_index[k].to(x.device)) for k, x in enumerate(quad)]
    return [
        torch.stack([x[b].index_select(dim - 1, token_index[b, k].to(x.device)) for b in range(x.shape[0])])
        for k, x in enumerate(quad)
    ]


def aligned_attention_maps(maps: Sequence[torch.Tensor], alignment: Optional[TokenAlignment]) -> list[torch.Tensor]:
    """The four kinds' attention maps ``[B, N, T]`` at their aligned token positions, plus one more: the attention
    on the subject tokens (on 'a <class>' in the class prompts), summed.

    Without that column a subject that takes attention from the rest of the prompt, the dominance composition
    distillation exists to curb (§2.3), would only scale the other columns of each pixel alike (exactly so
    in one head), and the orthogonal delta cannot see a scale.
    """
    if alignment is None:
        return list(maps)
    kept = _align_tokens(maps, alignment.index, dim=2)
    subject = alignment.subject
    out = []
    for k, (x, columns) in enumerate(zip(maps, kept)):
        mask = subject[k] if subject.ndim == 2 else subject[:, k, None, :]
        out.append(torch.cat([columns, (x * mask.to(x.device, x.dtype)).sum(dim=-1, keepdim=True)], dim=-1))
    return out


def composition_step(
    unet: torch.nn.Module,
    noisy_latents: torch.Tensor,
    timesteps: torch.Tensor,
    prompt_embeds: torch.Tensor,
    face_masks: Optional[torch.Tensor] = None,
    capture_layers: LayerSpec = DEFAULT_CAPTURE_LAYERS,
    weights: CompositionLossWeights = CompositionLossWeights(),
    alignment: Optional[TokenAlignment] = None,
    unet_kwargs: Optional[dict] = None,
    prompt_weights: Optional[torch.Tensor] = None,
) -> dict[str, torch.Tensor]:
    """One batched UNet pass over the four prompt instances, returning the composition losses.

    - ``noisy_latents`` ``[B, 4, h, w]``: the same noisy latents (same initial noise) for all four kinds.
    - ``timesteps``: scalar or ``[B]``.
    - ``prompt_embeds`` ``[4B, T, D]``: blocks of B in the order subject-single, subject-composition,
      class-single, class-composition (the subject blocks carry the inverter's gradient).
    - ``face_masks`` ``[B, 1, H, W]`` at latent or image resolution; None skips the face-preserving loss.
    - ``alignment``: the token positions that correspond across the four prompts, and the subject's
      (``trainer.compositions.aligned_tokens``; one per sample when the samples' class words differ in
      length); used for the attention maps' token axis (``aligned_attention_maps``) and the prompt
      embeddings' sequence axis. None compares all positions as they are.
    - ``prompt_weights`` ``[B, K]``: weights of the prompt embeddings' aligned positions
      (``prompt_delta_weights``); None weighs them alike.
    Returns ``{"delta_attn_out", "delta_attn_map", "delta_prompt", "delta", "face_preserve", "loss"}``
    (terms with weight 0 are absent).

    The UNet may run with gradient checkpointing on (every block keeps it): the capture only holds
    references, so the caller's later ``backward`` recomputes the checkpointed blocks unchanged.
    """
    bsz = noisy_latents.shape[0]
    if prompt_embeds.shape[0] != 4 * bsz:
        raise ValueError(f"prompt_embeds batch {prompt_embeds.shape[0]} != 4 x latents batch {bsz}")
    latents = noisy_latents.repeat(4, 1, 1, 1)
    t = timesteps.repeat(4) if torch.is_tensor(timesteps) and timesteps.ndim == 1 else timesteps
    want_maps = weights.delta_attn_map != 0.0
    want_face = face_masks is not None and weights.face_preserve != 0.0
    with capture_cross_attention(unet, capture_layers, store_maps=want_maps, store_queries=want_face) as cap:
        unet(latents, t, encoder_hidden_states=prompt_embeds, **(unet_kwargs or {}))
        feats = dict(cap.features)
    cap.clear()
    if not feats:
        raise RuntimeError("the UNet forward recorded no cross-attention features (was it called via __call__?)")

    delta: dict[str, list] = {"attn_out": [], "attn_map": [], "prompt": []}
    face: list[tuple[torch.Tensor, ...]] = []
    for layer in feats.values():
        if weights.delta_attn_out != 0.0:
            delta["attn_out"].append(_split4(layer.out))
        if want_maps and layer.attn is not None:
            delta["attn_map"].append(aligned_attention_maps(_split4(layer.attn), alignment))
        if want_face and layer.q is not None:
            q = _split4(layer.q)
            out = _split4(layer.out)
            mask = resize_mask(face_masks.to(out[0].device), out[0].shape[1])
            face.append((q[0], q[1], out[0], out[1], mask))
    if weights.delta_prompt != 0.0:
        aligned = _align_tokens(_split4(prompt_embeds), None if alignment is None else alignment.index, dim=1)
        delta["prompt"].append(aligned if prompt_weights is None else (*aligned, prompt_weights))
    return combine_composition_losses(delta, face, weights)
