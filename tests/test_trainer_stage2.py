"""Stage 2 (composition distillation) on tiny models: it learns what it is for on held-out draws, it does
not undo stage 1 beyond the stated bound, it continues from stage 1, and photos without a mask get one."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from adaface_core.checkpoint import load_inverter
from adaface_core.errors import ConfigError
from adaface_core.tiny_face_models import tiny_face_photo, write_tiny_face_pack
from adaface_core.tokenizer import load_clip_tokenizer
from test_trainer_loop import make_config, models_root, run_cli, write_config  # noqa: F401 (fixture)
from trainer.compositions import CompositionPool, build_prompts, load_composition_pool, sample_prompts
from trainer.config import StageConfig, TrainConfig
from trainer.data import FaceImages
from trainer.face_space import FaceSpace
from trainer.face_masks import attach_detector_masks, ellipse_mask
from trainer.loop import SimulatedCrash
from trainer.models import Models
from trainer.stage_composition import (CompositionStage, check_prompts, composition_settings, heldout_settings,
                                      split_pool)


def stage2_config(models_root, output, stage="composition", steps=12, face_steps=3):
    values = make_config(models_root, output, max_steps=face_steps)
    values["stage"] = stage
    values["composition"] = {
        "max_steps": steps,
        # The paper's stage-2 optimizer (Prodigy, d_coef 0.5), smaller batches.
        "optim": {"optimizer": "prodigy", "lr": 1.0, "d_coef": 0.5, "batch_size": 2, "grad_accum": 2},
        "expansion": {"enabled": False},
        "extra": {"heldout_size": 2, "heldout_batches": 2},
    }
    return values


def test_stage2_lowers_heldout_delta_loss_and_keeps_face_loss_within_bound(models_root, tmp_path):
    out, steps = tmp_path / "run", 30  # Prodigy's bias correction keeps its first steps small
    result = run_cli(write_config(tmp_path / "c.yaml", stage2_config(models_root, out, steps=steps)))
    held = result.stages[-1].heldout
    assert held["heldout_delta_after"] < 0.9 * held["heldout_delta_before"]
    assert held["heldout_face_after"] <= held["face_loss_bound"] * held["heldout_face_before"]
    assert held["face_within_bound"] is True
    # Both numbers are logged for the user: JSON summary and a CSV row at the start and the end.
    assert json.loads((out / "composition" / "heldout.json").read_text()) == pytest.approx(held)
    rows = (out / "composition" / "heldout.csv").read_text().splitlines()
    assert rows[0] == "step,heldout_delta,heldout_face" and rows[1].startswith("0,") and rows[2].startswith(f"{steps},")


def test_stage_both_continues_from_stage1_result(models_root, tmp_path):
    out = tmp_path / "both"
    # Stage 1 expands the inverter at step 2 (of 3); stage 2 never expands, so an expanded stage-2
    # inverter can only have come from stage 1's result.
    values = stage2_config(models_root, out, stage="both", steps=2, face_steps=3)
    values["face"]["expansion"] = {"factors": [[2, 1, 1]], "forced_steps": [2]}
    result = run_cli(write_config(tmp_path / "c.yaml", values))
    assert [s.stage for s in result.stages] == ["face", "composition"]
    face, comp = load_inverter(out / "face" / "adaface_inverter.safetensors"), load_inverter(out / "composition" / "adaface_inverter.safetensors")
    assert face.config.attention_multipliers == comp.config.attention_multipliers == [2, 1, 1]
    changed = [not torch.equal(a, b) for a, b in zip(face.state_dict().values(), comp.state_dict().values())]
    assert any(changed)  # and stage 2 trained it further
    # Resumed with stage 1 running longer, stage 2 would go on from a checkpoint trained on the old stage 1.
    kept = [(p.name, p.stat().st_mtime_ns) for p in sorted((out / "composition").rglob("*"))]
    with pytest.raises(ConfigError, match="trained from stage 1 at face step 3, but stage 1 now ends at step 5"):
        run_cli(write_config(tmp_path / "c.yaml", values), "--resume", str(out), "--max-steps", "5")
    assert [(p.name, p.stat().st_mtime_ns) for p in sorted((out / "composition").rglob("*"))] == kept


def test_a_capture_layer_the_unet_lacks_stops_the_run_before_stage_1(models_root, tmp_path):
    """Found at stage 2's first step, the typo cost all of stage 1; a mistyped entry beside a good one was dropped."""
    values = stage2_config(models_root, tmp_path / "run", stage="both")
    values["composition"]["extra"]["capture_layers"] = ["up_blocks.1", "up_blocks.9"]
    with pytest.raises(ConfigError, match=r"capture_layers: no cross-attention layer matches \['up_blocks.9'\]"):
        run_cli(write_config(tmp_path / "c.yaml", values))
    assert not (tmp_path / "run" / "face" / "checkpoints").exists()


