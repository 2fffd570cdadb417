"""Cross-attention capture through diffusers attention processors on a tiny SD1.5-shaped UNet."""

from __future__ import annotations

import pytest
import torch

from trainer.compositions import aligned_tokens
from trainer.feature_capture import (
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


def _hook_count(unet):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in unet.modules())


@pytest.fixture
def checkpointing(unet):
    """Turns the UNet's gradient checkpointing (diffusers' default, non-reentrant) on for one test."""
    unet.enable_gradient_checkpointing()
    try:
        yield
    finally:
        unet.disable_gradient_checkpointing()


def _count_calls(unet, names):
    """Forward hooks counting calls of the given modules (forward pass and backward recomputation)."""
    calls = {n: 0 for n in names}

    def counter(name):
        def hook(module, args, output):
            calls[name] += 1
        return hook

    return calls, [unet.get_submodule(n).register_forward_hook(counter(n)) for n in names]


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


def test_capture_leaves_output_and_processors_unchanged_and_unhooks(unet):
    latents, t, embeds = _inputs(unet)
    originals = dict(unet.attn_processors)
    hooks = _hook_count(unet)
    with torch.no_grad():
        ref = unet(latents, t, encoder_hidden_states=embeds).sample
        with capture_cross_attention(unet, "all") as cap:
            during = dict(unet.attn_processors)
            got = unet(latents, t, encoder_hidden_states=embeds).sample
    assert torch.equal(got, ref)
    assert set(cap.features) == set(cap.layer_names) and cap.recorded == len(cap.layer_names)
    assert all(during[k] is v and unet.attn_processors[k] is v for k, v in originals.items())
    assert _hook_count(unet) == hooks
    with torch.no_grad():
        unet(latents, t, encoder_hidden_states=embeds)
    assert cap.recorded == len(cap.layer_names)  # nothing recorded once the block is left


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


def test_maps_honour_encoder_attention_mask(unet):
    latents, t, embeds = _inputs(unet, batch=2, tokens=7)
    keep = torch.ones(2, 7)
    keep[:, 4:] = 0
    with torch.no_grad(), capture_cross_attention(unet, "up_blocks.3") as cap:
        unet(latents, t, encoder_hidden_states=embeds, encoder_attention_mask=keep)
    for f in cap.features.values():
        assert f.attn[..., 4:].abs().max() < 1e-6
        assert torch.allclose(f.attn.sum(-1), torch.ones_like(f.attn[..., 0]), atol=1e-5)


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
    hooks = _hook_count(unet)
    hook = unet.register_forward_hook(lambda m, a, kw, o: calls.append(a[0].shape[0]), with_kwargs=True)
    try:
        out = composition_step(
            unet, latents, torch.tensor([10, 900]), torch.cat([subj, cls]), masks,
            capture_layers="up_blocks.3", weights=CompositionLossWeights(face_preserve=0.5),
            alignment=aligned_tokens(4, 3, 2, seq_len=tokens),
        )
    finally:
        hook.remove()
    assert calls == [4 * bsz]
    assert set(out) == {"delta_attn_out", "delta_attn_map", "delta_prompt", "delta", "face_preserve", "loss"}
    assert all(v.ndim == 0 and torch.isfinite(v) for v in out.values())
    out["loss"].backward()
    assert subj.grad is not None and subj.grad.abs().sum() > 0
    assert cls.grad is None or cls.grad.abs().sum() == 0
    assert _hook_count(unet) == hooks


@pytest.mark.parametrize("layers", ["up_blocks.3", "all"])
def test_captured_blocks_keep_checkpointing_and_recompute_without_duplicates(unet, checkpointing, layers):
    latents, t, embeds = _inputs(unet)
    embeds.requires_grad_(True)
    chosen = select_cross_attention_layers(unet, layers)
    holders = [
        n for n, m in unet.named_modules()
        if hasattr(m, "gradient_checkpointing") and any(c.startswith(n + ".") for c in chosen)
    ]
    assert any(n.startswith("up_blocks.3") for n in holders)
    state, handles = {}, []
    for n in holders:
        handles.append(unet.get_submodule(n).register_forward_pre_hook(
            lambda m, a, n=n: state.__setitem__(n, m.gradient_checkpointing)))
    calls, counters = _count_calls(unet, chosen)
    try:
        with capture_cross_attention(unet, layers) as cap:
            unet(latents, t, encoder_hidden_states=embeds)
            kept = {n: f.out for n, f in cap.features.items()}
            assert all(calls[n] == 1 for n in chosen)
            loss = sum(f.out.square().mean() + f.attn.square().mean() + f.q.square().mean()
                       for f in cap.features.values())
            loss.backward()  # inside the block: the recomputation runs while the hooks are still there
    finally:
        for h in handles + counters:
            h.remove()
    assert state == {n: True for n in holders}
    assert all(calls[n] == 2 for n in chosen)  # each captured layer was recomputed in backward...
    assert cap.recorded == len(chosen) and set(cap.features) == set(chosen)  # ...and recorded once
    assert all(cap.features[n].out is kept[n] for n in chosen)
    assert embeds.grad is not None and embeds.grad.abs().sum() > 0


@pytest.mark.parametrize("layers", ["up_blocks.3", "all"])
def test_composition_step_same_loss_and_gradients_with_checkpointing(unet, layers):
    torch.manual_seed(1)
    inverter = torch.nn.Linear(16, 64)  # stands in for the inverter that makes the subject tokens
    ids, latents, cls = torch.randn(2, 9, 16), torch.randn(1, 4, 16, 16), torch.randn(2, 9, 64)
    masks = torch.zeros(1, 1, 16, 16)
    masks[..., 4:12, 4:12] = 1
    index = aligned_tokens(4, 3, 2, seq_len=9)
    results = []
    for on in (False, True):
        if on:
            unet.enable_gradient_checkpointing()
        try:
            subj = inverter(ids).requires_grad_(True)
            subj.retain_grad()
            out = composition_step(unet, latents, torch.tensor(100), torch.cat([subj, cls]), masks, layers,
                                   CompositionLossWeights(face_preserve=0.5), index)
            out["loss"].backward()
        finally:
            unet.disable_gradient_checkpointing()
        results.append(({k: v.detach() for k, v in out.items()}, subj.grad.clone(),
                        [p.grad.clone() for p in inverter.parameters()]))
        inverter.zero_grad()
    (loss0, input0, inv0), (loss1, input1, inv1) = results
    assert set(loss0) == set(loss1) and all(torch.allclose(loss0[k], loss1[k], atol=1e-5) for k in loss0)
    assert input0.abs().sum() > 0 and torch.allclose(input0, input1, atol=1e-5)
    assert all(g.abs().sum() > 0 and torch.allclose(g, h, atol=1e-5) for g, h in zip(inv0, inv1))
