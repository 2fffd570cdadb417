"""Trainer configuration and data handling: paper config validation, missing paths, face-ID caching."""

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from adaface_core.errors import ConfigError, ModelFileMissingError, NoFaceError
from adaface_core.image_io import to_rgb_uint8
from trainer.config import config_from_dict, load_config
from trainer.data import compute_face_ids, scan_images
from trainer.face_space import FaceSpace

REPO = Path(__file__).resolve().parent.parent
PAPER = REPO / "trainer" / "configs" / "stage1_paper.yaml"


def test_paper_config_loads_with_the_paper_settings():
    config = load_config(PAPER).validate(check_paths=False)
    face = config.face
    assert face.max_steps == 240000
    assert (face.optim.optimizer, face.optim.d_coef, face.optim.batch_size, face.optim.grad_accum) == ("prodigy", 2.0, 4, 2)
    assert config.data.random_id_prob == 0.4
    assert face.optim.max_grad_norm == 0.5  # the reference's v1-finetune-ada.yaml grad_clip
    assert face.loss.cfg_prob == 0.6 and face.loss.cfg_scale == (1.5, 2.5) and face.loss.first_t == (0.7, 0.9)
    final = np.prod(np.array(face.expansion.factors), axis=0).tolist()
    assert len(face.expansion.factors) == 2 and final == [8, 8, 8] + [4] * 9


def test_stage2_takes_its_own_paper_defaults_and_the_paper_config_pins_them():
    """A composition section that leaves values out gets stage 2's (paper §3.1), not stage 1's."""
    bare = config_from_dict({"stage": "both", "composition": {"optim": {"lr": 0.5}}})
    stage2 = bare.composition
    assert (stage2.max_steps, stage2.optim.d_coef, stage2.optim.batch_size, stage2.optim.grad_accum) == (120000, 0.5, 3, 2)
    assert stage2.optim.lr == 0.5 and stage2.optim.optimizer == "prodigy" and not stage2.expansion.enabled
    assert (bare.face.max_steps, bare.face.optim.d_coef, bare.face.optim.batch_size) == (240000, 2.0, 4)
    paper = load_config(REPO / "trainer" / "configs" / "paper_both.yaml").validate(check_paths=False)
    o = paper.composition.optim
    assert (paper.composition.max_steps, o.optimizer, o.d_coef, o.batch_size, o.grad_accum) == (120000, "prodigy", 0.5, 3, 2)
    assert o.max_grad_norm == paper.face.optim.max_grad_norm == stage2.optim.max_grad_norm == 0.5  # reference grad_clip
    assert paper.run.gradient_checkpointing and paper.run.mixed_precision == "bf16"


def test_paper_config_without_models_names_each_missing_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the relative model paths resolve against an empty folder
    config = load_config(PAPER)
    with pytest.raises(ModelFileMissingError) as info:
        config.validate()
    message = str(info.value)
    for needle in ("stable-diffusion-v1-5/unet", "stable-diffusion-v1-5/text_encoder", "stable-diffusion-v1-5/tokenizer",
                   "stable-diffusion-v1-5/vae", "stable-diffusion-v1-5/scheduler", "arc2face/encoder",
                   "arc2face/arc2face", "data/faces_train", "antelopev2"):
        assert needle in message, needle
    assert message.startswith("9 path(s)")


def test_all_shipped_configs_validate_without_paths():
    for path in sorted((REPO / "trainer" / "configs").glob("*.yaml")):
        load_config(path).validate(check_paths=False)


