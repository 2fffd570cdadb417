"""Crash safety against a real SIGKILL: the losses CSV and the checkpoints survive, and resuming matches
an uninterrupted run bit for bit. Plus the torn-file cases a kill can leave, one at a time."""

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from adaface_core.checkpoint import load_inverter
from test_trainer_cli import REPO, _env
from test_trainer_loop import assert_same_weights, make_config, models_root, weights, write_config  # noqa: F401 (fixture)
from trainer import checkpointing
from trainer.logs import CSV_HEADER, TrainLogger

KILL_AFTER = 6  # the checkpoint to wait for (make_config saves every 3 steps and expands at 4 and 8)
POLL_TIMEOUT_S = 150.0


@pytest.fixture
def start():
    """Starts the trainer as users do (output to a log file: a pipe nobody reads could block the child);
    whatever is still running when the test ends, failed or not, is killed."""
    procs: list[subprocess.Popen] = []

    def _start(config: Path, log: Path, *extra: str) -> subprocess.Popen:
        with log.open("w", encoding="utf-8") as handle:
            procs.append(subprocess.Popen([sys.executable, "trainer/run.py", "--config", str(config), "--no-progress", *extra],
                                          cwd=REPO, env=_env(), stdout=handle, stderr=subprocess.STDOUT))
        return procs[-1]

    yield _start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)


def _finish(proc: subprocess.Popen, log: Path) -> None:
    assert proc.wait(timeout=POLL_TIMEOUT_S) == 0, log.read_text(encoding="utf-8")[-3000:]


def _kill_after_checkpoint(proc: subprocess.Popen, checkpoints: Path, log: Path) -> int:
    """Polls (no assumption about speed) until checkpoint ``KILL_AFTER`` is complete, then SIGKILLs the run."""
    deadline = time.monotonic() + POLL_TIMEOUT_S
    while not any(step >= KILL_AFTER for step, _ in checkpointing.list_checkpoints(checkpoints)):
        assert proc.poll() is None, "the run ended before it was killed:\n" + log.read_text(encoding="utf-8")[-3000:]
        assert time.monotonic() < deadline, "no checkpoint in time:\n" + log.read_text(encoding="utf-8")[-3000:]
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    return checkpointing.list_checkpoints(checkpoints)[-1][0]


def _csv_steps(path: Path) -> list[str]:
    lines = path.read_text(encoding="utf-8").splitlines()
    assert lines and lines[0] == ",".join(CSV_HEADER), lines[:2]
    assert sum(line == lines[0] for line in lines) == 1, "more than one header"
    return [line.split(",")[0] for line in lines[1:]]


@pytest.mark.skipif(sys.platform == "win32", reason="no SIGKILL on Windows")
def test_sigkill_then_resume_equals_an_uninterrupted_run(models_root, tmp_path, start):
    config = write_config(tmp_path / "kill.yaml", make_config(models_root, tmp_path / "kill"))
    stage = tmp_path / "kill" / "face"
    # Far more steps than it can run before the kill, so the kill always lands mid-run.
    proc = start(config, tmp_path / "killed.log", "--max-steps", "1000")
    saved = _kill_after_checkpoint(proc, stage / "checkpoints", tmp_path / "killed.log")
    # Every step up to the checkpoint was logged before it was saved, and the rows were flushed.
    assert _csv_steps(stage / "losses.csv")[:saved] == [str(i) for i in range(1, saved + 1)]

    total = max(12, saved + 3)  # the resumed part runs a few steps (across the step-8 expansion when killed at 6)
    resumed = start(config, tmp_path / "resumed.log", "--resume", str(tmp_path / "kill"), "--max-steps", str(total))
    straight = start(config, tmp_path / "straight.log", "--output", str(tmp_path / "straight"), "--max-steps", str(total))
    _finish(resumed, tmp_path / "resumed.log")
    _finish(straight, tmp_path / "straight.log")

    final = stage / "adaface_inverter.safetensors"
    assert final.is_file()
    assert f"resumed face from {stage / 'checkpoints' / checkpointing.step_dir_name(saved)}" in \
        (tmp_path / "resumed.log").read_text(encoding="utf-8")
    assert _csv_steps(stage / "losses.csv") == [str(i) for i in range(1, total + 1)]
    assert_same_weights(weights(tmp_path / "straight" / "face" / "adaface_inverter.safetensors"), weights(final), atol=0)
    assert not [p for p in (stage / "checkpoints").iterdir() if p.name.startswith(".")]


# --- the losses CSV after a kill: empty, headerless, torn -------------------------------------------------


