"""A training micro-batch never makes the host wait for the GPU (issue 6: no host-device syncs in the loop).

Each stage's loss and backward run on the meta device, which has shapes but no values: any read of a
device value on the host (``.item()``, ``bool()``, ``.tolist()``, ``nonzero``), which on CUDA would stall
until every queued kernel has run, raises there. A dispatch mode records every host-to-device copy,
which must be ``non_blocking`` (pinned on CUDA): a plain copy from pageable memory synchronizes the stream
too, as does a host index into a device tensor or ``torch.tensor(..., device=...)``. Photos are served
from a cache warmed on the CPU, as after their first use in training (a first use waits once)."""

from __future__ import annotations

import sys
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from adaface_core.devices import host_to_device
from trainer.compositions import load_composition_pool
from trainer.config import FaceLossConfig, config_from_dict
from trainer.data import FaceImages
from trainer.face_space import FaceSpace
from trainer.losses_face import FaceDistillationLoss
from trainer.models import Models, build_models
from trainer.stage_composition import CompositionSettings, CompositionStage

LATENT = 8  # the tiny VAE maps 64 px photos to 8x8 latents
META = torch.device("meta")
PROJECT = str(Path(__file__).resolve().parents[1])
INSTALLED = (sys.prefix, sys.base_prefix)


def _call_site() -> str:
    """The innermost frame of the project's own code (not tests, not installed packages)."""
    ours = [f for f in traceback.extract_stack()
            if f.filename.startswith(PROJECT) and not f.filename.startswith(INSTALLED) and "/tests/" not in f.filename]
    return f"{ours[-1].filename}:{ours[-1].lineno}" if ours else "outside the project"


class BlockingHostCopies(TorchDispatchMode):
    """Records the project's call site of every host-to-device copy that would block on CUDA: a ``.to`` or
    ``copy_`` that is not ``non_blocking``, and a host tensor (not a 0-d scalar) handed to an op on the
    device, e.g. a CPU index in ``x[rows]``, which CUDA copies over with a blocking copy."""

    def __init__(self) -> None:
        super().__init__()
        self.sites: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._to_copy.default:
            source, target = args[0].device, kwargs.get("device")
            blocking = not kwargs.get("non_blocking", False)
        elif func is torch.ops.aten.copy_.default:
            source, target = args[1].device, args[0].device
            blocking = not (args[2] if len(args) > 2 else kwargs.get("non_blocking", False))
        else:
            tensors = [x for x in tree_flatten((args, kwargs))[0] if isinstance(x, torch.Tensor)]
            on_device = [x for x in tensors if x.device.type != "cpu"]
            host = [x for x in tensors if x.device.type == "cpu" and x.ndim > 0]
            source, target, blocking = torch.device("cpu"), on_device[0].device if on_device else None, bool(host)
        if blocking and source.type == "cpu" and target is not None and torch.device(target).type != "cpu":
            self.sites.append(f"{func}: {_call_site()}")
        return func(*args, **kwargs)


class TensorsMadeOnTheDevice(TorchFunctionMode):
    """Records ``torch.tensor(data, device=<not the CPU>)`` (a blocking copy that dispatch modes never see)."""

    def __init__(self) -> None:
        super().__init__()
        self.sites: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.tensor and kwargs.get("device") is not None and torch.device(kwargs["device"]).type != "cpu":
            self.sites.append(f"torch.tensor: {_call_site()}")
        return func(*args, **kwargs)


def on_meta(models: Models) -> Models:
    """The same models with their weights on the meta device (values gone, shapes kept)."""
    for name in ("text_encoder", "unet", "teacher_unet", "id_encoder", "inverter", "vae"):
        getattr(models, name).to(META)
    models.device = META
    return models


@pytest.fixture
def face_space(tmp_path, tiny_models):
    """Three 64 px photos (one with a mask) and random IDs, mixed in every batch; the models on meta,
    the photo cache warmed on the CPU first."""
    rng = np.random.default_rng(0)
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"p{i}.png")
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(paths[-1])
    Image.fromarray(np.full((64, 64), 255, np.uint8)).save(tmp_path / "p0_mask.png")
    ids = F.normalize(torch.randn(3, 512, generator=torch.Generator().manual_seed(0)), dim=-1)
    config = config_from_dict({"models": {"sd15": str(tiny_models.sd15), "arc2face": str(tiny_models.arc2face)}})
    models = build_models(config, torch.device("cpu"))
    space = FaceSpace(FaceImages(tmp_path, paths, ids, 64), models.id_dim, random_id_prob=0.5, id_noise_std=0.01)
    space.photos.get(models, [0, 1, 2], LATENT)
    return space, on_meta(models)


def mixed_batch(draw, size: int, generator: torch.Generator):
    """A batch from ``draw`` holding both photos and random IDs."""
    for _ in range(20):
        batch = draw(size, generator)
        has_image = batch.has_image if hasattr(batch, "has_image") else batch.faces.has_image
        if bool(has_image.any()) and not bool(has_image.all()):
            return batch
    raise AssertionError("no mixed batch in 20 draws")


def assert_no_sync(loss_of_batch) -> None:
    with TensorsMadeOnTheDevice() as made, BlockingHostCopies() as copies:
        loss = loss_of_batch()  # on meta, reading a device value raises here
        loss.backward()
    assert loss.device == META
    assert copies.sites + made.sites == [], f"blocking host-to-device copies at {copies.sites + made.sites}"


@pytest.mark.parametrize("cfg_prob", [0.0, 0.5, 1.0])
def test_a_stage1_micro_batch_reads_nothing_back_and_copies_asynchronously(face_space, cfg_prob):
    space, models = face_space
    generator = torch.Generator().manual_seed(3)
    batch = mixed_batch(space.sample, 4, generator)
    loss_fn = FaceDistillationLoss(FaceLossConfig(chain_steps=3, cfg_prob=cfg_prob), LATENT)
    assert_no_sync(lambda: loss_fn(models, batch, generator)[0])


def test_a_stage2_micro_batch_reads_nothing_back_and_copies_asynchronously(face_space):
    space, models = face_space
    generator = torch.Generator().manual_seed(3)
    stage = CompositionStage(space, load_composition_pool(), CompositionSettings(), "z",
                             FaceDistillationLoss(FaceLossConfig(), LATENT), models.num_train_timesteps)
    stage.class_prompts.warm(models, stage.class_prompt_texts())
    batch = mixed_batch(stage.sample_batch, 3, generator)
    assert_no_sync(lambda: stage.loss(models, batch, generator)[0])


def test_the_recorders_see_blocking_copies_and_host_to_device_avoids_them():
    """The check above can fail: a plain ``.to``, a host index into a device tensor and ``torch.tensor`` on
    the device are each caught; ``host_to_device`` is not, and it keeps the values."""
    x = torch.arange(6.0).view(2, 3)
    on_device = torch.zeros(4, 3, device=META)
    with TensorsMadeOnTheDevice() as made, BlockingHostCopies() as copies:
        x.to(META)
        on_device[torch.tensor([0, 2])] = 1.0
        torch.tensor([1.0, 2.0], device=META)
    assert len(copies.sites) == 2 and len(made.sites) == 1
    with BlockingHostCopies() as copies:
        moved = host_to_device(x, META, torch.float16)
    assert copies.sites == [] and moved.device == META and moved.dtype == torch.float16
    same = host_to_device(x, torch.device("cpu"), torch.float64)
    assert torch.equal(same, x.double())