def test_config_errors_are_named():
    with pytest.raises(ConfigError, match="unknown key.*face.optim: lrr"):
        config_from_dict({"face": {"optim": {"lrr": 1}}})
    with pytest.raises(ConfigError, match="face.loss.first_t must be a list of 2"):
        config_from_dict({"face": {"loss": {"first_t": 0.7}}})
    with pytest.raises(ConfigError, match="fp16"):
        config_from_dict({"run": {"mixed_precision": "fp16"}}).validate(check_paths=False)
    with pytest.raises(ConfigError, match="optimizer"):
        config_from_dict({"face": {"optim": {"optimizer": "sgd"}}}).validate(check_paths=False)
    with pytest.raises(ConfigError, match="data.photo_cache_gb must be >= 0"):
        config_from_dict({"data": {"photo_cache_gb": -1}}).validate(check_paths=False)
    with pytest.raises(ConfigError, match="run.device must be 'auto' .* or 'cpu', got 'cuda:1'"):
        config_from_dict({"run": {"device": "cuda:1"}}).validate(check_paths=False)
    # Values that used to surface as a traceback from deep inside the first step.
    with pytest.raises(ConfigError, match="face.optim.lr must be > 0, got -1"):
        config_from_dict({"face": {"optim": {"lr": -1}}}).validate(check_paths=False)
    with pytest.raises(ConfigError, match="data.image_size must be a positive multiple of 8 .*got 0"):
        config_from_dict({"data": {"image_size": 0}}).validate(check_paths=False)
    with pytest.raises(ConfigError, match="run.distributed_timeout_minutes must be >= 1, got 0"):
        config_from_dict({"run": {"distributed_timeout_minutes": 0}}).validate(check_paths=False)
    # Values the optimizer or the schedules would refuse, or take silently, only once the models are loaded.
    for section, message in [
        ({"face": {"optim": {"betas": [0.9, 1.5]}}}, r"face.optim: betas must be in \[0, 1\), d_coef > 0"),
        ({"face": {"optim": {"d_coef": -2}}}, r"face.optim: betas .* got \[0.9, 0.999\], -2.0 and 0.0"),
        ({"face": {"optim": {"weight_decay": -1}}}, "weight_decay >= 0"),
        ({"face": {"loss": {"cfg_scale": [3, 1]}}}, r"face.loss.cfg_scale must be a range \[low, high\]"),
        ({"face": {"expansion": {"forced_steps": [5, 2]}}}, r"forced_steps must be steps in increasing order .*\[5, 2\]"),
        ({"face": {"expansion": {"ema_beta": 1.5}}}, r"face.expansion: ema_beta must be in \[0, 1\)"),
        ({"data": {"id_noise_std": -1}}, "data.id_noise_std must be >= 0"),
        ({"run": {"output": None}}, "run.output must name the folder to train into"),
    ]:
        with pytest.raises(ConfigError, match=message):
            config_from_dict(section).validate(check_paths=False)
    config_from_dict({"face": {"expansion": {"forced_steps": [0, 7]}}}).validate(check_paths=False)  # 0 = by plateau


def test_a_config_file_in_another_encoding_or_a_file_as_data_root_is_named(tmp_path):
    """Windows Notepad's "Unicode" is UTF-16; a photo given as data.root would only fail after the models load."""
    config = tmp_path / "u16.yaml"
    config.write_bytes("face:\n  max_steps: 3\n".encode("utf-16"))
    with pytest.raises(ConfigError, match=r"u16.yaml is not UTF-8 text .*: save it as UTF-8"):
        load_config(config)
    (tmp_path / "photo.jpg").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"data.root .*photo.jpg is a file: give the folder of training photos"):
        config_from_dict({"data": {"root": str(tmp_path / "photo.jpg")}}).check_paths()


def test_settings_no_stage_reads_are_refused_not_dropped():
    """A knob that would change nothing must not look as if it had: stage 1 has no extra settings, and
    stage 2 takes its face-loss chain from face.loss."""
    with pytest.raises(ConfigError, match="face.extra: stage 1 reads no extra settings, got class_word"):
        config_from_dict({"face": {"extra": {"class_word": "dog"}}}).validate(check_paths=False)
    with pytest.raises(ConfigError, match="composition.loss: stage 2 reads only 'placeholder'.*got chain_steps, use_masks"):
        config_from_dict({"stage": "both", "composition": {"loss": {"chain_steps": 2, "use_masks": False}}}
                         ).validate(check_paths=False)
    both = config_from_dict({"stage": "both", "face": {"loss": {"chain_steps": 2}},
                             "composition": {"loss": {"placeholder": "sks", "cfg_prob": 0.6}}}).validate(check_paths=False)
    assert both.composition.loss.placeholder == "sks" and both.face.loss.chain_steps == 2


def test_single_file_sd_checkpoint_without_a_tokenizer_says_which_to_add(tmp_path):
    ckpt = tmp_path / "v1-5.safetensors"
    ckpt.write_bytes(b"x")
    with pytest.raises(ModelFileMissingError, match="models.tokenizer"):
        config_from_dict({"models": {"sd15": str(ckpt)}}).validate()


class FakeAnalyzer:
    calls = 0

    def analyze(self, image, name=None):
        FakeAnalyzer.calls += 1
        if "noface" in str(image):
            raise NoFaceError(f"no face found in {name}")
        rng = np.random.default_rng(len(str(image)))
        v = rng.standard_normal(512).astype(np.float32)

        class Face:
            normed_embedding = v / np.linalg.norm(v)

        return Face()


def _write(path: Path, mask: bool = False):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((40, 48, 3), 128, np.uint8)).save(path)
    if mask:
        m = np.zeros((40, 48), np.uint8)
        m[10:30, 12:36] = 255
        Image.fromarray(m).save(path.with_name(path.stem + "_mask.png"))


