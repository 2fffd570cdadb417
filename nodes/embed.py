"""Face → ID Embedding: reference photos (an IMAGE batch, or a list of photos of any sizes) become one subject."""

from __future__ import annotations

import comfy.utils
import numpy as np
import torch

from ..adaface_core.image_io import to_rgb_uint8
from ..adaface_core.subject import SubjectEmbedding
from .bundle import AdaFaceBundle
from .types import ADAFACE, ADAFACE_SUBJECT, CATEGORY


def images_to_photos(images: list[torch.Tensor]) -> tuple[list[np.ndarray], list[str]]:
    """ComfyUI IMAGEs ``[B, H, W, C]`` floats in 0..1 (a list: each may have its own size) -> 8-bit RGB
    arrays named "image 1", "image 2", ... in order."""
    frames = [batch[i] for batch in images for i in range(batch.shape[0])]
    names = [f"image {i + 1}" for i in range(len(frames))]
    return [to_rgb_uint8(frame, name) for frame, name in zip(frames, names)], names


def crops_to_image(crops: list[np.ndarray]) -> torch.Tensor:
    """Aligned ``112x112x3`` uint8 RGB face crops -> an IMAGE batch."""
    return torch.from_numpy(np.stack(crops)).float() / 255.0


class AdaFaceFaceEmbed:
    DESCRIPTION = (
        "Finds the face in each reference photo and turns the person into AdaFace subject tokens. "
        "Several photos of one person (an image batch, or a list of photos of different sizes) are averaged "
        "into one subject; photos without a face are skipped and named in the report output (and the console). "
        "The same photos are only analysed once."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = (ADAFACE_SUBJECT, "IMAGE", "STRING")
    RETURN_NAMES = ("subject", "face_crops", "report")
    OUTPUT_TOOLTIPS = (
        "The person as subject tokens: connect to Inject Subject Tokens into CLIP conditioning, Save or Mix.",
        "The aligned face crop used from each photo (112x112), to check which face was picked.",
        "Which photos were used, and what to check: photos left out and why, small faces, a face unlike the "
        "others, a group photo's close call (link it to Preview Any to read it).",
    )
    FUNCTION = "embed"
    # A list of photos (RebatchImages, a load-images-from-folder node) is one person, not one run per photo;
    # and photos of different sizes come as a list, as Image Batch would crop and scale them to the first one's shape.
    INPUT_IS_LIST = True

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "adaface": (ADAFACE, {"tooltip": "The models from Load AdaFace."}),
                "image": ("IMAGE", {"tooltip": "One or more photos of the same person, all averaged: a batch, or a list for photos of different sizes (Image Batch crops and scales them to the first one's shape, which can cut a face off)."}),
            }
        }

    def embed(self, adaface: list[AdaFaceBundle], image: list[torch.Tensor]) -> tuple[SubjectEmbedding, torch.Tensor, str]:
        """``INPUT_IS_LIST``: every input is a list; one Load AdaFace gives a list of one."""
        photos, names = images_to_photos(image)
        # The server's progress hook stops the batch between photos when the artist presses Cancel.
        progress = comfy.utils.ProgressBar(len(photos))
        subject, identity = adaface[0].encode_photos(
            photos, names, on_photo=lambda done, total: progress.update_absolute(done, total)
        )
        return subject, crops_to_image([face.aligned for face in identity.faces]), identity.report()
