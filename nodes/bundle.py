"""The ADAFACE object: the loaded models, kept by ComfyUI's output cache between runs.

Anything cached across runs lives here (the SubjectEncoder's photo cache, the teacher UNet once
loaded), never on node instances. The torch modules go through ComfyUI's model management, so they
are moved to the GPU only while used and offloaded when other models need the memory.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import comfy.model_management as model_management
import comfy.sd

from ..adaface_core.errors import ModelFileMissingError
from ..adaface_core.face_analysis import IdentityResult
from ..adaface_core.pipeline import SubjectEncoder
from ..adaface_core.subject import SubjectEmbedding

logger = logging.getLogger(__name__)

TEACHER_UNET = Path("arc2face") / "diffusion_pytorch_model.safetensors"


@dataclass(eq=False)
class AdaFaceBundle:
    subjects: SubjectEncoder
    """Face analysis, Arc2Face encoder and inverter, with the photo cache."""
    patcher: Any
    """``ModelPatcher`` around the encoder and inverter modules."""
    arc2face_folder: Path
    """The Arc2Face model folder (``encoder/`` and ``arc2face/``)."""
    _teacher: Optional[Any] = field(default=None, repr=False)

    def load(self) -> None:
        """Puts the encoder and inverter on ComfyUI's compute device.

        Fully: these are plain torch modules, which a partial (low-VRAM) load would leave half on the
        offload device; ComfyUI loads its own CLIP the same way.
        """
        model_management.load_models_gpu([self.patcher], force_full_load=True)

    def encoder(self) -> SubjectEncoder:
        """The SubjectEncoder with its modules loaded on ComfyUI's compute device."""
        self.load()
        return self.subjects

    def encode_photos(
        self, photos: list, names: list[str], on_photo: Optional[Callable[[int, int], None]] = None
    ) -> tuple[SubjectEmbedding, IdentityResult]:
        """Subject and faces of the photos; the models are only loaded when the photos are new."""
        return self.subjects.encode_photos(photos, names, on_miss=self.load, on_photo=on_photo)

    def teacher_model(self) -> Any:
        """Arc2Face's UNet as a ComfyUI MODEL, loaded on first use (only the teacher sampler needs it)."""
        if self._teacher is None:
            path = self.arc2face_folder / TEACHER_UNET
            if not path.is_file():
                raise ModelFileMissingError(
                    f"the Arc2Face UNet is missing: put FoivosPar/Arc2Face's arc2face/ folder (config.json and "
                    f"diffusion_pytorch_model.safetensors) in {self.arc2face_folder}"
                )
            logger.info("loading the Arc2Face UNet from %s", path)
            self._teacher = comfy.sd.load_diffusion_model(str(path))
        return self._teacher
