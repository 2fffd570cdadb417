"""Stage-1 training loop on tiny models: learning, expansion, exact resume, crash safety."""

import copy
import logging
import shutil
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from accelerate import Accelerator

from adaface_core.checkpoint import load_inverter
from adaface_core.clip_text import tile_rows
from adaface_core.errors import CheckpointError, ConfigError
from trainer import checkpointing
from trainer.config import OptimConfig, config_from_dict
from trainer.loop import (SimulatedCrash, Trainer, build_lr_scheduler, build_optimizer, heldout_loss, lr_factor,
                          restore_optimizer)
from trainer.models import build_models
from trainer.run import cli, main
from trainer.stages import build_face_stage


@pytest.fixture(scope="module")
def models_root(tiny_models, tmp_path_factory):
    """The session's tiny models, with the teacher UNet sharing the SD1.5 UNet's weights.

    Arc2Face's UNet is a fine-tune of SD1.5's, so the student can come close to the teacher; with two
    unrelated random UNets the reachable loss floor is near the starting loss and nothing is learnt.
    """
    root = tmp_path_factory.mktemp("trainer_models")
    arc2face = root / "arc2face"
    shutil.copytree(tiny_models.encoder, arc2face / "encoder")
    shutil.copytree(tiny_models.sd15 / "unet", arc2face / "arc2face")
    return {"sd15": str(tiny_models.sd15), "arc2face": str(arc2face)}


def make_config(models_root, output, **face):
    face_section = {
        "max_steps": 12,
        "optim": {"optimizer": "adamw", "lr": 2e-3, "batch_size": 2, "grad_accum": 2, "weight_decay": 0.0},
        "loss": {"chain_steps": 2, "cfg_prob": 0.6},
        "expansion": {"factors": [[2, 1, 1], [1, 2, 1]], "forced_steps": [4, 8], "perturb_std": 0.1},
    }
    face_section.update(face)
    return {
        "models": dict(models_root),
        "data": {"image_size": 32, "random_id_prob": 1.0},
        "run": {"output": str(output), "seed": 3, "save_every": 3, "log_every": 1, "device": "cpu", "tensorboard": False},
        "face": face_section,
    }


def write_config(path: Path, values: dict) -> Path:
    path.write_text(yaml.safe_dump(values), encoding="utf-8")
    return path


def run_cli(config_path, *extra):
    return main(["--config", str(config_path), "--no-progress", *extra])


def weights(path):
    return load_inverter(path).state_dict()


def assert_same_weights(a, b, atol=1e-6):
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].shape == b[key].shape, key
        assert torch.allclose(a[key], b[key], atol=atol, rtol=0), key


def test_heldout_face_distillation_loss_halves(models_root, tmp_path):
    config = config_from_dict(make_config(models_root, tmp_path, max_steps=120,
                                          optim={"optimizer": "adamw", "lr": 2e-3, "batch_size": 4, "grad_accum": 1,
                                                 "weight_decay": 0.0},
                                          expansion={"enabled": False}))
    torch.manual_seed(0)
    accelerator = Accelerator(cpu=True)
    models = build_models(config, torch.device("cpu"), need_vae=False)
    stage = build_face_stage(config, config.face, models, accelerator, tmp_path)
    before = heldout_loss(stage, models, batches=2, batch_size=8)
    trainer = Trainer(stage, config.face, models, accelerator, tmp_path / "face", seed=0, save_every=10**6,
                      show_progress=False, tensorboard=False)
    result = trainer.train()
    after = heldout_loss(stage, models, batches=2, batch_size=8)
    assert after < 0.5 * before, (before, after)
    assert (tmp_path / "face" / "losses.csv").read_text().count("\n") == 13  # header + every 10th step
    assert load_inverter(result.final_checkpoint).config.attention_multipliers == [1, 1, 1]


