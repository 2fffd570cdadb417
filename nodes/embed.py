"""Face → ID Embedding: reference photos (an IMAGE batch) become one subject."""

from __future__ import annotations

import logging

import comfy.utils
import numpy as np
import torch

from ..adaface_core.image_io import to_rgb_uint8
from ..adaface_core.subject import SubjectEmbedding
from .bundle import AdaFaceBundle
from .types import ADAFACE, ADAFACE_SUBJECT, CATEGORY

logger = logging.getLogger(__name__)


def image_batch_to_photos(image: torch.Tensor) -> tuple[list[np.ndarray], list[str]]:
    """ComfyUI IMAGE ``[B, H, W, C]`` floats in 0..1 -> 8-bit RGB arrays named "image 1", "image 2", ..."""
    names = [f"image {i + 1}" for i in range(image.shape[0])]
    return [to_rgb_uint8(image[i], name) for i, name in enumerate(names)], names


def crops_to_image(crops: list[np.ndarray]) -> torch.Tensor:
    """Aligned ``112x112x3`` uint8 RGB face crops -> an IMAGE batch."""
    return torch.from_numpy(np.stack(crops)).float() / 255.0


class AdaFaceFaceEmbed:
    DESCRIPTION = (
        "Finds the face in each reference photo and turns the person into AdaFace subject tokens. "
        "Several photos of one person (an image batch) are averaged; photos without a face are skipped "
        "with a warning. The same photos are only analysed once."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = (ADAFACE_SUBJECT, "IMAGE")
    RETURN_NAMES = ("subject", "face_crops")
    OUTPUT_TOOLTIPS = (
        "The person as subject tokens: connect to Inject Subject Tokens into CLIP conditioning, Save or Mix.",
        "The aligned face crop used from each photo (112x112), to check which face was picked.",
    )
    FUNCTION = "embed"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "adaface": (ADAFACE, {"tooltip": "The models from Load AdaFace."}),
                "image": ("IMAGE", {"tooltip": "One or more photos of the same person (a batch is averaged)."}),
            }
        }

    def embed(self, adaface: AdaFaceBundle, image: torch.Tensor) -> tuple[SubjectEmbedding, torch.Tensor]:
        photos, names = image_batch_to_photos(image)
        # The server's progress hook stops the batch between photos when the artist presses Cancel.
        progress = comfy.utils.ProgressBar(len(photos))
        subject, identity = adaface.encode_photos(
            photos, names, on_photo=lambda done, total: progress.update_absolute(done, total)
        )
        if identity.skipped_names:
            logger.warning(
                "Face → ID Embedding: no face in %s, so %s left out; the subject comes from %s",
                ", ".join(identity.skipped_names),
                "it was" if len(identity.skipped_names) == 1 else "they were",
                ", ".join(identity.used_names),
            )
        return subject, crops_to_image([face.aligned for face in identity.faces])