def test_resumed_stage2_compares_with_the_stage_start(models_root, tmp_path):
    """In place or into another --output, a resumed stage 2 reports against the stage's true start and
    keeps the loss rows of the steps before its checkpoint."""
    out = tmp_path / "run"
    config = write_config(tmp_path / "c.yaml", stage2_config(models_root, out, steps=6))
    with pytest.raises(SimulatedCrash):
        run_cli(config, "--crash-at-step", "4")
    start = (out / "composition" / "heldout.csv").read_text().splitlines()[1]
    before_checkpoint = (out / "composition" / "losses.csv").read_text().splitlines()[:4]  # header, steps 1-3

    elsewhere = tmp_path / "elsewhere"
    run_cli(config, "--resume", str(out), "--output", str(elsewhere))
    rows = (elsewhere / "composition" / "heldout.csv").read_text().splitlines()
    assert rows[1] == start and rows[2].startswith("6,") and len(rows) == 3
    losses = (elsewhere / "composition" / "losses.csv").read_text().splitlines()
    assert losses[:4] == before_checkpoint and [row.split(",")[0] for row in losses[1:]] == ["1", "2", "3", "4", "5", "6"]

    held = run_cli(config, "--resume", str(out)).stages[-1].heldout
    rows = (out / "composition" / "heldout.csv").read_text().splitlines()
    assert rows[1] == start and rows[2].startswith("6,") and len(rows) == 3
    assert f"{held['heldout_delta_before']:.6g}" == start.split(",")[1]

    # A branch from an older checkpoint drops the abandoned branch's end row, as losses.csv drops its steps.
    older = sorted((out / "composition" / "checkpoints").glob("step_*"))[0]
    run_cli(config, "--resume", str(older), "--overwrite", "--max-steps", "5")
    rows = (out / "composition" / "heldout.csv").read_text().splitlines()
    assert rows[1] == start and [row.split(",")[0] for row in rows[2:]] == ["5"]


def test_heldout_compositions_never_trained_and_settings_checked():
    pool, held = split_pool(load_composition_pool(), 8)
    assert len(held) == 8 and not set(held.entries) & set(pool.entries)
    settings = composition_settings(StageConfig(extra={"capture_layers": ["all"], "weights": {"face_preserve": 0.5}}))
    assert settings.layers == "all" and settings.weights.face_preserve == 0.5
    with pytest.raises(ConfigError, match="unknown key"):
        composition_settings(StageConfig(extra={"class_wrd": "woman"}))
    with pytest.raises(ConfigError, match="template"):
        composition_settings(StageConfig(extra={"template": "a photo of a person"}))
    for empty in ({"heldout_batches": 0}, {"heldout_size": 0}):  # a ZeroDivisionError after all of stage 1, before
        with pytest.raises(ConfigError, match="heldout_size and heldout_batches must be >= 1"):
            composition_settings(StageConfig(extra=empty))
    # The held-out figures follow the held-out compositions themselves: a pool file edited between a crash
    # and its resume picks others, and the start must be measured again on them.
    base = TrainConfig()
    assert heldout_settings(settings, base, "z", held) != heldout_settings(settings, base, "z", split_pool(
        load_composition_pool(), 9)[1])
    # Values that would train the wrong thing without a word, or fail only after stage 1.
    for extra, message in [
        ({"weights": {"delta_prompt": -1.0}}, r"weights must be >= 0 \(a negative one climbs its loss\)"),
        ({"weights": {"delta_attn_out": 0.0, "delta_attn_map": 0.0, "delta_prompt": 0.0}}, "with a delta term above 0"),
        ({"capture_layers": []}, "capture_layers must name a layer"),
        ({"class_word": "  "}, "class_word a word"),
        ({"heldout_compositions": 0}, "heldout_compositions be >= 1"),
        ({"face_loss_bound": float("nan")}, "face_loss_bound a number"),
        ({"template": "a photo of{subject}"}, "as a word of its own"),
    ]:
        with pytest.raises(ConfigError, match=message):
            composition_settings(StageConfig(extra=extra))
    # Only {subject} is a slot: other braces in a template are kept as the user wrote them.
    quad = build_prompts("in the rain", "woman", "z", "a {vintage} photo of {subject}")
    assert quad.subject_comp == "a {vintage} photo of z in the rain"
    assert quad.class_single == "a {vintage} photo of a woman"


