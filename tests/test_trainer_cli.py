"""The trainer as users run it: the smoke preset end to end, and two CPU processes under accelerate."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from adaface_core.checkpoint import load_inverter

REPO = Path(__file__).resolve().parent.parent


def _env():
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    return env


def test_smoke_preset_end_to_end(tmp_path):
    out = tmp_path / "smoke"
    proc = subprocess.run([sys.executable, "trainer/run.py", "--preset", "smoke", "--output", str(out), "--no-progress"],
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=170)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = proc.stdout
    assert "SMOKE RUN" in log and "not model quality" in log
    final = out / "face" / "adaface_inverter.safetensors"
    inverter = load_inverter(final)  # what ComfyUI's Load AdaFace node does
    assert inverter.config.attention_multipliers == [4, 2, 1]
    assert len(inverter.config.expansion_history) == 2
    assert (out / "smoke_conditioning.safetensors").is_file()
    assert (out / "face" / "losses.csv").read_text().count("\n") == 31
    assert str(final) in log
    # Stage 2 ran from stage 1's result and measured itself on held-out draws.
    composed = load_inverter(out / "composition" / "adaface_inverter.safetensors")
    assert composed.config.attention_multipliers == [4, 2, 1]
    held = json.loads((out / "composition" / "heldout.json").read_text())
    assert held["face_within_bound"] and "held-out delta loss" in log
    assert (out / "composition" / "losses.csv").read_text().count("\n") == 11
    if (out / "models" / "buffalo_s").is_dir():  # a real detector was installed: real photos were used
        assert "coffee_no_face.jpg" in (out / "no_face.txt").read_text()
        assert "the face in" in log


def test_the_smoke_preset_over_the_users_own_photos_checks_its_result_on_them(tmp_path):
    """``--preset smoke --config`` with another data.root: the final check used to look for the preset's
    astronaut there, after both stages had trained."""
    from helpers_faces import require_buffalo_s_pack, require_faces

    faces = require_faces()
    require_buffalo_s_pack(tmp_path / "probe")  # the smoke preset finds its faces with buffalo_s
    photos = tmp_path / "mine" / "obama"
    photos.mkdir(parents=True)
    shutil.copy(faces / "labeled" / "Barack_Obama" / "obama.jpg", photos / "obama.jpg")
    over = tmp_path / "over.yaml"
    over.write_text(yaml.safe_dump({"data": {"root": str(tmp_path / "mine")}, "stage": "face",
                                    "face": {"max_steps": 2, "expansion": {"enabled": False}}}), encoding="utf-8")
    out = tmp_path / "smoke"
    proc = subprocess.run([sys.executable, "trainer/run.py", "--preset", "smoke", "--config", str(over), "--output",
                           str(out), "--no-progress"], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=170)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"the face in {photos / 'obama.jpg'}" in proc.stdout + proc.stderr


def test_two_cpu_processes_agree(tiny_models, tmp_path):
    if shutil.which("accelerate") is None and not (Path(sys.executable).parent / "accelerate").is_file():
        pytest.skip("accelerate CLI not installed")
    accelerate = str(Path(sys.executable).parent / "accelerate")
    config = {
        "models": {"sd15": str(tiny_models.sd15), "arc2face": str(tiny_models.arc2face)},
        "data": {"image_size": 32, "random_id_prob": 1.0},
        "run": {"output": str(tmp_path / "ddp"), "save_every": 2, "log_every": 1, "device": "cpu", "tensorboard": False,
                "distributed_timeout_minutes": 90},
        "face": {
            "max_steps": 4,
            "optim": {"optimizer": "adamw", "lr": 1e-3, "batch_size": 1, "grad_accum": 2},
            "loss": {"chain_steps": 1},
            "expansion": {"factors": [[2, 1, 1]], "forced_steps": [2]},
        },
    }
    path = tmp_path / "ddp.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    proc = subprocess.run(
        # accelerate 1.15 launches several CPU processes only through MPI with --cpu; --multi_gpu goes
        # through torchrun and, with no GPU present, runs gloo on the CPU.
        [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
         "--dynamo_backend", "no", "trainer/run.py", "--config", str(path), "--no-progress"],
        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120,
    )
    output = proc.stdout[-3000:] + proc.stderr[-3000:]
    finished = "weights agree across 2 processes" in proc.stdout and (tmp_path / "ddp" / "face" / "adaface_inverter.safetensors").is_file()
    # Rarely (about 1 run in 15 on a loaded 2-core box) gloo aborts a process while the interpreter shuts
    # down, after all training, checks and files are done (pytorch/pytorch#179291 describes the race).
    # That, and only that, is tolerated here: every outcome is still asserted below.
    teardown_abort = proc.returncode != 0 and "terminate called without an active exception" in proc.stderr and finished
    assert proc.returncode == 0 or teardown_abort, output
    assert finished, output
    assert "each waits up to 90 minutes for the others" in proc.stdout + proc.stderr  # face analysis fits in the wait
    step = tmp_path / "ddp" / "face" / "checkpoints" / "step_0000004"
    assert (step / "rng_rank0.pt").is_file() and (step / "rng_rank1.pt").is_file()
    assert load_inverter(step / "inverter.safetensors").config.attention_multipliers == [2, 1, 1]
