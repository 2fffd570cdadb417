"""Stage-1 loss on photos (VAE latents, masks, frozen teacher) and the plateau / expansion schedule."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from trainer.config import ExpansionConfig, FaceLossConfig, config_from_dict
from trainer.data import FaceImages
from trainer.expansion import ExpansionSchedule, PlateauDetector
from trainer.face_space import FaceSpace
from trainer.losses_face import FaceDistillationLoss
from trainer.models import build_models


@pytest.fixture(scope="module")
def models(tiny_models):
    config = config_from_dict({"models": {"sd15": str(tiny_models.sd15), "arc2face": str(tiny_models.arc2face)}})
    return build_models(config, torch.device("cpu"))


def _photo_batch(tmp_path, models, mask_value=None):
    """Two draws of one 64 px photo; its mask file's centre is ``mask_value`` (None: no mask file)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    photo = tmp_path / "face.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(photo)
    if mask_value is not None:
        mask = np.zeros((64, 64), np.uint8)
        mask[16:48, 16:48] = mask_value
        Image.fromarray(mask).save(tmp_path / "face_mask.png")
    ids = F.normalize(torch.randn(1, 512, generator=torch.Generator().manual_seed(0)), dim=-1)
    images = FaceImages(tmp_path, [photo], ids, 64)
    space = FaceSpace(images, models.id_dim, random_id_prob=0.0, id_noise_std=0.01)
    return space.sample(2, torch.Generator().manual_seed(0))


def test_loss_on_photos_trains_only_the_inverter(models, tmp_path):
    batch = _photo_batch(tmp_path, models, 255)
    assert bool(batch.has_image.all()) and batch.image_index.tolist() == [0, 0]
    loss_fn = FaceDistillationLoss(FaceLossConfig(chain_steps=3, cfg_prob=1.0), latent_size=8)
    models.inverter.zero_grad(set_to_none=True)
    loss, metrics = loss_fn(models, batch, torch.Generator().manual_seed(1))
    loss.backward()
    assert torch.isfinite(loss) and set(metrics) >= {"loss_t0", "loss_t1", "loss_t2"}
    assert all(p.grad is not None for p in models.inverter.parameters() if p.requires_grad)
    assert models.inverter.clip.embeddings.token_embedding.weight.grad is None  # frozen embeddings
    for frozen in (models.unet, models.teacher_unet, models.text_encoder, models.id_encoder, models.vae):
        assert all(p.grad is None and not p.requires_grad for p in frozen.parameters())
    models.inverter.zero_grad(set_to_none=True)


def test_mask_limits_the_loss_to_the_face(models, tmp_path):
    loss_fn = FaceDistillationLoss(FaceLossConfig(chain_steps=1, cfg_prob=0.0), latent_size=8)
    masked = _photo_batch(tmp_path / "masked", models, 255)
    full = _photo_batch(tmp_path / "full", models)  # no mask file: the whole photo counts
    assert torch.equal(full.id_vectors, masked.id_vectors)
    with torch.no_grad():
        a = loss_fn(models, masked, torch.Generator().manual_seed(2))[0]
        b = loss_fn(models, full, torch.Generator().manual_seed(2))[0]
        unmasked_cfg = FaceDistillationLoss(FaceLossConfig(chain_steps=1, cfg_prob=0.0, use_masks=False), 8)
        c = unmasked_cfg(models, masked, torch.Generator().manual_seed(2))[0]
    assert not torch.isclose(a, b) and torch.isclose(b, c)


def test_random_ids_need_no_photo(models):
    space = FaceSpace(None, models.id_dim, random_id_prob=0.4, id_noise_std=0.0)
    batch = space.sample(3, torch.Generator().manual_seed(0))
    assert not bool(batch.has_image.any()) and batch.photos is None
    loss, _ = FaceDistillationLoss(FaceLossConfig(chain_steps=2), 8)(models, batch, torch.Generator().manual_seed(0))
    assert torch.isfinite(loss)


def test_plateau_detector_and_state_round_trip():
    detector = PlateauDetector(ema_beta=0.5, patience=3, min_rel_improvement=0.01, warmup_steps=2)
    assert not any(detector.update(1.0 / (i + 1)) for i in range(20))  # steadily improving
    copy = PlateauDetector(0.5, 3, 0.01, 2)
    copy.load_state_dict(detector.state_dict())
    flags = [detector.update(0.05) for _ in range(10)]
    assert flags == [copy.update(0.05) for _ in range(10)]
    assert any(flags)


def test_expansion_schedule_forced_and_on_plateau(models):
    config = ExpansionConfig(factors=[[2, 1, 1], [1, 2, 1]], forced_steps=[5, 0], ema_beta=0.0, patience=2,
                             warmup_steps=0, min_steps_between=6, perturb_std=0.0)
    schedule = ExpansionSchedule(config)
    schedule.check(models.inverter)
    events = []
    for step in range(1, 16):
        factors = schedule.step(step, 1.0)  # flat loss: a plateau after `patience` steps
        if factors is not None:
            events.append((step, factors))
            schedule.done += 1  # bookkeeping only; the trainer's apply() also expands the inverter
            schedule.last_step = step
            schedule.plateau.reset()
    assert events[0] == (5, [2, 1, 1])  # forced
    assert events[1:] == [(11, [1, 2, 1])]  # plateau, but not sooner than min_steps_between after


def test_expansion_factors_must_match_the_layers(models):
    from adaface_core.errors import ConfigError

    with pytest.raises(ConfigError, match="3 layers"):
        ExpansionSchedule(ExpansionConfig(factors=[[2] * 12])).check(models.inverter)