def test_prompts_stage_2_would_fail_on_at_some_later_step_are_refused_before_stage_1(models_root, tmp_path,
                                                                                      tiny_models):
    """A composition is drawn at random: one too long for the subject tokens, or one holding the placeholder
    as a word, used to stop the run at whichever step first drew it, with a message naming neither."""
    tokenizer = load_clip_tokenizer(tiny_models.tokenizer)
    settings = composition_settings(StageConfig())
    pool = CompositionPool({"mine": ["in the rain", "wearing " + "a red hat and a blue scarf " * 8, "next to a z sign"]})
    with pytest.raises(ConfigError, match=r"placeholder 'z' is also a word of 1 composition\(s\) \(next to a z sign\)"):
        check_prompts(pool, settings, "z", tokenizer, 16)
    with pytest.raises(ConfigError, match=r"1 composition\(s\) leave no room for the 16 subject tokens in 77 positions"):
        check_prompts(pool, settings, "sks", tokenizer, 16)
    with pytest.raises(ConfigError, match=r"template 'a photo of \{subject\}' holds the placeholder 'a' already"):
        check_prompts(pool, settings, "a", tokenizer, 16)
    with pytest.raises(ConfigError, match="'zqxjvk' is [2-9] tokens"):
        check_prompts(pool, settings, "zqxjvk", tokenizer, 16)
    with pytest.raises(ConfigError, match="heldout_compositions 8 leaves none of the 1 compositions"):
        check_prompts(CompositionPool({"mine": ["in the rain"]}), settings, "z", tokenizer, 16)
    # Through the command line, a --stage both run stops before stage 1 trains; so does a missing pool file.
    extra = tmp_path / "mine.txt"
    extra.write_text("[mine]\nnext to a z sign\n", encoding="utf-8")
    for files, message in (([str(extra)], "placeholder 'z' is also a word"),
                           ([str(tmp_path / "gone.txt")], r"composition file not found: .*gone.txt")):
        values = stage2_config(models_root, tmp_path / "run", stage="both")
        values["composition"]["extra"]["composition_files"] = files
        with pytest.raises(ConfigError if "placeholder" in message else FileNotFoundError, match=message):
            run_cli(write_config(tmp_path / "c.yaml", values))
        assert not (tmp_path / "run" / "face" / "checkpoints").exists()


def test_photo_without_mask_gets_detector_ellipse(tmp_path):
    pack = write_tiny_face_pack(tmp_path / "pack", layout="buffalo_s", with_extras=False)
    root = tmp_path / "faces"
    root.mkdir()
    Image.fromarray(tiny_face_photo(320)).save(root / "plain.png")
    Image.fromarray(tiny_face_photo(320)).save(root / "masked.png")
    own = np.zeros((320, 320), np.uint8)
    own[:40, :40] = 255
    Image.fromarray(own).save(root / "masked_mask.png")
    images = FaceImages(root, [root / "plain.png", root / "masked.png"], torch.zeros(2, 512), image_size=64)

    def analyzer():
        from adaface_core.face_analysis import FaceAnalyzer

        return FaceAnalyzer.from_folder(pack, provider="cpu")

    assert attach_detector_masks(images, analyzer, tmp_path / "boxes.json") == 1
    _, mask = images.load(0)
    (box,) = [v["bbox"] for v in json.loads((tmp_path / "boxes.json").read_text())["boxes"].values()]
    cx, cy = [int((box[i] + box[i + 2]) / 2 * 64 / 320) for i in (0, 1)]  # the photo is 320 px, the mask 64
    assert mask[0, cy, cx] == 1 and mask[0, 63, 63] == 0 and 0.02 < float(mask.mean()) < 0.9
    _, own_mask = images.load(1)  # a mask file always wins
    assert own_mask[0, 0, 0] == 1 and own_mask[0, 40, 40] == 0

    def no_detector():
        raise AssertionError("the cached detection must be reused")

    again = FaceImages(root, list(images.paths), images.id_vectors, image_size=64)
    assert attach_detector_masks(again, no_detector, tmp_path / "boxes.json") == 1
    assert torch.equal(again.load(0)[1], mask)

    # Boxes from other face models are detected afresh; so is a file a kill cut short (no failed start).
    calls = []

    def counted():
        calls.append(1)
        return analyzer()

    assert attach_detector_masks(again, counted, tmp_path / "boxes.json", face_models="other.onnx:1") == 1
    (tmp_path / "boxes.json").write_text('{"face_models": "other.onnx:1", "boxes": {"plain.png|', encoding="utf-8")
    assert attach_detector_masks(again, counted, tmp_path / "boxes.json", face_models="other.onnx:1") == 1
    assert len(calls) == 2 and torch.equal(again.load(0)[1], mask)


