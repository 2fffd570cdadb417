"""Reading weight files safely and loading them into modules with shape checks that explain themselves."""

from __future__ import annotations

import json
import logging
import pickle
import re
from pathlib import Path
from typing import Iterable, Optional

import torch
from safetensors.torch import load_file
from torch import nn

from .clip_text import ClipTextConfig, ClipTextTransformer
from .errors import CheckpointError, ModelFileMissingError, git_lfs_hint

logger = logging.getLogger(__name__)

WEIGHT_FILE_NAMES = ("model.safetensors", "pytorch_model.bin")
# Prefixes under which a CLIP text transformer's weights are stored by the tools users run.
CLIP_TEXT_PREFIXES = (
    "text_model.",  # transformers 4.x CLIPTextModel (Arc2Face encoder/, SD1.5 text_encoder/)
    "cond_stage_model.transformer.text_model.",  # SD1.5 single-file checkpoints
    "cond_stage_model.transformer.",
    "",  # transformers 5.x CLIPTextModel
)


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file, or of a torch file loaded with ``weights_only=True``."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileMissingError(f"weight file not found: {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes): an interrupted download? Download it again")
    try:
        if path.suffix.lower() == ".safetensors":
            return load_file(str(path))
        # weights_only=True: plain tensors only, a pickle cannot run code through this path.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt or truncated file: say which one
        reason = str(exc)
        if isinstance(exc, pickle.UnpicklingError):  # not torch's own text, which suggests weights_only=False
            wanted = re.search(r"GLOBAL ([\w.]+)", reason)
            if wanted:
                raise CheckpointError(f"{path} holds more than plain tensors, so it is not read (a pickle could run "
                                      f"code): it asks for {wanted.group(1)}") from exc
            reason = ("not a torch checkpoint" if git_lfs_hint(path) else "the safe loader cannot read its pickle (pickle "
                      "protocol 4 or later, or a damaged or foreign file): re-save its tensors as .safetensors")
        elif not git_lfs_hint(path) and not isinstance(exc, PermissionError):
            # torch's own words for a cut-off file are an empty EOFError or "Invalid argument"
            reason = f"truncated or corrupt ({reason or type(exc).__name__}): download it again"
        raise CheckpointError(f"cannot read weights from {path}: {reason}.{git_lfs_hint(path)}") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} does not hold a state dict")
    tensors = {key: value for key, value in state.items() if isinstance(value, torch.Tensor)}  # not a saved epoch count
    if not tensors:
        raise CheckpointError(f"{path} holds no tensors at its top level (keys: {', '.join(map(str, list(state)[:6]))})")
    return tensors


def strip_prefix(state: dict[str, torch.Tensor], prefixes: Iterable[str], probe: str) -> dict[str, torch.Tensor]:
    """Keeps the keys under the first prefix for which ``prefix + probe`` exists, without the prefix."""
    for prefix in prefixes:
        if prefix + probe in state:
            return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    raise CheckpointError(f"no '{probe}' weights found (looked under prefixes {list(prefixes)})")


def check_shapes(expected: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]], source: str) -> None:
    """Names every missing, unexpected or mis-shaped tensor of ``found`` against ``expected`` in one error."""
    problems = []
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing:
        problems.append(f"missing {len(missing)} tensors, e.g. {missing[:4]}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} tensors, e.g. {unexpected[:4]}")
    for key in sorted(set(found) & set(expected)):
        if tuple(found[key]) != tuple(expected[key]):
            problems.append(f"{key}: file has {tuple(found[key])}, model expects {tuple(expected[key])}")
    if problems:
        raise CheckpointError(f"{source} does not match the model: " + "; ".join(problems[:8]))


def state_shapes(state: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {key: tuple(value.shape) for key, value in state.items()}


def load_checked(module: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """``load_state_dict`` that names every missing, unexpected or mis-shaped tensor in one error."""
    check_shapes(state_shapes(module.state_dict()), state_shapes(state), source)
    module.load_state_dict(state)


def find_weight_file(folder: Path) -> Path:
    for name in WEIGHT_FILE_NAMES:
        if (folder / name).is_file():
            return folder / name
    raise ModelFileMissingError(
        f"{folder} has no weight file: expected one of {', '.join(WEIGHT_FILE_NAMES)} beside config.json"
    )


def read_clip_text_config(config_path: Path) -> ClipTextConfig:
    """A transformers CLIP text ``config.json``; a missing or malformed one is named."""
    try:
        values = json.loads(Path(config_path).read_text(encoding="utf-8"))
        if isinstance(values, dict) and values.get("_class_name"):  # a diffusers model, e.g. Arc2Face's arc2face/ UNet
            raise CheckpointError(f"{config_path} is the config of a diffusers {values['_class_name']}, not of a CLIP "
                                  "text encoder (for Arc2Face, give its encoder/ folder)")
        return ClipTextConfig.from_dict(values)
    except FileNotFoundError as exc:
        raise ModelFileMissingError(f"CLIP text config not found: {config_path}") from exc
    except CheckpointError:
        raise
    except (ValueError, TypeError) as exc:  # JSONDecodeError is a ValueError
        raise CheckpointError(f"{config_path} is not a valid CLIP text config.json: {exc}") from exc


def load_clip_text_folder(folder: Path, multipliers: Optional[list[int]] = None) -> ClipTextTransformer:
    """Loads a transformers ``CLIPTextModel`` folder (``config.json`` + weights) into our transformer."""
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ModelFileMissingError(
            f"CLIP text encoder folder {folder} is missing config.json (expected the transformers "
            "CLIPTextModel layout: config.json and model.safetensors or pytorch_model.bin)"
        )
    config = read_clip_text_config(config_path)
    state = read_state_dict(find_weight_file(folder))
    return clip_text_from_state_dict(state, config, str(folder), multipliers)


def clip_text_from_state_dict(
    state: dict[str, torch.Tensor],
    config: ClipTextConfig,
    source: str,
    multipliers: Optional[list[int]] = None,
) -> ClipTextTransformer:
    """Builds a transformer from weights stored under any of the usual prefixes."""
    state = strip_prefix(state, CLIP_TEXT_PREFIXES, "embeddings.token_embedding.weight")
    state = {k: v for k, v in state.items() if not k.endswith("position_ids")}
    model = ClipTextTransformer(config, multipliers)
    load_checked(model, state, source)
    logger.debug("loaded CLIP text transformer from %s", source)
    return model