def test_expansion_through_the_trainer_keeps_the_output_at_zero_noise(models_root, tmp_path):
    config = config_from_dict(make_config(models_root, tmp_path, expansion={"factors": [[2, 4, 1]], "perturb_std": 0.0}))
    accelerator = Accelerator(cpu=True)
    models = build_models(config, torch.device("cpu"), need_vae=False, need_teacher=False)
    stage = build_face_stage(config, config.face, models, accelerator, tmp_path)
    trainer = Trainer(stage, config.face, models, accelerator, tmp_path / "face", show_progress=False, tensorboard=False)
    ids = F.normalize(torch.randn(3, models.id_dim, generator=torch.Generator().manual_seed(1)), dim=-1)
    with torch.no_grad():
        tokens = models.id_encoder(ids).id_tokens
        before = trainer.inverter(tokens)
        old_params = {id(p) for p in trainer.optimizer.param_groups[0]["params"]}
        trainer._expand([2, 4, 1])
        after = trainer.inverter(tokens)
    assert trainer.inverter.config.attention_multipliers == [2, 4, 1]
    assert trainer.inverter.config.expansion_history[-1]["factors"] == [2, 4, 1]
    assert torch.allclose(before, after, atol=1e-5)
    new_params = trainer.optimizer.param_groups[0]["params"]
    assert {id(p) for p in trainer.inverter.parameters() if p.requires_grad} == {id(p) for p in new_params}
    assert old_params != {id(p) for p in new_params}


def test_an_expansion_keeps_the_optimizer_state_of_the_parameters_that_survive(models_root, tmp_path):
    config = config_from_dict(make_config(models_root, tmp_path, optim={"optimizer": "prodigy", "batch_size": 2, "grad_accum": 1},
                                          expansion={"factors": [[2, 1, 1]], "perturb_std": 0.0}))
    accelerator = Accelerator(cpu=True)
    models = build_models(config, torch.device("cpu"), need_vae=False)
    stage = build_face_stage(config, config.face, models, accelerator, tmp_path)
    trainer = Trainer(stage, config.face, models, accelerator, tmp_path / "face", show_progress=False, tensorboard=False)
    trainer.train_step()
    trainer.train_step()
    old = trainer.optimizer
    kept = trainer.inverter.clip.encoder.layers[0].self_attn.q_proj.weight
    replaced = trainer.inverter.clip.encoder.layers[0].self_attn.k_proj.weight
    trainer._expand([2, 1, 1])
    new = trainer.optimizer
    assert new.state[kept] is old.state[kept]  # moments and Prodigy's running sums of untouched weights
    grown = trainer.inverter.clip.encoder.layers[0].self_attn.k_proj.weight
    assert grown is not replaced
    # the grown projection takes the old state tiled like its weights, moments scaled to each copy's gradient share
    before, after = old.state[replaced], new.state[grown]
    assert after["step"] == before["step"]
    for key, power in (("p0", 0), ("s", 1), ("exp_avg", 1), ("exp_avg_sq", 2)):
        expected = tile_rows(before[key].view(replaced.shape), 2).flatten() / 2**power
        assert torch.allclose(after[key].flatten(), expected), key
    for key in ("d", "d_max", "d_numerator", "k"):
        assert new.param_groups[0][key] == old.param_groups[0][key], key
    trainer.train_step()  # and it trains on


def test_a_checkpoint_of_the_other_stage_is_not_resumed(models_root, tmp_path, caplog):
    """--stage both --resume <a stage-1 checkpoint>: stage 2 must not take stage 1's step counter and optimizer,
    even from a copy outside its stage folder, whose name says nothing of its stage."""
    first = run_cli(write_config(tmp_path / "a.yaml", make_config(models_root, tmp_path / "a", max_steps=3)))
    copied = shutil.copytree(tmp_path / "a" / "face" / "checkpoints" / "step_0000003", tmp_path / "kept" / "step_0000003")
    config = config_from_dict(make_config(models_root, tmp_path / "b"))
    accelerator = Accelerator(cpu=True)
    models = build_models(config, torch.device("cpu"), need_vae=False)
    stage = build_face_stage(config, config.face, models, accelerator, tmp_path)
    stage.name = "composition"  # any stage other than the checkpoint's
    trainer = Trainer(stage, config.face, models, accelerator, tmp_path / "b" / "composition",
                      resume=copied, show_progress=False, tensorboard=False)
    assert first.stages[0].steps == 3 and trainer.step == 0
    assert "is a face checkpoint; the composition stage starts from the beginning" in caplog.text