def test_ellipse_grows_to_hold_every_keypoint():
    kps = np.array([[5.0, 50.0], [95.0, 50.0], [50.0, 50.0], [40.0, 70.0], [60.0, 70.0]])
    inside = ellipse_mask([30, 30, 70, 70], kps, 100, 100)
    assert all(inside[int(y), int(x)] for x, y in kps)
    assert not inside[0, 0] and inside[50, 50]


def test_class_word_comes_from_the_subjects_class_txt(tmp_path):
    root = tmp_path / "faces"
    (root / "anna" / "2019").mkdir(parents=True)
    (root / "bob").mkdir()
    (root / "anna" / "class.txt").write_text("\n# the class word of this folder\nwoman\n", encoding="utf-8")
    paths = [root / "anna" / "2019" / "a.png", root / "bob" / "b.png"]
    for path in paths:
        Image.fromarray(tiny_face_photo(64)).save(path)
    images = FaceImages(root, paths, torch.nn.functional.normalize(torch.randn(2, 8), dim=-1), image_size=32)

    assert images.class_word(0) == "woman"  # found in a parent folder
    assert images.class_word(1) is None  # no metadata: the configured default applies
    faces = FaceSpace(images, 8, random_id_prob=0.0, id_noise_std=0.0).sample(6, torch.Generator().manual_seed(0))
    assert set(faces.class_words) == {"woman", None}
    quads = sample_prompts(load_composition_pool(), faces.class_words, rng=torch.Generator().manual_seed(0),
                           default_class_word="person")
    for word, quad in zip(faces.class_words, quads):
        assert quad.class_single == f"a photo of a {word or 'person'}"


def _tokenizing_models(tiny_models) -> SimpleNamespace:
    """The part of ``Models`` that turns prompts into ids, on the real CLIP vocabulary."""
    models = SimpleNamespace(tokenizer=load_clip_tokenizer(tiny_models.tokenizer), device="cpu")
    models.prompt_ids = lambda prompts: Models.prompt_ids(models, prompts)
    models.placeholder_id = lambda word: Models.placeholder_id(models, word)
    return models


def _bare_stage() -> CompositionStage:
    """A stage with only its placeholder: enough for its token bookkeeping."""
    stage = CompositionStage.__new__(CompositionStage)
    stage.placeholder = "z"
    return stage


def test_each_sample_aligns_its_own_class_word(tiny_models):
    """With class words of different token lengths in one batch, the aligned positions still pair the
    template, composition words and padding of the subject and class prompts, sample by sample."""
    models = _tokenizing_models(tiny_models)
    quads = [build_prompts("riding a horse on the beach", "woman"), build_prompts("riding a horse on the beach", "old bearded man")]
    stage = _bare_stage()
    n = 16
    alignment = stage.token_alignment(models, quads, subject_len=n)
    index = alignment.index
    assert index.shape[:2] == (2, 4)

    z = models.placeholder_id("z")
    for b, quad in enumerate(quads):
        subject_ids = models.prompt_ids([quad.subject_comp])[0].tolist()
        at = subject_ids.index(z)
        spliced = (subject_ids[:at] + [-1] * n + subject_ids[at + 1 :])[:77]  # the N subject tokens in place of z
        class_ids = models.prompt_ids([quad.class_comp])[0]
        subject_side = torch.tensor(spliced)[index[b, 1]]
        class_side = class_ids[index[b, 3]]
        assert torch.equal(subject_side, class_side)
        assert not (subject_side == -1).any()
        # the subject's own positions: its N tokens, and 'a <class word>' in the class prompts
        assert alignment.subject[b, 1].nonzero().flatten().tolist() == [i for i, t in enumerate(spliced) if t == -1]
        class_words = models.tokenizer(quad.class_single.removeprefix("a photo of "), add_special_tokens=False)["input_ids"]
        assert class_ids[alignment.subject[b, 3]].tolist() == class_words