def test_faceless_images_are_listed_and_skipped_and_ids_are_cached(tmp_path, caplog):
    root = tmp_path / "faces"
    _write(root / "a" / "one.jpg", mask=True)
    _write(root / "b" / "two.png")
    _write(root / "noface.webp")
    (root / "b" / "IMG_0001.HEIC").write_bytes(b"an iPhone photo")  # Pillow cannot read it: named, not lost
    images = scan_images(root)
    assert [p.name for p in images] == ["one.jpg", "two.png", "noface.webp"]  # masks are not images
    assert f"not read from {root}: {Path('b', 'IMG_0001.HEIC')} (HEIC and AVIF" in caplog.text
    cache, skipped = tmp_path / "ids.safetensors", tmp_path / "out" / "no_face.txt"
    FakeAnalyzer.calls = 0
    kept, vectors = compute_face_ids(root, images, cache, FakeAnalyzer, skipped)
    assert [p.name for p in kept] == ["one.jpg", "two.png"] and vectors.shape == (2, 512)
    assert "noface.webp" in skipped.read_text()
    assert FakeAnalyzer.calls == 3

    def no_analyzer():
        raise AssertionError("everything is cached: the face models must not be loaded")

    kept2, vectors2 = compute_face_ids(root, images, cache, no_analyzer, skipped)
    assert kept2 == kept and torch.equal(vectors, vectors2)

    from trainer.data import FaceImages

    data = FaceImages(root, kept, vectors, 32)
    pixels, mask = data.load(0)
    assert pixels.shape == (3, 32, 32) and -1 <= float(pixels.min()) and float(pixels.max()) <= 1
    assert 0 < float(mask.mean()) < 1
    assert float(data.load(1)[1].mean()) == 1.0  # no mask file: the whole image counts

    space = FaceSpace(data, 64, random_id_prob=0.5, id_noise_std=0.01)
    batch = space.sample(8, torch.Generator().manual_seed(0))
    assert batch.id_vectors.shape == (8, 64)
    assert torch.allclose(batch.id_vectors.norm(dim=-1), torch.ones(8), atol=1e-5)
    assert 0 < int(batch.has_image.sum()) < 8


def test_the_id_cache_holds_to_its_face_models_and_remembers_unreadable_photos(tmp_path):
    """Another pack's vectors (of another size, or another space) must not train; an unreadable photo must
    not make every restart and every process load the face models again."""
    root = tmp_path / "faces"
    _write(root / "one.jpg")
    (root / "broken.png").write_bytes(b"not a png")
    cache, skipped = tmp_path / "ids.safetensors", tmp_path / "no_face.txt"

    class ReadingAnalyzer(FakeAnalyzer):
        def analyze(self, image, name=None):
            to_rgb_uint8(image, name)  # an unreadable file fails here, as in face analysis
            return super().analyze(image, name)

    FakeAnalyzer.calls = 0
    kept, _ = compute_face_ids(root, scan_images(root), cache, ReadingAnalyzer, skipped, face_models="a.onnx:1")
    assert [p.name for p in kept] == ["one.jpg"] and "broken.png" in skipped.read_text() and FakeAnalyzer.calls == 1

    def no_analyzer():
        raise AssertionError("everything is cached: the face models must not be loaded")

    assert compute_face_ids(root, scan_images(root), cache, no_analyzer, skipped, face_models="a.onnx:1")[0] == kept
    compute_face_ids(root, scan_images(root), cache, ReadingAnalyzer, skipped, face_models="b.onnx:2")
    assert FakeAnalyzer.calls == 2  # the other pack analysed one.jpg again


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="reads Linux's /proc/self/maps")
def test_the_id_cache_is_not_mapped_while_it_is_replaced(tmp_path, monkeypatch):
    """safetensors memory-maps the file it reads, and Windows refuses to replace a mapped file: a photo added
    since the last run made the cache's rewrite fail there. Nothing read from it may still map it then."""
    root, cache, skipped = tmp_path / "faces", tmp_path / "ids.safetensors", tmp_path / "no_face.txt"
    _write(root / "one.jpg")
    compute_face_ids(root, scan_images(root), cache, FakeAnalyzer, skipped, face_models="a.onnx:1")
    _write(root / "two.jpg")
    mapped_when_replaced = []
    replace = os.replace

    def checking_replace(source, destination):
        if Path(destination) == cache:
            mapped_when_replaced.append(str(cache) in Path("/proc/self/maps").read_text())
        return replace(source, destination)

    monkeypatch.setattr(os, "replace", checking_replace)
    kept, vectors = compute_face_ids(root, scan_images(root), cache, FakeAnalyzer, skipped, face_models="a.onnx:1")
    assert [p.name for p in kept] == ["one.jpg", "two.jpg"]
    assert mapped_when_replaced and not any(mapped_when_replaced)