def test_a_folder_of_the_other_stage_resumes_each_stage_from_its_own_checkpoints(tmp_path):
    """--stage both --resume <out>/composition/checkpoints/step_N (the README's way to branch stage 2) must give
    stage 1 its own latest checkpoint: handed the stage-2 one, stage 1 started over and --overwrite deleted it."""
    def checkpoint(stage, step):
        folder = tmp_path / "out" / stage / "checkpoints" / checkpointing.step_dir_name(step)
        folder.mkdir(parents=True)
        for name in (checkpointing.INVERTER_FILE, checkpointing.STATE_FILE):
            (folder / name).write_bytes(b"")
        return folder

    older_face, face = checkpoint("face", 20), checkpoint("face", 30)
    branch, latest = checkpoint("composition", 5), checkpoint("composition", 10)
    find = checkpointing.find_resume_checkpoint
    for given in (branch, branch.parent, branch.parent.parent):
        assert find(given, "face") == face, given
    assert find(branch, "composition") == branch
    assert find(branch.parent, "composition") == find(tmp_path / "out", "composition") == latest
    assert find(face.parent.parent, "composition") == find(face, "composition") == latest
    assert find(tmp_path / "out", "face") == find(face, "face") == face
    # Stage 1 branched at an older step: stage 2's checkpoints grew from the branch left, none is resumed.
    assert find(older_face, "face") == older_face and find(older_face, "composition") is None


PRODIGY_WARMUP = {"optim": {"optimizer": "prodigy", "batch_size": 2, "grad_accum": 2, "warmup_steps": 8},
                  # plateau-only expansions (no forced steps) at steps 5 and 10: the second depends on the
                  # detector's state carried across the resume at step 6
                  "expansion": {"factors": [[2, 1, 1], [1, 2, 1]], "forced_steps": [], "perturb_std": 0.1,
                                "warmup_steps": 2, "patience": 3, "min_rel_improvement": 0.5, "min_steps_between": 1}}