def _row(step: int) -> str:
    return f"{step},0.5,0.001,1 1 1,{step}.00\r\n"


def _logged(stage_dir: Path, start_step: int, steps: range) -> list[str]:
    log = TrainLogger(stage_dir, "face", start_step, 20, enabled=True, tensorboard=False, show_progress=False)
    for step in steps:
        log.log(step, 0.25, 1e-3, [1, 1, 1])
    log.close()
    return _csv_steps(stage_dir / "losses.csv")


HEADER_LINE = ",".join(CSV_HEADER) + "\r\n"


@pytest.mark.parametrize("before, kept", [
    ("", []),  # killed before the first flush: the file exists but is empty
    (_row(1) + _row(2) + _row(3), ["1", "2", "3"]),  # no header (an old run appended to an empty file)
    (HEADER_LINE + _row(1) + _row(2) + "3,0.4", ["1", "2"]),  # torn last line
    (HEADER_LINE + _row(1) + _row(2) + _row(3) + _row(4), ["1", "2", "3"]),  # rows past the checkpoint
    (HEADER_LINE + _row(1) + _row(2) + _row(1) + _row(2), ["1", "2"]),  # rows logged twice
], ids=["empty", "no-header", "torn", "past-checkpoint", "duplicates"])
def test_resume_repairs_the_losses_csv(tmp_path, before, kept):
    """Resuming at step 3: whatever a kill left, one header, the intact rows up to 3 once each, then 4 and 5."""
    (tmp_path / "losses.csv").write_text(before, encoding="utf-8", newline="")
    assert _logged(tmp_path, 3, range(4, 6)) == kept + ["4", "5"]


def test_rows_are_on_disk_as_soon_as_they_are_logged(tmp_path):
    log = TrainLogger(tmp_path, "face", 0, 20, enabled=True, tensorboard=False, show_progress=False)
    log.log(1, 0.25, 1e-3, [1, 1, 1])
    lines = (tmp_path / "losses.csv").read_text(encoding="utf-8").splitlines()  # read while the logger holds it open
    log.close()
    assert len(lines) == 2 and lines[0] == HEADER_LINE.strip() and lines[1].startswith("1,0.25,0.001,1 1 1,")


def test_a_fresh_start_restarts_the_csv(tmp_path):
    (tmp_path / "losses.csv").write_text(HEADER_LINE + _row(1) + _row(2), encoding="utf-8", newline="")
    assert _logged(tmp_path, 0, range(1, 3)) == ["1", "2"]


def test_a_failing_plot_is_a_warning_not_an_error(tmp_path, monkeypatch, caplog):
    """close() runs in the loop's `finally`, before the final inverter is written: it must not raise."""
    def broken_plot(self):
        raise KeyError("step")

    monkeypatch.setattr(TrainLogger, "plot", broken_plot)
    log = TrainLogger(tmp_path, "face", 0, 20, enabled=True, tensorboard=False, show_progress=False)
    log.log(1, 0.25, 1e-3, [1, 1, 1])
    with caplog.at_level(logging.WARNING, logger="trainer.logs"):
        assert log.close() is None
    assert "loss-curve PNG" in caplog.text and _csv_steps(tmp_path / "losses.csv") == ["1"]


# --- re-saving a step that already has a checkpoint -------------------------------------------------------


class _OneProcess:
    """The accelerator's few members save_checkpoint uses, for one process."""

    is_main_process = True
    process_index = 0
    num_processes = 1

    def wait_for_everyone(self) -> None:
        pass


def _save(checkpoints: Path, inverter, tag: str) -> Path:
    return checkpointing.save_checkpoint(checkpoints, 5, inverter, {"tag": tag}, _OneProcess(), torch.Generator(),
                                         keep_last=3)


def _tag(step_dir: Path) -> str:
    return checkpointing.load_checkpoint(step_dir).state["tag"]


def test_resave_of_a_step_is_never_without_a_checkpoint(tiny_models, tmp_path, monkeypatch):
    checkpoints = tmp_path / "checkpoints"
    inverter = load_inverter(tiny_models.inverter)
    _save(checkpoints, inverter, "old")
    real_replace = os.replace

    def killed_before_the_new_one_is_in(src, dst):
        if Path(src).name.startswith(".tmp-step_"):
            raise KeyboardInterrupt("killed between the two renames")
        real_replace(src, dst)

    monkeypatch.setattr(checkpointing.os, "replace", killed_before_the_new_one_is_in)
    with pytest.raises(KeyboardInterrupt):
        _save(checkpoints, inverter, "new")
    monkeypatch.setattr(checkpointing.os, "replace", real_replace)
    assert not (checkpoints / "step_0000005").exists()
    # The old checkpoint is still found (a --resume pointed at this folder without a clean-up first) ...
    found = checkpointing.find_resume_checkpoint(checkpoints, "face")
    assert found is not None and _tag(found) == "old"
    # ... and the next start puts it back and drops the temporary folder.
    checkpointing.clean_stale(checkpoints)
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_0000005"]
    assert _tag(checkpoints / "step_0000005") == "old"

    _save(checkpoints, inverter, "new")
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_0000005"]
    assert _tag(checkpoints / "step_0000005") == "new"


