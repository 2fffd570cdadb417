"""Subject tokens as a standard textual-inversion embedding file.

A ``[N, 768]`` tensor under both keys readers look for: ``clip_l`` (ComfyUI's SD1 embedding key)
and ``emb_params`` (the common A1111 / diffusers key). ``embedding:NAME`` in any ComfyUI prompt,
and diffusers' ``load_textual_inversion(load_file(path)["clip_l"], token=...)`` (the documented call for
multi-key files), then use the subject with no AdaFace node at all.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from safetensors import safe_open

from .checkpoint import atomic_save_safetensors
from .errors import CheckpointError, ConfigError

_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
MAX_NAME_LENGTH = 200
"""With its .safetensors ending and a temporary file's prefix and suffix, still under 255 bytes."""
WINDOWS_DEVICE_NAMES = frozenset({"CON", "PRN", "AUX", "NUL", *(f"{port}{n}" for port in ("COM", "LPT") for n in range(1, 10))})
"""Names Windows keeps for devices, whatever follows the first dot: ``nul.safetensors`` is no file there."""


PICKLE_SUFFIXES = (".pt", ".bin", ".ckpt", ".pth")
LOOKUP_SUFFIXES = (".safetensors", ".pt", ".bin")
"""What ComfyUI's ``embedding:NAME`` appends when no file is called NAME itself (``comfy/sd1_clip.load_embed``)."""


def embedding_file_name(name: str) -> str:
    """``NAME.safetensors``, refusing names that would escape the folder, confuse prompt parsing or name a
    Windows device (a workflow shared from Linux must not fail at the write on Windows)."""
    stem = name[: -len(".safetensors")] if name.lower().endswith(".safetensors") else name
    if stem.lower().endswith(PICKLE_SUFFIXES):
        raise ConfigError(f"embedding name {name!r} ends in {Path(stem).suffix}: embeddings are written as "
                          f"NAME.safetensors, so give the name without it ({Path(stem).stem!r})")
    if not _SAFE_NAME.match(stem):
        raise ConfigError(
            f"embedding name {name!r} may only use letters, digits, '_', '-' and '.', "
            "so that 'embedding:NAME' works in a prompt"
        )
    if len(stem) > MAX_NAME_LENGTH:
        raise ConfigError(f"embedding name {stem[:24]!r}... is {len(stem)} characters long; {MAX_NAME_LENGTH} at most "
                          "(file systems take names of up to 255 bytes)")
    if stem.split(".", 1)[0].upper() in WINDOWS_DEVICE_NAMES:
        raise ConfigError(f"embedding name {name!r} is a device name on Windows (CON, NUL, COM1 ...); choose another")
    return stem + ".safetensors"


def files_for_word(word: str, folders: Sequence[Path], subfolders: bool = True,
                   other_than: Optional[Path] = None) -> list[Path]:
    """Every file ComfyUI's ``embedding:WORD`` could load from ``folders``: in each folder (and, as ComfyUI
    walks them, every subfolder, in an order it leaves to chance) WORD itself, or WORD with one of
    ``LOOKUP_SUFFIXES``, each real file once, ``other_than`` (the file about to be written) left out. Any
    other means the prompt word could name either file."""
    found: dict[str, Path] = {}
    seen: set[str] = set()
    for root in folders:
        for folder, subfolder_names, _ in os.walk(root, followlinks=True):
            real = os.path.realpath(folder)
            if real in seen:  # a folder listed twice, or reached again through a link (a loop would never end)
                subfolder_names[:] = []
                continue
            seen.add(real)
            for candidate in (Path(folder) / (word + suffix) for suffix in ("", *LOOKUP_SUFFIXES)):
                if candidate.is_file():
                    found.setdefault(os.path.realpath(candidate), candidate)
            if not subfolders:
                break
    if other_than is not None:
        found.pop(os.path.realpath(other_than), None)
    return sorted(found.values())


def embedding_metadata(sources: Sequence[str], id_strength: float) -> dict[str, str]:
    """What an AdaFace embedding records of how it was made: its photos' names and the strength baked in."""
    return {"adaface_sources": json.dumps(list(sources)), "adaface_id_strength": str(id_strength)}


def save_textual_inversion(
    tokens: torch.Tensor,
    path: Union[str, Path],
    metadata: Optional[dict[str, str]] = None,
) -> Path:
    """Writes ``tokens`` (``[N, H]``, float) as an embedding file, atomically."""
    if tokens.ndim != 2:
        raise ConfigError(f"subject tokens must be [N, H], got {tuple(tokens.shape)}")
    vectors = tokens.detach().float().cpu().contiguous()
    if not torch.isfinite(vectors).all():
        raise ConfigError(f"the subject tokens are not all finite numbers (NaN or infinity); {Path(path).name} "
                          "would give black images, so it was not written")
    meta = {"adaface": json.dumps({"num_vectors": vectors.shape[0]})} | (metadata or {})
    return atomic_save_safetensors({"clip_l": vectors, "emb_params": vectors.clone()}, path, meta)


def holds_tokens(path: Union[str, Path], tokens: torch.Tensor) -> bool:
    """Whether the embedding file at ``path`` already holds exactly ``tokens`` (as ``save_textual_inversion``
    writes them): saving the same subject again is then no change, not a name clash."""
    try:
        return torch.equal(load_textual_inversion(path), tokens.detach().float().cpu())
    except CheckpointError:
        return False


def load_textual_inversion(path: Union[str, Path]) -> torch.Tensor:
    """Reads back the ``[N, H]`` vectors of an embedding file written by any common tool."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            keys = list(handle.keys())
            for key in ("clip_l", "emb_params", *keys):
                if key in keys:
                    return handle.get_tensor(key).clone()  # not a view of the mapped file, which Windows could not replace
    except Exception as exc:
        raise CheckpointError(f"cannot read embedding file {path}: {exc}") from exc
    raise CheckpointError(f"{path} holds no tensors")