def test_empty_or_faceless_folders_are_clear_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no training images"):
        scan_images(tmp_path / "empty")
    _write(tmp_path / "nf" / "noface.png")
    with pytest.raises(ConfigError, match="none of the 1 images"):
        compute_face_ids(tmp_path / "nf", scan_images(tmp_path / "nf"), tmp_path / "c.safetensors", FakeAnalyzer,
                         tmp_path / "skip.txt")


def test_the_smoke_preset_never_takes_over_a_folder_it_did_not_make(tmp_path):
    """Pointed at a ComfyUI folder by mistake, it used to delete <output>/models before anything else."""
    from trainer.presets import smoke_config

    comfy = tmp_path / "ComfyUI"
    (comfy / "models" / "checkpoints").mkdir(parents=True)
    (comfy / "models" / "checkpoints" / "v1-5.safetensors").write_bytes(b"a user's model")
    with pytest.raises(ConfigError, match="holds files the smoke preset did not make"):
        smoke_config(comfy)
    assert (comfy / "models" / "checkpoints" / "v1-5.safetensors").read_bytes() == b"a user's model"
    assert sorted(p.name for p in comfy.iterdir()) == ["models"]


def test_a_config_file_is_laid_over_the_smoke_preset(tmp_path):
    from trainer.presets import smoke_config

    changes = tmp_path / "changes.yaml"
    changes.write_text("face:\n  max_steps: 3\n  optim:\n    lr: 0.5\ncomposition:\n  extra:\n    heldout_size: 3\n",
                       encoding="utf-8")
    first = smoke_config(tmp_path / "smoke")
    config = smoke_config(tmp_path / "smoke", changes)  # the preset's own folder: used again
    assert (config.face.max_steps, config.face.optim.lr) == (3, 0.5)
    # Everything the file leaves alone is the preset's.
    assert config.face.optim.batch_size == first.face.optim.batch_size and config.face.optim.d_coef == 2.0
    assert config.composition.extra["heldout_size"] == 3 and config.composition.extra["heldout_batches"] == 2
    assert config.stage == "both" and config.data.root == first.data.root and config.data.image_size == 64
    config.validate(check_paths=True)
    # Its folder is the one the preset claimed: a run.output in the file would train into another run's folder.
    changes.write_text("run:\n  output: elsewhere\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="run.output elsewhere is not the smoke preset's folder"):
        smoke_config(tmp_path / "smoke", changes)


def test_an_interrupted_face_analysis_keeps_what_it_had_done(tmp_path, monkeypatch):
    """Analysing a large dataset takes hours: Ctrl-C, a kill signal or a crash must not throw it all away,
    and a long run saves as it goes."""
    import trainer.data

    root = tmp_path / "faces"
    for name in ("a.png", "b.png", "noface.png", "c.png", "d.png"):
        _write(root / name)
    images, cache = scan_images(root), tmp_path / "ids.safetensors"
    seen = []

    class StoppedAt(FakeAnalyzer):
        def analyze(self, image, name=None):
            if Path(image).name == "c.png":
                raise KeyboardInterrupt
            seen.append(Path(image).name)
            return super().analyze(image, name)

    with pytest.raises(KeyboardInterrupt):
        compute_face_ids(root, images, cache, StoppedAt)
    assert seen == ["a.png", "b.png"]
    FakeAnalyzer.calls = 0
    kept, _ = compute_face_ids(root, images, cache, FakeAnalyzer)
    assert FakeAnalyzer.calls == 3 and [p.name for p in kept] == ["a.png", "b.png", "c.png", "d.png"]

    # Saved as it goes: a kill no handler sees (SIGKILL, power loss) loses only the last interval.
    monkeypatch.setattr(trainer.data, "ID_CACHE_SAVE_SECONDS", 0.0)
    writes = []
    monkeypatch.setattr(trainer.data, "atomic_save_safetensors", lambda tensors, path, meta: writes.append(meta))
    for name in ("e.png", "f.png"):
        _write(root / name)
    compute_face_ids(root, scan_images(root), cache, FakeAnalyzer)
    assert len(writes) == 2 and "e.png" in writes[0]["keys"] and "f.png" not in writes[0]["keys"]


@pytest.mark.skipif(os.name == "nt", reason="folder symlinks need extra rights on Windows")
def test_photos_in_linked_folders_are_found_once_and_a_link_up_the_tree_is_no_loop(tmp_path):
    root, elsewhere = tmp_path / "faces", tmp_path / "elsewhere" / "alice"
    _write(root / "own.png")
    _write(elsewhere / "linked.png")
    (root / "alice").symlink_to(elsewhere, target_is_directory=True)
    (root / "alice_again").symlink_to(elsewhere, target_is_directory=True)
    (elsewhere / "up").symlink_to(tmp_path, target_is_directory=True)
    names = [p.relative_to(root).as_posix() for p in scan_images(root)]
    assert "own.png" in names and sum(name.endswith("linked.png") for name in names) == 1