# A real write failure: the child process may write files of at most FILE_LIMIT bytes (as a full disk, the
# write itself fails), for the inverter file first, then for the trainer state after it.
_FULL_DISK_CHILD = """
import resource, signal, sys
from pathlib import Path
import torch
from adaface_core.checkpoint import load_inverter
from adaface_core.errors import WriteError
from test_trainer_kill import _OneProcess
from trainer import checkpointing

checkpoints, inverter_file = Path(sys.argv[1]), Path(sys.argv[2])
inverter, size = load_inverter(inverter_file), inverter_file.stat().st_size
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails (EFBIG) instead of the process being killed
hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
for limit in (size // 2, size + 65536):
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        checkpointing.save_checkpoint(checkpoints, 10, inverter, {"moments": torch.zeros(size // 2)}, _OneProcess(),
                                      torch.Generator(), keep_last=3)
    except WriteError as exc:
        print("WriteError:", exc)
"""


@pytest.mark.skipif(sys.platform == "win32", reason="file-size limits are POSIX")
def test_a_checkpoint_that_cannot_be_written_is_a_clear_error_and_keeps_the_last_one(tiny_models, tmp_path):
    """torch and safetensors report a full disk as a RuntimeError / SafetensorError naming no file; the
    trainer's command line shows a WriteError in one line, and no partial checkpoint is left to fill the disk."""
    checkpoints = tmp_path / "checkpoints"
    inverter = load_inverter(tiny_models.inverter)
    _save(checkpoints, inverter, "kept")
    env = dict(_env(), PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests")]))
    done = subprocess.run([sys.executable, "-c", _FULL_DISK_CHILD, str(checkpoints), str(tiny_models.inverter)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    failures = [line for line in done.stdout.splitlines() if line.startswith("WriteError:")]
    assert done.returncode == 0 and len(failures) == 2, done.stdout + done.stderr
    for failure, file in zip(failures, (checkpointing.INVERTER_FILE, checkpointing.STATE_FILE)):
        assert f"cannot write {checkpoints / '.tmp-step_0000010' / file}" in failure and "MiB free there" in failure
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_0000005"]
    assert _tag(checkpointing.find_resume_checkpoint(checkpoints, "face")) == "kept"


def test_clean_stale_drops_the_old_copy_once_the_new_one_is_in(tiny_models, tmp_path):
    checkpoints = tmp_path / "checkpoints"
    inverter = load_inverter(tiny_models.inverter)
    _save(checkpoints, inverter, "new")
    aside = checkpoints / ".old-step_0000005"
    aside.mkdir()
    (aside / checkpointing.INVERTER_FILE).write_bytes(b"partly deleted")  # a kill while it was being removed
    checkpointing.clean_stale(checkpoints)
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_0000005"]
    assert _tag(checkpointing.find_resume_checkpoint(checkpoints, "face")) == "new"


def test_a_resume_under_other_held_out_settings_measures_its_start_again(tmp_path, caplog):
    """Another held-out seed draws other samples: comparing with the old start row would show a change that
    is only the draw (or hide a breach of the face-loss bound)."""
    from trainer.logs import HeldoutReport

    def report(settings):
        return HeldoutReport(tmp_path, 1.5, True, settings)

    assert report({"heldout_seed": 1}).start(0, lambda: {"heldout_delta": 0.5, "heldout_face": 0.25}) == \
        {"heldout_delta": 0.5, "heldout_face": 0.25}

    def never():
        raise AssertionError("the stored start row applies: nothing to measure")

    assert report({"heldout_seed": 1}).start(4, never)["heldout_face"] == 0.25
    again = report({"heldout_seed": 99}).start(4, lambda: {"heldout_delta": 0.4, "heldout_face": 0.2})
    assert again["heldout_face"] == 0.2 and "held-out settings changed" in caplog.text
    assert (tmp_path / "heldout.csv").read_text().splitlines()[1].startswith("4,")  # the row says where it was measured
