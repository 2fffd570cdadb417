"""Face photos -> an AdaFace subject -> a textual-inversion embedding file, from the command line.

    python -m adaface_core.embed PHOTO [PHOTO|FOLDER ...] --inverter FILE --arc2face DIR
        --face-models DIR [--tokenizer DIR] --out FILE

The written file works as ``embedding:NAME`` in any ComfyUI prompt and with diffusers'
``load_textual_inversion``: the subject is usable with no AdaFace node at all.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import torch

from .checkpoint import check_writable_destination
from .cli import run_cli, user_path
from .devices import chosen_device, inference_dtype
from .errors import ConfigError, ModelFileMissingError
from .face_analysis import FaceAnalyzer
from .face_pack import PROVIDERS
from .image_io import PHOTO_SUFFIXES, warn_unread_photos
from .pipeline import SubjectEncoder
from .textual_inversion import embedding_file_name, embedding_metadata, files_for_word, save_textual_inversion
from .tokenizer import find_tokenizer_folder

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EmbedResult:
    path: Path
    num_tokens: int
    used: tuple[str, ...]
    skipped: tuple[str, ...]


def collect_photos(inputs: Sequence[Path]) -> list[Path]:
    """Files as given, folders expanded to their images (sorted, not recursive; hidden files such as the
    ``._name.jpg`` that macOS leaves on zips and USB sticks are not photos)."""
    photos: list[Path] = []
    for item in inputs:
        if item.is_dir():
            visible = sorted(p for p in item.iterdir() if not p.name.startswith("."))
            photos += [p for p in visible if p.suffix.lower() in PHOTO_SUFFIXES]
            warn_unread_photos(item, visible)
        elif item.is_file():
            photos.append(item)
        else:
            raise ModelFileMissingError(f"photo not found: {item}")
    if not photos:
        raise ConfigError(f"no photos ({', '.join(PHOTO_SUFFIXES)}) in {', '.join(map(str, inputs))}")
    return photos


def check_output_file(out: Union[str, Path]) -> Path:
    """``out`` as the ``NAME.safetensors`` to write, or an error when it names a folder (one that exists, or one
    with a trailing slash), a path through a file, or a folder that takes no new file."""
    text = str(out)
    path = Path(text).expanduser()
    if path.is_dir() or text.endswith(("/", os.sep)):
        raise ConfigError(f"--out {text} is a folder: give the file to write in it, e.g. {path / 'alice.safetensors'}")
    path = path.with_name(embedding_file_name(path.name))
    check_writable_destination(path)
    return path


def resolve_tokenizer(tokenizer: Optional[Path], arc2face: Path) -> Path:
    """The given folder, else a ``tokenizer/`` beside or inside the Arc2Face download."""
    if tokenizer is not None:
        return find_tokenizer_folder(tokenizer)
    for candidate in (arc2face, arc2face.parent):
        try:
            return find_tokenizer_folder(candidate)
        except ModelFileMissingError:
            continue
    raise ModelFileMissingError(
        f"no CLIP tokenizer found next to {arc2face}: pass --tokenizer with an SD1.5 folder "
        "(or its tokenizer/ folder, or ComfyUI's comfy/sd1_tokenizer)"
    )


def embed_photos(
    photos: Sequence[Path],
    inverter: Path,
    arc2face: Path,
    face_models: Path,
    out: Union[str, Path],
    tokenizer: Optional[Path] = None,
    id_strength: float = 1.0,
    provider: str = "auto",
    device: Optional[str] = None,
    overwrite: bool = False,
) -> EmbedResult:
    """Encodes one identity from ``photos`` and writes it to ``out`` (``NAME.safetensors``).

    Everything about ``out`` is checked before any model loads: a folder, a file in the way of its folder,
    a folder that takes no new file, a name ``embedding:NAME`` would share with another file beside it, an
    existing file."""
    if not math.isfinite(id_strength) or not 0.0 <= id_strength <= 2.0:
        raise ConfigError(f"--id-strength must be a number from 0 to 2 (1 as trained), got {id_strength}")
    out = check_output_file(out)
    others = files_for_word(out.stem, [out.parent], subfolders=False, other_than=out)
    if others:
        raise ConfigError(f"embedding:{out.stem} would also name {', '.join(map(str, others))}, which ComfyUI may "
                          "load instead: choose another name")
    if out.exists() and not overwrite:
        raise ConfigError(f"{out} already exists; choose another name or pass --overwrite")
    files = collect_photos(photos)
    torch_device = chosen_device(device)
    encoder = SubjectEncoder.from_paths(
        inverter,
        arc2face,
        resolve_tokenizer(tokenizer, arc2face),
        faces=FaceAnalyzer.from_folder(face_models, provider=provider),
        device=torch_device,
        dtype=inference_dtype(torch_device),
    )
    subject, identity = encoder.encode_photos([str(p) for p in files], [p.name for p in files])
    written = save_textual_inversion(subject.scaled_tokens(id_strength), out, embedding_metadata(subject.sources, id_strength))
    logger.info("wrote %s (%d tokens from %d photo(s))", written, subject.num_tokens, len(identity.faces))
    return EmbedResult(written, subject.num_tokens, subject.sources, tuple(identity.skipped_names))


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m adaface_core.embed", description=__doc__.split("\n\n")[0])
    parser.add_argument("photos", nargs="+", type=user_path, help="photos of one person, or folders of them")
    parser.add_argument("--inverter", type=user_path, required=True, help="AdaFace prompt-inverter .safetensors")
    parser.add_argument("--arc2face", type=user_path, required=True, help="Arc2Face 'encoder' folder (or the folder holding it)")
    parser.add_argument("--face-models", type=user_path, required=True, help="insightface pack folder, e.g. models/antelopev2")
    parser.add_argument("--tokenizer", type=user_path, help="SD1.5 tokenizer folder (default: next to --arc2face)")
    parser.add_argument("--out", required=True, help="output NAME.safetensors (e.g. ComfyUI/models/embeddings/alice.safetensors)")
    parser.add_argument("--id-strength", type=float, default=1.0, help="ID guidance baked into the tokens (default 1)")
    parser.add_argument("--provider", default="auto", choices=("auto", *PROVIDERS))
    parser.add_argument("--device", help="torch device (default: CUDA, then MPS, then CPU)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing file")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """CLI entry point: 0 on success, 2 with a one-line error otherwise."""
    args = parse_args(argv)

    def action() -> None:
        result = embed_photos(
            args.photos, args.inverter, args.arc2face, args.face_models, args.out, args.tokenizer,
            args.id_strength, args.provider, args.device, args.overwrite,
        )
        # The CLI's result, for scripts to read.
        summary = {"embedding": str(result.path), "prompt_word": f"embedding:{result.path.stem}",
                   "used": list(result.used), "skipped": list(result.skipped)}
        sys.stdout.write(json.dumps(summary) + "\n")

    return run_cli(action, "embedding", args.verbose)


if __name__ == "__main__":
    sys.exit(main())