@pytest.mark.parametrize("settings", [{}, PRODIGY_WARMUP], ids=["adamw", "prodigy-warmup-plateau"])
def test_n_steps_resume_n_steps_equals_2n_steps(models_root, tmp_path, settings):
    """Weights, optimizer (Prodigy's running sums too), LR warm-up, plateau detector and RNG all resume exactly."""
    straight = write_config(tmp_path / "straight.yaml", make_config(models_root, tmp_path / "straight", **settings))
    result = run_cli(straight)
    full = weights(result.stages[0].final_checkpoint)
    assert load_inverter(result.stages[0].final_checkpoint).config.attention_multipliers == [2, 2, 1]

    split = write_config(tmp_path / "split.yaml", make_config(models_root, tmp_path / "split", **settings))
    run_cli(split, "--max-steps", "6")
    resumed = run_cli(split, "--resume", str(tmp_path / "split"))
    assert resumed.stages[0].steps == 12 and len(resumed.stages[0].losses) == 6
    assert_same_weights(full, weights(resumed.stages[0].final_checkpoint))
    rows = (tmp_path / "split" / "face" / "losses.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == [str(i) for i in range(1, 13)]


def test_prodigy_gets_the_reference_settings_and_its_lr_schedule():
    """Defaults = the reference code's Prodigy: no weight decay, bias correction on, the LR held for 500
    steps, then falling linearly to 1/11 at the last step, i.e. torch's ConstantLR (factor 1, 500 steps)
    followed by PolynomialLR(power 1, total_iters 1.1 x the rest), as the reference chains them."""
    param = torch.nn.Parameter(torch.zeros(3))
    optimizer = build_optimizer([param], OptimConfig())
    group = optimizer.param_groups[0]
    assert group["weight_decay"] == 0.0 and group["use_bias_correction"] is True and group["d_coef"] == 2.0

    max_steps, hold = 2000, 500
    ours = build_lr_scheduler(optimizer, OptimConfig(), max_steps, step=0)
    reference_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    reference = torch.optim.lr_scheduler.SequentialLR(reference_opt, [
        torch.optim.lr_scheduler.ConstantLR(reference_opt, factor=1.0, total_iters=hold),
        torch.optim.lr_scheduler.PolynomialLR(reference_opt, power=1, total_iters=int(1.1 * (max_steps - hold))),
    ], milestones=[hold])
    ours_lr, reference_lr = [], []
    for _ in range(max_steps):
        ours_lr.append(optimizer.param_groups[0]["lr"])
        reference_lr.append(reference_opt.param_groups[0]["lr"])
        optimizer.step(), ours.step(), reference_opt.step(), reference.step()
    assert ours_lr[:hold + 1] == [1.0] * (hold + 1)
    assert ours_lr == pytest.approx(reference_lr, abs=1e-6)
    assert ours_lr[-1] == pytest.approx(1 / 11, abs=1e-3)
    # A scheduler rebuilt at a resume step continues where the straight one is.
    resumed = build_lr_scheduler(build_optimizer([param], OptimConfig()), OptimConfig(), max_steps, step=1234)
    assert resumed.get_last_lr()[0] == pytest.approx(ours_lr[1234], abs=1e-9)
    # constant: no decay at all.
    flat = build_lr_scheduler(build_optimizer([param], OptimConfig()), OptimConfig(lr_schedule="constant"),
                              max_steps, step=1999)
    assert flat.get_last_lr()[0] == 1.0


def logged_lrs(output: Path) -> dict[int, float]:
    """losses.csv's LR column by step: the LR each optimizer step ran with."""
    rows = (output / "face" / "losses.csv").read_text().splitlines()[1:]
    return {int(r.split(",")[0]): float(r.split(",")[2]) for r in rows}


def test_a_resume_with_more_steps_continues_on_the_longer_schedule(models_root, tmp_path):
    """``--max-steps 6`` ends that run's decay at step 6; resuming to 12 follows the 12-step schedule from
    step 7 on, not the LR the short run ended with."""
    optim = {"optimizer": "adamw", "lr": 2e-3, "batch_size": 2, "grad_accum": 2, "lr_decay_start": 2}
    settings = {"optim": optim, "expansion": {"enabled": False}}
    run_cli(write_config(tmp_path / "straight.yaml", make_config(models_root, tmp_path / "straight", **settings)))
    split = write_config(tmp_path / "split.yaml", make_config(models_root, tmp_path / "split", **settings))
    run_cli(split, "--max-steps", "6")
    run_cli(split, "--resume", str(tmp_path / "split"))
    straight, resumed = logged_lrs(tmp_path / "straight"), logged_lrs(tmp_path / "split")
    schedule = OptimConfig(**{k: v for k, v in optim.items() if k != "optimizer"})
    assert sorted(straight) == sorted(resumed) == list(range(1, 13))
    assert straight == pytest.approx({n: 2e-3 * lr_factor(schedule, 12, n - 1) for n in straight}, rel=1e-4)
    assert resumed[6] == pytest.approx(2e-3 * lr_factor(schedule, 6, 5), rel=1e-4) and resumed[6] < straight[6]
    assert [resumed[n] for n in range(7, 13)] == pytest.approx([straight[n] for n in range(7, 13)], rel=1e-4)


def test_crash_midway_then_resume_loses_only_unsaved_steps(models_root, tmp_path):
    # The LR decays from step 2 on, so the resumed run must also land on the same point of the schedule.
    decaying = {"optim": {"optimizer": "adamw", "lr": 2e-3, "batch_size": 2, "grad_accum": 2, "lr_decay_start": 2}}
    reference = run_cli(write_config(tmp_path / "ref.yaml", make_config(models_root, tmp_path / "ref", **decaying)))
    config = write_config(tmp_path / "crash.yaml", make_config(models_root, tmp_path / "crash", **decaying))
    with pytest.raises(SimulatedCrash):
        run_cli(config, "--crash-at-step", "8")
    ckpts = tmp_path / "crash" / "face" / "checkpoints"
    assert [p.name for p in sorted(ckpts.iterdir())] == ["step_0000003", "step_0000006"]  # steps 7-8 lost
    assert load_inverter(ckpts / "step_0000006" / "inverter.safetensors").config.attention_multipliers == [2, 1, 1]

    # A kill during a checkpoint write leaves only a temporary folder, which the next start removes.
    original = checkpointing.save_inverter

    def dying_save(*args, **kwargs):
        raise KeyboardInterrupt("killed while writing")

    checkpointing.save_inverter = dying_save
    try:
        with pytest.raises(KeyboardInterrupt):
            run_cli(config, "--resume", str(tmp_path / "crash"))
    finally:
        checkpointing.save_inverter = original
    assert (ckpts / ".tmp-step_0000009").is_dir()
    assert checkpointing.list_checkpoints(ckpts)[-1][0] == 6

    resumed = run_cli(config, "--resume", str(tmp_path / "crash"))
    assert not [p for p in ckpts.iterdir() if p.name.startswith(".")]
    assert not list((tmp_path / "crash").rglob("*.tmp"))
    assert_same_weights(weights(reference.stages[0].final_checkpoint), weights(resumed.stages[0].final_checkpoint))
    # The decay resumed where it was, and the expansions at steps 4 and 8 (a new optimizer each) kept it.
    schedule = OptimConfig(lr=2e-3, lr_decay_start=2)
    expected = {n: 2e-3 * lr_factor(schedule, 12, n - 1) for n in range(1, 13)}
    assert logged_lrs(tmp_path / "ref") == pytest.approx(expected, rel=1e-4)
    assert logged_lrs(tmp_path / "crash") == logged_lrs(tmp_path / "ref")
    assert [n for n, _ in checkpointing.list_checkpoints(ckpts)] == [6, 9, 12]  # keep_last = 3
    # Each row's multipliers are the ones its loss was computed with: the expansions follow steps 4 and 8.
    rows = (tmp_path / "ref" / "face" / "losses.csv").read_text().splitlines()[1:]
    multipliers = {int(r.split(",")[0]): r.split(",")[3] for r in rows}
    assert [multipliers[n] for n in (4, 5, 8, 9)] == ["1 1 1", "2 1 1", "2 1 1", "2 2 1"]

    # A resume whose checkpoint is past the steps now asked for would stop at once and call that step final.
    with pytest.raises(ConfigError, match=r"step_0000012 is at step 12, past the face stage's max_steps 9"):
        run_cli(config, "--resume", str(tmp_path / "crash"), "--max-steps", "9")
    # A damaged file of the checkpoint is named, not a bare "Invalid argument".
    rng = ckpts / "step_0000012" / "rng_rank0.pt"
    for damaged, reason in ((rng.read_bytes()[: rng.stat().st_size // 2], ".+"), (b"", "EOFError")):
        rng.write_bytes(damaged)
        with pytest.raises(CheckpointError, match=rf"cannot read the RNG state .*rng_rank0.pt: {reason}; resume from another"):
            run_cli(config, "--resume", str(ckpts / "step_0000012"), "--max-steps", "13")


def test_trainer_state_loads_with_weights_only(models_root, tmp_path):
    run_cli(write_config(tmp_path / "c.yaml", make_config(models_root, tmp_path / "o", max_steps=3,
                                                          optim={"optimizer": "prodigy", "batch_size": 1, "grad_accum": 1})))
    step = tmp_path / "o" / "face" / "checkpoints" / "step_0000003"
    state = torch.load(step / "trainer_state.pt", weights_only=True)
    assert state["step"] == 3 and "d" in state["optimizer"]["param_groups"][0]
    rng = torch.load(step / "rng_rank0.pt", weights_only=True)
    assert {"python", "numpy", "torch", "generator"} <= set(rng)


def test_a_fresh_run_over_an_earlier_one_is_refused_and_loses_nothing(models_root, tmp_path):
    """Starting afresh in a used folder (or after a mistyped --resume) would cut the earlier run's log and
    overwrite its inverter: it is refused unless --overwrite says to start over."""
    config = write_config(tmp_path / "c.yaml", make_config(models_root, tmp_path / "out", max_steps=3,
                                                             expansion={"enabled": False}))
    run_cli(config)
    stage_dir = tmp_path / "out" / "face"
    log, final = (stage_dir / "losses.csv").read_text(), weights(stage_dir / "adaface_inverter.safetensors")
    with pytest.raises(ConfigError, match="holds an earlier run .*--resume .*--overwrite"):
        run_cli(config)
    with pytest.raises(ConfigError, match="no such folder"):
        run_cli(config, "--resume", str(tmp_path / "out_typo"))
    assert (stage_dir / "losses.csv").read_text() == log
    assert_same_weights(final, weights(stage_dir / "adaface_inverter.safetensors"), atol=0)
    run_cli(config, "--overwrite", "--max-steps", "2")
    assert max(step for step, _ in checkpointing.list_checkpoints(stage_dir / "checkpoints")) == 2
    assert len((stage_dir / "losses.csv").read_text().splitlines()) == 3  # header + the new run's 2 steps


def test_a_finished_run_without_checkpoints_and_a_resume_of_nothing_are_refused(models_root, tmp_path):
    """A run kept for its result (checkpoints deleted to save space) is still an earlier run; and a --resume
    that names no checkpoint (the final file, an empty folder) must not quietly start from scratch."""
    config = write_config(tmp_path / "c.yaml", make_config(models_root, tmp_path / "out", max_steps=3,
                                                             expansion={"enabled": False}))
    run_cli(config)
    stage_dir = tmp_path / "out" / "face"
    shutil.rmtree(stage_dir / "checkpoints")
    log, final = (stage_dir / "losses.csv").read_text(), weights(stage_dir / "adaface_inverter.safetensors")
    with pytest.raises(ConfigError, match=r"holds an earlier run \(adaface_inverter.safetensors\).*--overwrite"):
        run_cli(config)
    (tmp_path / "empty").mkdir()
    for nothing in (stage_dir / "adaface_inverter.safetensors", tmp_path / "empty"):
        with pytest.raises(ConfigError, match="no face checkpoint there"):
            run_cli(config, "--resume", str(nothing), "--output", str(tmp_path / "other"))
    assert (stage_dir / "losses.csv").read_text() == log and not (tmp_path / "other").exists()
    assert_same_weights(final, weights(stage_dir / "adaface_inverter.safetensors"), atol=0)


def test_a_write_error_is_one_line_not_a_traceback(models_root, tmp_path, monkeypatch, caplog):
    """A full disk or a folder without write permission: the command line says what failed, where."""
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder", encoding="utf-8")
    config = write_config(tmp_path / "c.yaml", make_config(models_root, blocker / "out", max_steps=1))
    monkeypatch.setattr(sys, "argv", ["trainer/run.py", "--config", str(config), "--no-progress"])
    assert cli() == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and str(blocker) in errors[0] and "Error" in errors[0]


def test_a_resume_from_an_older_checkpoint_does_not_leave_the_later_ones_behind(models_root, tmp_path):
    """Left there, the abandoned steps 9 and 12 would outrank the new branch: keep_last would prune its
    checkpoints first and a later plain --resume would continue the abandoned run."""
    config = write_config(tmp_path / "c.yaml", make_config(models_root, tmp_path / "out"))
    run_cli(config)
    stage_dir = tmp_path / "out" / "face"
    checkpoints = stage_dir / "checkpoints"
    older, saved = checkpoints / "step_0000006", sorted(checkpoints.iterdir())
    with pytest.raises(ConfigError, match=r"also holds later checkpoints \(step_0000009, step_0000012\).*--overwrite"):
        run_cli(config, "--resume", str(older), "--max-steps", "8")
    assert sorted(checkpoints.iterdir()) == saved

    run_cli(config, "--resume", str(older), "--max-steps", "8", "--overwrite")
    assert [n for n, _ in checkpointing.list_checkpoints(checkpoints)] == [6, 8]
    assert checkpointing.find_resume_checkpoint(tmp_path / "out", "face").name == "step_0000008"
    assert (stage_dir / "losses.csv").read_text().splitlines()[-1].startswith("8,")


def test_a_resume_takes_the_optimizer_settings_now_in_force():
    """The checkpoint gives the moments and Prodigy's learned step size; the config gives LR, d_coef and the rest."""
    param = torch.nn.Parameter(torch.ones(4))
    old = build_optimizer([param], OptimConfig(optimizer="adamw", lr=1e-3))
    build_lr_scheduler(old, OptimConfig(optimizer="adamw", lr=1e-3), 10, 0)
    param.grad = torch.ones(4)
    old.step()
    new = build_optimizer([param], OptimConfig(optimizer="adamw", lr=1e-5))
    restore_optimizer(new, copy.deepcopy(old.state_dict()), "adamw")
    build_lr_scheduler(new, OptimConfig(optimizer="adamw", lr=1e-5, lr_schedule="constant"), 10, 1)
    assert new.param_groups[0]["lr"] == pytest.approx(1e-5)
    assert torch.equal(new.state[param]["exp_avg"], old.state[param]["exp_avg"])

    prodigy = build_optimizer([param], OptimConfig(d_coef=2.0))
    prodigy.step()
    again = build_optimizer([param], OptimConfig(d_coef=0.5))
    restore_optimizer(again, copy.deepcopy(prodigy.state_dict()), "prodigy")
    assert again.param_groups[0]["d_coef"] == 0.5 and again.param_groups[0]["d"] == prodigy.param_groups[0]["d"]
    with pytest.raises(ConfigError, match="holds prodigy optimizer state but the config asks for adamw"):
        restore_optimizer(build_optimizer([param], OptimConfig(optimizer="adamw")), prodigy.state_dict(), "adamw")


def test_a_zero_save_interval_is_a_config_error(models_root, tmp_path):
    values = make_config(models_root, tmp_path / "out")
    values["run"]["save_every"] = 0
    with pytest.raises(ConfigError, match="run.save_every and run.log_every must be >= 1"):
        config_from_dict(values).validate(check_paths=False)


def test_a_resume_refuses_other_factors_for_the_expansions_already_applied(models_root, tmp_path):
    """The first expansion ([2, 1, 1] at step 4) is in the checkpoint: a config that now says otherwise
    for it is refused; the expansions still to come may change."""
    values = make_config(models_root, tmp_path / "out")
    run_cli(write_config(tmp_path / "c.yaml", values), "--max-steps", "6")
    checkpoints = tmp_path / "out" / "face" / "checkpoints"
    saved = sorted(checkpoints.iterdir())

    values["face"]["expansion"]["factors"] = [[1, 1, 2], [1, 2, 1]]
    with pytest.raises(ConfigError, match=r"already applied 1 expansion.*\[\[2, 1, 1\]\].*\[\[1, 1, 2\]\]"):
        run_cli(write_config(tmp_path / "changed.yaml", values), "--resume", str(tmp_path / "out"))
    assert sorted(checkpoints.iterdir()) == saved

    values["face"]["expansion"]["factors"] = [[2, 1, 1], [1, 1, 3]]
    result = run_cli(write_config(tmp_path / "later.yaml", values), "--resume", str(tmp_path / "out"))
    assert load_inverter(result.stages[0].final_checkpoint).config.attention_multipliers == [2, 1, 3]
