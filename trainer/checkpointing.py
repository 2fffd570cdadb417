"""Training checkpoints that are atomic, resumable bit for bit, and loadable by the ComfyUI node.

``<stage_dir>/checkpoints/step_0001000/`` holds
- ``inverter.safetensors``: the core's format (``adaface_core.checkpoint.save_inverter``), so the
  Load AdaFace node and ``load_inverter`` read it directly; it carries the expansion history;
- ``trainer_state.pt``: optimizer, LR scheduler, step, expansion / plateau state and RNG states,
  all plain tensors, numbers, strings, lists and dicts, written with ``torch.save`` and read back
  only with ``torch.load(weights_only=True)``;
- ``rng_rank<r>.pt``: each process's RNG states (same rules).
A checkpoint is written into ``.tmp-step_…`` (files fsynced) and renamed into place as a whole, so a
crash leaves either the complete folder or none (a stale temporary folder is deleted on the next start).
Re-saving a step that already has a checkpoint (a resume at ``max_steps``) first moves the old folder
to ``.old-step_…`` and deletes it only once the new one is in place: there is never a moment without a
complete checkpoint. A crash in between leaves the old copy, which is still listed and which the next
start renames back.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch

from adaface_core.checkpoint import fsync_dir, fsync_file, load_inverter, save_inverter, save_torch_file
from adaface_core.errors import CheckpointError, WriteError
from adaface_core.inverter import PromptInverter

logger = logging.getLogger(__name__)

STEP_DIR = re.compile(r"^step_(\d{7,})$")
ASIDE_PREFIX = ".old-"
ASIDE_DIR = re.compile(r"^\.old-step_(\d{7,})$")
INVERTER_FILE = "inverter.safetensors"
STATE_FILE = "trainer_state.pt"
STATE_FORMAT = "adaface-trainer-state"
STAGE_FOLDERS = ("face", "composition")
"""The stage folders of a run's output folder, named after the stages."""


def rng_state(generator: Optional[torch.Generator] = None) -> dict[str, Any]:
    """Every RNG a step may touch, as weights_only-loadable values."""
    py = random.getstate()
    np_state = np.random.get_state()
    state = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gauss": float(np_state[4])},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    if generator is not None:
        state["generator"] = generator.get_state()
    return state


def set_rng_state(state: dict[str, Any], generator: Optional[torch.Generator] = None) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gauss"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if generator is not None and "generator" in state:
        generator.set_state(state["generator"])


def step_dir_name(step: int) -> str:
    return f"step_{step:07d}"


def _complete(folder: Path) -> bool:
    return (folder / INVERTER_FILE).is_file() and (folder / STATE_FILE).is_file()