def _reference_mask(ids: list, special: set) -> list:
    """The reference's prompt mask (AdaFace-dev ``embedding_manager.update_prompt_masks``, then BOS zeroed)."""
    return [0.0 if i == 0 or t in special else 1.0 for i, t in enumerate(ids)]


def test_prompt_weights_follow_the_reference_masks_of_the_subject_prompts(tiny_models):
    """The stage reads the weights off the class prompts; at the aligned positions they must be the reference's
    ``(m_subj_single + m_subj_comp)^2 / 4`` of the spliced subject prompts: BOS 0, template 1, composition 1/4,
    EOS/padding 0."""
    models = _tokenizing_models(tiny_models)
    quads = [build_prompts("riding a horse on the beach", "woman"), build_prompts("in the forest", "old bearded man")]
    stage = _bare_stage()
    n = 16
    index = stage.token_alignment(models, quads, subject_len=n).index
    weights = stage.prompt_weights(models, quads, index)
    assert weights.shape == index[:, 0].shape

    z = models.placeholder_id("z")
    tokenizer = models.tokenizer
    special = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}
    assert special == {49406, 49407}  # the ids the reference hard-codes
    for b, quad in enumerate(quads):
        masks = []
        for prompt in (quad.subject_single, quad.subject_comp):
            ids = models.prompt_ids([prompt])[0].tolist()
            at = ids.index(z)
            masks.append(torch.tensor(_reference_mask((ids[:at] + [z] * n + ids[at + 1:])[:77], special)))
        expect = (masks[0][index[b, 0]] + masks[1][index[b, 1]]).pow(2) / 4
        assert torch.equal(weights[b], expect)
        n_comp = len(tokenizer(quad.composition, add_special_tokens=False)["input_ids"])
        assert weights[b].tolist()[:4] == [0.0, 1.0, 1.0, 1.0] and weights[b].tolist().count(0.25) == n_comp
        assert weights[b].sum() == 3 + 0.25 * n_comp  # EOS and the padding weigh nothing


def test_composition_step_weighs_prompt_positions(tiny_models):
    """Through the whole step: with the weights, the prompt embeddings' padding does not move ``delta_prompt``."""
    from diffusers import UNet2DConditionModel

    from trainer.compositions import aligned_tokens
    from trainer.losses_composition import CompositionLossWeights, composition_step

    unet = UNet2DConditionModel.from_pretrained(str(tiny_models.sd15 / "unet")).requires_grad_(False).eval()
    g = torch.Generator().manual_seed(0)
    tokens, dim = 12, unet.config.cross_attention_dim
    embeds = torch.randn(4, tokens, dim, generator=g)
    alignment = aligned_tokens(4, 3, 2, seq_len=tokens)  # K = 9 aligned positions
    weights = torch.tensor([[0.0, 1, 1, 1, 0.25, 0.25, 0, 0, 0]])
    prompt_only = CompositionLossWeights(delta_attn_out=0.0, delta_attn_map=0.0, face_preserve=0.0)

    def delta_prompt(e, w):
        return composition_step(unet, torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1)),
                                torch.tensor(500), e, None, "up_blocks.3", prompt_only, alignment,
                                prompt_weights=w)["delta_prompt"].item()

    moved = embeds.clone()
    moved[1, alignment.index[1, 6:]] += torch.randn(3, dim, generator=g)  # the subject-composition prompt's padding
    assert delta_prompt(moved, weights) == pytest.approx(delta_prompt(embeds, weights), abs=1e-6)
    assert abs(delta_prompt(moved, None) - delta_prompt(embeds, None)) > 1e-3
