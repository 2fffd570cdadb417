"""The trainer's speed switches change how fast, never what: the stage-1 loss and its gradients stay equal."""

import torch

from trainer.config import FaceLossConfig, RunConfig, config_from_dict
from trainer.compositions import aligned_tokens
from trainer.face_space import FaceSpace
from trainer.losses_composition import CompositionLossWeights, composition_step
from trainer.losses_face import FaceDistillationLoss
from trainer.models import build_models
from trainer.speed import apply_speed_options, compiled_unets_see_hooks


def loss_and_grads(models):
    space = FaceSpace(None, models.id_dim, random_id_prob=1.0, id_noise_std=0.0)
    generator = torch.Generator().manual_seed(5)
    loss_fn = FaceDistillationLoss(FaceLossConfig(chain_steps=2, cfg_prob=0.5), latent_size=8)
    models.inverter.zero_grad(set_to_none=True)
    loss, _ = loss_fn(models, space.sample(3, generator), generator)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in models.inverter.parameters() if p.requires_grad]


def composition_batch(dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(noisy latents [2, 4, 8, 8], timesteps [2], the four prompts' embeddings [8, 12, dim])."""
    g = torch.Generator().manual_seed(9)
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([300, 700]), torch.randn(8, 12, dim, generator=g)


def composition_losses(models, grad: bool) -> dict:
    """Stage 2's losses on one fixed batch, read through the capture hooks (no grad: the held-out check)."""
    latents, t, embeds = composition_batch(models.unet.config.cross_attention_dim)
    with torch.set_grad_enabled(grad):
        out = composition_step(models.unet, latents, t, embeds, torch.ones(2, 1, 8, 8),
                               weights=CompositionLossWeights(face_preserve=0.5),
                               alignment=aligned_tokens(4, 3, 2, seq_len=12))
    return {k: v.detach() for k, v in out.items()}


def test_speed_options_keep_the_loss_and_gradients(tiny_models):
    # compile goes through dynamo with the eager backend here: the wiring, not inductor's kernels
    options = {"channels_last": True, "compile": True, "gradient_checkpointing": True}
    config = config_from_dict({"models": {"sd15": str(tiny_models.sd15), "arc2face": str(tiny_models.arc2face)}})
    plain = build_models(config, torch.device("cpu"), need_vae=False)
    fast = build_models(config, torch.device("cpu"), need_vae=False)
    run = RunConfig(**options)
    apply_speed_options(fast, run, compile_backend="eager")
    expected_loss, expected_grads = loss_and_grads(plain)
    loss, grads = loss_and_grads(fast)
    torch.testing.assert_close(loss, expected_loss, atol=1e-5, rtol=1e-5)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert fast.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert fast.unet.is_gradient_checkpointing and not plain.unet.is_gradient_checkpointing

    # Stage 2 on the same compiled UNets, as `--stage both` runs it. Graphs compiled for these very shapes
    # without the capture hooks (as stage 1's are, once dynamo has made the batch dynamic) must not be
    # reused once the hooks exist: they would run without them and the capture would record nothing.
    latents, t, embeds = composition_batch(fast.unet.config.cross_attention_dim)
    with compiled_unets_see_hooks(run):
        for grad in (False, True):
            with torch.set_grad_enabled(grad):
                fast.unet(latents.repeat(4, 1, 1, 1), t.repeat(4), encoder_hidden_states=embeds)
        for grad in (False, True):
            got, want = composition_losses(fast, grad), composition_losses(plain, grad)
            assert got.keys() == want.keys()
            for name in want:
                torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=1e-4)
