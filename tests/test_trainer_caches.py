"""The trainer's caches of what never changes.

Photo latents: each training photo is decoded and VAE-encoded once, its latent is the same whichever
batch first needed it, a full cache still serves every photo, and a resumed run with photos (its cache
empty) trains the same weights as an uninterrupted one (its cache warm). Class prompts (stage 2): a
cached embedding equals the text encoder's, and stage 2 encodes its whole class-prompt set once, when built."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open

from adaface_core.tiny_face_models import tiny_face_photo, write_tiny_face_pack
from tests.test_trainer_loss_expansion import models  # noqa: F401  (module fixture, reused)
from tests.test_trainer_loop import assert_same_weights, make_config, models_root, run_cli, weights, write_config  # noqa: F401
from trainer.data import FaceImages, downsample_mask
from trainer.photo_latents import PhotoLatents
from trainer.prompt_cache import FrozenPromptCache

LATENT = 8  # the tiny VAE maps 64 px photos to 8x8 latents


@pytest.fixture
def photos(tmp_path):
    """Three 64 px photos, the first with a face mask covering its centre."""
    rng = np.random.default_rng(0)
    paths = []
    for i in range(3):
        path = tmp_path / f"p{i}.png"
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 16:48] = 255
    Image.fromarray(mask).save(tmp_path / "p0_mask.png")
    return FaceImages(tmp_path, paths, F.normalize(torch.randn(3, 512, generator=torch.Generator().manual_seed(0)), dim=-1), 64)


class Counting:
    """Counts the photo loads (made from the cache's loader threads) and VAE encodes behind a ``PhotoLatents``."""

    def __init__(self, monkeypatch, images, models):
        self.loads = self.encodes = 0
        lock = threading.Lock()
        load, encode = images.load, models.encode_images

        def counted_load(index):
            with lock:
                self.loads += 1
            return load(index)

        def counted_encode(pixels):
            self.encodes += pixels.shape[0]
            return encode(pixels)

        monkeypatch.setattr(images, "load", counted_load)
        monkeypatch.setattr(models, "encode_images", counted_encode)


def test_a_photo_is_decoded_and_encoded_once(models, photos, monkeypatch):
    expected = [models.encode_images(photos.load(i)[0][None])[0] for i in range(3)]
    expected_masks = [downsample_mask(photos.load(i)[1][None], (LATENT, LATENT))[0] for i in range(3)]
    cache = PhotoLatents(photos)
    count = Counting(monkeypatch, photos, models)

    latents, masks = cache.get(models, [0, 1, 0], LATENT)
    assert latents.shape == (3, 4, LATENT, LATENT) and masks.shape == (3, 1, LATENT, LATENT)
    assert (count.loads, count.encodes) == (2, 2)  # photo 0 twice in one batch: read once
    for row, index in enumerate([0, 1, 0]):
        assert torch.allclose(latents[row], expected[index], atol=1e-6)
        assert torch.equal(masks[row], expected_masks[index])
    assert 0 < float(masks[0].mean()) < 1 and float(masks[1].mean()) == 1.0  # p0's mask file; p1 has none

    kept = latents.clone()
    latents.add_(1.0)
    masks.zero_()  # the caller's tensors are its own: the cache is unchanged
    again, again_masks = cache.get(models, [1, 2, 0], LATENT)
    assert (count.loads, count.encodes) == (3, 3)  # only photo 2 was new
    assert torch.equal(again[0], kept[1]) and torch.equal(again[2], kept[0])
    assert torch.equal(again_masks[2], expected_masks[0])
    assert (cache.hits, cache.misses, len(cache)) == (3, 3, 3)
    assert cache.get(models, [], LATENT)[0].shape == (0, 4, LATENT, LATENT)


def test_a_latent_does_not_depend_on_the_batch_that_first_needed_it(models, photos):
    """What makes a resumed run (cache empty) see the very latents an uninterrupted run cached earlier."""
    warm_together = PhotoLatents(photos)
    together, _ = warm_together.get(models, [0, 1, 2], LATENT)
    one_by_one = PhotoLatents(photos)
    parts = [one_by_one.get(models, [i], LATENT)[0][0] for i in (2, 0, 1)]
    assert torch.equal(together, torch.stack([parts[1], parts[2], parts[0]]))


def test_a_full_cache_still_serves_every_photo(models, photos, monkeypatch):
    unlimited, _ = PhotoLatents(photos).get(models, [0, 1, 2], LATENT)
    one_entry = PhotoLatents(photos, max_bytes=4 * LATENT * LATENT * 4 + LATENT * LATENT)
    count = Counting(monkeypatch, photos, models)
    for _ in range(2):
        latents, _ = one_entry.get(models, [0, 1, 2], LATENT)
        assert torch.equal(latents, unlimited)
    assert len(one_entry) == 1 and count.encodes == 3 + 2  # photos 1 and 2 are encoded at every use
    no_cache = PhotoLatents(photos, max_bytes=0)
    assert torch.equal(no_cache.get(models, [0, 1, 2], LATENT)[0], unlimited) and len(no_cache) == 0


def test_a_wrong_latent_size_is_a_clear_error(models, photos):
    with pytest.raises(ValueError, match="VAE latents are 8 wide, expected 16"):
        PhotoLatents(photos).get(models, [0], 16)


def test_resume_with_photos_equals_an_uninterrupted_run(models_root, tmp_path, tiny_models):
    data = tmp_path / "faces"
    for name, colour in (("ann", (230, 180, 150)), ("bo", (140, 100, 80))):
        (data / name).mkdir(parents=True)
        Image.fromarray(tiny_face_photo(64, colour)).save(data / name / "1.png")
    pack = write_tiny_face_pack(tmp_path / "antelopev2", recognizer_dim=tiny_models.spec.hidden_size)

    def config(name):
        values = make_config(models_root, tmp_path / name)
        values["models"]["face_pack"] = str(pack)
        values["data"].update(root=str(data), random_id_prob=0.5, image_size=32)
        return write_config(tmp_path / f"{name}.yaml", values)

    served = []
    get = PhotoLatents.get

    def recording_get(self, models, indices, latent_size):
        served.append((self.hits, self.misses))
        return get(self, models, indices, latent_size)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(PhotoLatents, "get", recording_get)
        full = weights(run_cli(config("straight")).stages[0].final_checkpoint)
    assert served and served[-1][0] > 0 and served[-1][1] == 2  # photos were drawn; each encoded once, then served
    with safe_open(str(tmp_path / "straight" / "face_ids.safetensors"), framework="pt") as cached:
        assert len(json.loads(cached.metadata()["keys"])) == 2  # both photos are in play (half the rows)
    split = config("split")
    run_cli(split, "--max-steps", "6")
    resumed = run_cli(split, "--resume", str(tmp_path / "split"))
    assert resumed.stages[0].steps == 12
    assert_same_weights(full, weights(resumed.stages[0].final_checkpoint))


def test_class_prompt_embeddings_are_each_prompts_own_and_computed_once(models, monkeypatch):
    prompts = ["a photo of a person", "a photo of a person riding a horse"]
    cache = FrozenPromptCache()
    encoded = []
    encode = models.encode_prompts
    monkeypatch.setattr(models, "encode_prompts", lambda p: encoded.extend(p) or encode(p))

    first = cache.encode(models, prompts + prompts[:1])
    assert torch.equal(first[0], encode(prompts[:1])[0]) and torch.equal(first[1], encode(prompts[1:])[0])
    assert torch.allclose(first[:2], encode(prompts), atol=1e-5)  # what one batched pass gives, to rounding
    assert encoded == prompts and (cache.hits, cache.misses) == (1, 2)
    first.add_(1.0)  # the caller's tensor is its own
    again = cache.encode(models, prompts[1:])
    assert torch.equal(again[0], encode(prompts[1:])[0]) and encoded == prompts
    cache.warm(models, prompts + ["a photo of a woman"])
    assert encoded == prompts + ["a photo of a woman"] and len(cache) == 3


def test_stage2_encodes_every_class_prompt_once_when_built(models_root, tmp_path):
    from trainer.config import config_from_dict
    from trainer.models import build_models
    from trainer.run import make_accelerator
    from trainer.stage_composition import build_stage
    from tests.test_trainer_stage2 import stage2_config

    config = config_from_dict(stage2_config(models_root, tmp_path))
    models = build_models(config, torch.device("cpu"))
    stage = build_stage(config, config.composition, models, make_accelerator(config), tmp_path)
    built = stage.class_prompts.misses
    assert built == len(stage.pool) + 1 == len(stage.class_prompts)  # 'a photo of a person' + one per composition
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        batch = stage.sample_batch(2, generator)
        with torch.no_grad():
            stage.loss(models, batch, generator)
    assert stage.class_prompts.misses == built and stage.class_prompts.hits == 3 * 2 * 2
