"""Stage builders: a name -> a function that turns (config, models, accelerator, output dir) into a ``Stage``.

Stage 1 (``face``) is built here. Stage 2 (``composition``) is looked up in
``trainer.stage_composition.build_stage`` (same signature) when it exists; ``register_stage`` lets
any module add or replace a stage.
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path
from typing import Callable, Optional

from adaface_core.errors import ConfigError

from .config import StageConfig, TrainConfig
from .data import load_face_images
from .face_space import FaceSpace
from .losses_face import FaceDistillationLoss, FaceStage
from .loop import Stage
from .models import Models

logger = logging.getLogger(__name__)

StageBuilder = Callable[[TrainConfig, StageConfig, Models, object, Path], Stage]
_BUILDERS: dict[str, StageBuilder] = {}


def register_stage(name: str, builder: StageBuilder) -> None:
    _BUILDERS[name] = builder


def vae_downsampling(models: Models) -> int:
    if models.vae is None:
        return 8
    return 2 ** (len(models.vae.config.block_out_channels) - 1)


def face_analyzer_factory(config: TrainConfig) -> Callable[[], object]:
    """Builds the face analyser on first need only (the trainer loads without face models)."""

    def factory():
        from adaface_core.face_analysis import FaceAnalyzer

        return FaceAnalyzer.from_folder(config.models.face_pack, provider=config.models.face_provider)

    return factory


def face_models_fingerprint(config: TrainConfig) -> str:
    """The face pack's models (``FacePackFiles.fingerprint``) and the way they are run
    (``ANALYSIS_REVISION``), recorded in the trainer's face caches."""
    from adaface_core.face_analysis import ANALYSIS_REVISION
    from adaface_core.face_pack import resolve_face_pack

    return f"{resolve_face_pack(config.models.face_pack).fingerprint}|analysis {ANALYSIS_REVISION}"


def build_face_space(config: TrainConfig, models: Models, accelerator, output: Path,
                     random_id_prob: Optional[float] = None) -> FaceSpace:
    """Real photos' IDs (process 0 computes and caches them first) and random IDs with ``random_id_prob``
    (default ``data.random_id_prob``)."""
    data = config.data
    images = None
    if data.root:
        if not config.models.face_pack:
            raise ConfigError("data.root is set but models.face_pack is not: the ArcFace vectors of the training "
                              "images need the face models (antelopev2 folder)")
        cache = Path(data.cache_file) if data.cache_file else output / "face_ids.safetensors"
        analyzer_factory = face_analyzer_factory(config)
        with accelerator.main_process_first():  # process 0 computes and caches; the others read the cache
            skipped = output / "no_face.txt" if accelerator.is_main_process else None
            images = load_face_images(Path(data.root), data.image_size, cache, analyzer_factory, skipped,
                                      face_models_fingerprint(config))
    else:
        logger.info("no data.root: training on random IDs only (the teacher makes its own images)")
    prob = data.random_id_prob if random_id_prob is None else random_id_prob
    return FaceSpace(images, models.id_dim, prob, data.id_noise_std, seed=config.run.seed,
                     photo_cache_bytes=int(data.photo_cache_gb * 2**30))


def build_face_stage(config: TrainConfig, stage_config: StageConfig, models: Models, accelerator, output: Path) -> Stage:
    face_space = build_face_space(config, models, accelerator, output)
    latent = config.data.image_size // vae_downsampling(models)
    return FaceStage(face_space, FaceDistillationLoss(stage_config.loss, latent))


register_stage("face", build_face_stage)


def get_stage_builder(name: str) -> StageBuilder:
    if name not in _BUILDERS and name == "composition":
        try:
            module = importlib.import_module("trainer.stage_composition")
        except ModuleNotFoundError as exc:
            if exc.name != "trainer.stage_composition":
                raise
            raise ConfigError("stage 2 (composition) is not available in this version of the trainer "
                              "(trainer/stage_composition.py with build_stage(...) is missing)") from exc
        register_stage("composition", module.build_stage)
    if name not in _BUILDERS:
        raise ConfigError(f"unknown training stage {name!r}; known: {', '.join(sorted(_BUILDERS))}")
    return _BUILDERS[name]
