"""Cross-attention capture through diffusers attention processors on a tiny SD1.5-shaped UNet."""

from __future__ import annotations

import pytest
import torch

from trainer.compositions import aligned_token_index
from trainer.feature_capture import (
    CapturingAttnProcessor,
    capture_cross_attention,
    feature_grid_size,
    resize_mask,
    select_cross_attention_layers,
)
from trainer.losses_composition import CompositionLossWeights, composition_step


@pytest.fixture(scope="module")
def unet(tiny_models):
    from diffusers import UNet2DConditionModel

    model = UNet2DConditionModel.from_pretrained(str(tiny_models.sd15 / "unet"))
    model.requires_grad_(False)
    return model.eval()


def _inputs(unet, batch=2, tokens=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, 4, 16, 16, generator=g)
    embeds = torch.randn(batch, tokens, unet.config.cross_attention_dim, generator=g)
    return latents, torch.tensor(500), embeds


def _proc_types(unet):
    return {k: type(v) for k, v in unet.attn_processors.items()}


def test_layer_selection(unet):
    every = select_cross_attention_layers(unet, "all")
    assert every and all(n.endswith("attn2") for n in every)
    up3 = select_cross_attention_layers(unet, ["up_blocks.3"])
    assert up3 and all(n.startswith("up_blocks.3.") for n in up3)
    assert set(up3) < set(every)
    assert select_cross_attention_layers(unet, ["up_blocks.3", "mid_block"]) == [
        n for n in every if n.startswith(("up_blocks.3.", "mid_block."))
    ]
    with pytest.raises(ValueError):
        select_cross_attention_layers(unet, ["up_blocks.33"])


def test_capture_leaves_output_unchanged_and_restores(unet):
    latents, t, embeds = _inputs(unet)
    before = _proc_types(unet)
    originals = dict(unet.attn_processors)
    with torch.no_grad():
        ref = unet(latents, t, encoder_hidden_states=embeds).sample
        with capture_cross_attention(unet, "all") as cap:
            installed = unet.attn_processors
            got = unet(latents, t, encoder_hidden_states=embeds).sample
    assert torch.equal(got, ref)
    captured = {k for k, v in installed.items() if isinstance(v, CapturingAttnProcessor)}
    assert captured == {n + ".processor" for n in cap.layer_names}
    assert _proc_types(unet) == before
    assert all(unet.attn_processors[k] is v for k, v in originals.items())


def test_captures_chosen_layers_with_right_shapes(unet):
    latents, t, embeds = _inputs(unet, batch=2, tokens=7)
    with torch.no_grad(), capture_cross_attention(unet, ["up_blocks.3"]) as cap:
        unet(latents, t, encoder_hidden_states=embeds)
    assert set(cap.features) == set(cap.layer_names) == set(select_cross_attention_layers(unet, "up_blocks.3"))
    for name, f in cap.features.items():
        attn = unet.get_submodule(name)
        n = 16 * 16  # up_blocks.3 runs at latent resolution
        assert f.out.shape == (2, n, attn.to_out[0].out_features)
        assert f.q.shape == (2, n, attn.to_q.out_features)
        assert f.attn.shape == (2, n, 7)
        assert torch.allclose(f.attn.sum(-1), torch.ones(2, n), atol=1e-5)


def test_maps_and_queries_only_when_asked(unet):
    latents, t, embeds = _inputs(unet)
    with torch.no_grad(), capture_cross_attention(unet, "all", store_maps=False, store_queries=False) as cap:
        unet(latents, t, encoder_hidden_states=embeds)
    assert cap.features and all(f.attn is None and f.q is None for f in cap.features.values())


def test_maps_match_manual_attention(unet):
    latents, t, embeds = _inputs(unet, batch=1)
    name = select_cross_attention_layers(unet, "up_blocks.3")[0]
    attn = unet.get_submodule(name)
    with torch.no_grad(), capture_cross_attention(unet, name) as cap:
        unet(latents, t, encoder_hidden_states=embeds)
    f = cap.features[name]
    k = attn.to_k(embeds)
    h, d = attn.heads, k.shape[-1] // attn.heads
    qh = f.q.view(1, -1, h, d).transpose(1, 2)
    kh = k.view(1, -1, h, d).transpose(1, 2)
    manual = (qh @ kh.transpose(-1, -2) / d**0.5).softmax(-1).mean(1)
    assert torch.allclose(f.attn, manual, atol=1e-5)


def test_gradients_flow_to_encoder_hidden_states(unet):
    latents, t, embeds = _inputs(unet)
    embeds.requires_grad_(True)
    with capture_cross_attention(unet, "up_blocks.3") as cap:
        unet(latents, t, encoder_hidden_states=embeds)
        feats = list(cap.features.values())
    loss = sum(f.out.square().mean() + f.attn.square().mean() for f in feats)
    loss.backward()
    assert embeds.grad is not None and embeds.grad.abs().sum() > 0


def test_mask_resizing():
    assert feature_grid_size(64, 16, 16) == (8, 8)
    assert feature_grid_size(15, 6, 10) == (3, 5) and feature_grid_size(6, 6, 10) == (2, 3)
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., :32, :] = 1
    small = resize_mask(mask, 16)
    assert small.shape == (1, 16) and small.sum() == 8
    with pytest.raises(ValueError):
        feature_grid_size(10, 16, 16)


def test_composition_step_one_batched_pass(unet):
    bsz, tokens, dim = 2, 12, unet.config.cross_attention_dim
    latents = torch.randn(bsz, 4, 16, 16)
    subj = torch.randn(2 * bsz, tokens, dim, requires_grad=True)
    cls = torch.randn(2 * bsz, tokens, dim, requires_grad=True)
    masks = torch.zeros(bsz, 1, 128, 128)
    masks[..., 32:96, 32:96] = 1
    calls = []
    hook = unet.register_forward_hook(lambda m, a, kw, o: calls.append(a[0].shape[0]), with_kwargs=True)
    try:
        out = composition_step(
            unet, latents, torch.tensor([10, 900]), torch.cat([subj, cls]), masks,
            capture_layers="up_blocks.3", weights=CompositionLossWeights(face_preserve=0.5),
            token_index=aligned_token_index(4, 3, 2, seq_len=tokens),
        )
    finally:
        hook.remove()
    assert calls == [4 * bsz]
    assert set(out) == {"delta_attn_out", "delta_attn_map", "delta_prompt", "delta", "face_preserve", "loss"}
    assert all(v.ndim == 0 and torch.isfinite(v) for v in out.values())
    out["loss"].backward()
    assert subj.grad is not None and subj.grad.abs().sum() > 0
    assert cls.grad is None or cls.grad.abs().sum() == 0
    assert not any(isinstance(p, CapturingAttnProcessor) for p in unet.attn_processors.values())


def test_composition_step_with_gradient_checkpointing(unet):
    torch.manual_seed(1)
    latents, subj, cls = torch.randn(1, 4, 16, 16), torch.randn(2, 9, 64, requires_grad=True), torch.randn(2, 9, 64)
    masks = torch.ones(1, 1, 16, 16)
    grads = []
    for checkpointing in (False, True):
        if checkpointing:
            unet.enable_gradient_checkpointing()
        try:
            composition_step(unet, latents, torch.tensor(100), torch.cat([subj, cls]), masks, "all")["loss"].backward()
        finally:
            unet.disable_gradient_checkpointing()
        grads.append(subj.grad.clone())
        subj.grad = None
    assert torch.allclose(grads[0], grads[1], atol=1e-5)
