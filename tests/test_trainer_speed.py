"""The trainer's speed switches change how fast, never what: the stage-1 loss and its gradients stay equal."""

import torch

from trainer.config import FaceLossConfig, RunConfig, config_from_dict
from trainer.face_space import FaceSpace
from trainer.losses_face import FaceDistillationLoss
from trainer.models import build_models
from trainer.speed import apply_speed_options


def loss_and_grads(models):
    space = FaceSpace(None, models.id_dim, random_id_prob=1.0, id_noise_std=0.0)
    generator = torch.Generator().manual_seed(5)
    loss_fn = FaceDistillationLoss(FaceLossConfig(chain_steps=2, cfg_prob=0.5), latent_size=8)
    models.inverter.zero_grad(set_to_none=True)
    loss, _ = loss_fn(models, space.sample(3, generator), generator)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in models.inverter.parameters() if p.requires_grad]


def test_speed_options_keep_the_loss_and_gradients(tiny_models):
    # compile goes through dynamo with the eager backend here: the wiring, not inductor's kernels
    options = {"channels_last": True, "compile": True, "gradient_checkpointing": True}
    config = config_from_dict({"models": {"sd15": str(tiny_models.sd15), "arc2face": str(tiny_models.arc2face)}})
    plain = build_models(config, torch.device("cpu"), need_vae=False)
    fast = build_models(config, torch.device("cpu"), need_vae=False)
    apply_speed_options(fast, RunConfig(**options), compile_backend="eager")
    expected_loss, expected_grads = loss_and_grads(plain)
    loss, grads = loss_and_grads(fast)
    torch.testing.assert_close(loss, expected_loss, atol=1e-5, rtol=1e-5)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert fast.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert fast.unet.is_gradient_checkpointing and not plain.unet.is_gradient_checkpointing