def list_checkpoints(checkpoints_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (both files present), oldest first; a step whose folder is missing but whose
    old copy was moved aside by an interrupted re-save is listed with that copy."""
    found: dict[int, Path] = {}
    if checkpoints_dir.is_dir():
        for child in sorted(checkpoints_dir.iterdir(), key=lambda c: c.name.startswith(".")):  # step_* before .old-*
            match = STEP_DIR.match(child.name) or ASIDE_DIR.match(child.name)
            if match and _complete(child):
                found.setdefault(int(match.group(1)), child)
    return sorted(found.items())


def clean_stale(checkpoints_dir: Path) -> None:
    """Repairs what a crash during a save left (ours only): a ``.tmp-step_*`` folder is deleted; an
    ``.old-step_*`` copy is renamed back when its step has no complete folder, else deleted."""
    if not checkpoints_dir.is_dir():
        return
    for child in list(checkpoints_dir.iterdir()):
        if not child.is_dir():
            continue
        if ASIDE_DIR.match(child.name):
            _settle_aside(child, checkpoints_dir / child.name[len(ASIDE_PREFIX):])
        elif child.name.startswith(".tmp-step_"):
            logger.warning("removing an incomplete checkpoint left by an interrupted run: %s", child)
            shutil.rmtree(child, ignore_errors=True)


def _settle_aside(aside: Path, final: Path) -> None:
    if _complete(final) or not _complete(aside):
        shutil.rmtree(aside, ignore_errors=True)
        return
    logger.warning("an interrupted re-save left %s without its checkpoint: restoring the previous copy", final.name)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(aside, final)


def checkpoint_step(step_dir: Path) -> int:
    """The step a ``step_*`` (or moved-aside ``.old-step_*``) folder holds."""
    match = STEP_DIR.match(step_dir.name) or ASIDE_DIR.match(step_dir.name)
    if match is None:
        raise CheckpointError(f"{step_dir} is not a checkpoint folder (step_<number>)")
    return int(match.group(1))


def checkpoints_after(checkpoints_dir: Path, step: int) -> list[Path]:
    """Every checkpoint folder of ``checkpoints_dir`` past ``step``, moved-aside copies included, latest first."""
    found = []
    if checkpoints_dir.is_dir():
        for child in checkpoints_dir.iterdir():
            match = STEP_DIR.match(child.name) or ASIDE_DIR.match(child.name)
            if match and child.is_dir() and int(match.group(1)) > step:
                found.append((int(match.group(1)), child))
    return [path for _, path in sorted(found, key=lambda item: (-item[0], item[1].name))]


def find_resume_checkpoint(path: Union[str, Path], stage: str) -> Optional[Path]:
    """``path`` may be a run's output folder, a stage folder, its ``checkpoints/`` folder or one ``step_*`` folder.

    A folder of the run's other stage stands for its run: the latest checkpoint of ``stage`` there. Why:
    ``--stage both --resume <out>/composition/checkpoints/step_N`` must branch stage 2 at step N, not hand
    stage 1 a stage-2 checkpoint (which started stage 1 over). A stage-1 ``step_N`` older than stage 1's
    latest gives stage 2 nothing: its checkpoints grew from the stage-1 branch being left.
    """
    path = Path(path)
    if STEP_DIR.match(path.name) and (path / STATE_FILE).is_file():
        chosen, stage_dir = path, path.parent.parent
    else:
        for candidate in (path / stage / "checkpoints", path / "checkpoints", path):
            chosen, stage_dir = _latest(candidate), candidate.parent
            if chosen is not None:
                break
    if chosen is None or stage_dir.name not in STAGE_FOLDERS or stage_dir.name == stage:
        return chosen
    if stage == STAGE_FOLDERS[1] and chosen != _latest(stage_dir / "checkpoints"):
        return None
    return _latest(stage_dir.parent / stage / "checkpoints")


def _latest(checkpoints_dir: Path) -> Optional[Path]:
    found = list_checkpoints(checkpoints_dir)
    return found[-1][1] if found else None


@dataclass
class LoadedState:
    inverter: PromptInverter
    state: dict[str, Any]
    rng: Optional[dict[str, Any]]
    path: Path


def save_checkpoint(
    checkpoints_dir: Path,
    step: int,
    inverter: PromptInverter,
    state: dict[str, Any],
    accelerator,
    generator: torch.Generator,
    keep_last: int,
    metadata: Optional[dict[str, str]] = None,
) -> Path:
    """Collective: every process calls it (each stores its own RNG states); process 0 writes the rest."""
    final = checkpoints_dir / step_dir_name(step)
    tmp = checkpoints_dir / f".tmp-{step_dir_name(step)}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    try:
        save_torch_file(rng_state(generator), tmp / f"rng_rank{accelerator.process_index}.pt")
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            meta = {"step": str(step)}
            meta.update(metadata or {})
            save_inverter(inverter, tmp / INVERTER_FILE, meta)
            save_torch_file(dict(state, format=STATE_FORMAT, step=step), tmp / STATE_FILE)
    except WriteError:
        shutil.rmtree(tmp, ignore_errors=True)  # the earlier checkpoints stay; the partial one's space is freed
        raise
    if accelerator.is_main_process:
        _fsync_tree(tmp)
        _move_into_place(tmp, final)
        for _, old in list_checkpoints(checkpoints_dir)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
        logger.debug("checkpoint written: %s", final)
    accelerator.wait_for_everyone()
    return final


def _move_into_place(tmp: Path, final: Path) -> None:
    """Renames the complete ``tmp`` to ``final``; an existing ``final`` is moved aside first and deleted
    only after, so a kill at any point leaves a complete checkpoint of this step (see ``clean_stale``)."""
    aside = final.with_name(ASIDE_PREFIX + final.name)
    if final.exists():
        shutil.rmtree(aside, ignore_errors=True)  # a leftover whose step has a folder again
        os.replace(final, aside)
        fsync_dir(final.parent)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    shutil.rmtree(aside, ignore_errors=True)


def _fsync_tree(folder: Path) -> None:
    """Puts the files on disk before the rename publishes them (else a power cut can publish empty files)."""
    for child in folder.iterdir():
        if child.is_file():
            fsync_file(child)
    fsync_dir(folder)


def _read_plain(path: Path, what: str) -> Any:
    """A ``torch.save`` file of plain values; a damaged one is a ``CheckpointError`` naming it (torch's own
    words for a cut-off file are an empty EOFError or "Invalid argument")."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"cannot read the {what} {path}: {str(exc) or type(exc).__name__}; resume from another "
                              "checkpoint (--resume its step_N folder)") from exc


def load_checkpoint(step_dir: Path, process_index: int = 0) -> LoadedState:
    """Reads a checkpoint written by ``save_checkpoint`` (tensors and plain values only)."""
    step_dir = Path(step_dir)
    inverter = load_inverter(step_dir / INVERTER_FILE).train()
    state = _read_plain(step_dir / STATE_FILE, "trainer state")
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise CheckpointError(f"{step_dir / STATE_FILE} is not an AdaFace trainer state")
    rng_file = step_dir / f"rng_rank{process_index}.pt"
    rng = _read_plain(rng_file, "RNG state") if rng_file.is_file() else None
    if rng is None:
        logger.warning("%s has no RNG state for process %d: the data order will differ from an uninterrupted run",
                       step_dir, process_index)
    return LoadedState(inverter, state, rng, step_dir)


def config_json(values: dict) -> str:
    return json.dumps(values, sort_keys=True)
