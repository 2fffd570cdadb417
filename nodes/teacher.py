"""Arc2Face Teacher Sampler: what Arc2Face itself draws for a subject's ArcFace vector.

The teacher is the model AdaFace was distilled from; comparing its faces with an SD1.5 render
through the subject tokens shows whether a weak likeness comes from the photo or from the prompt.
Sampling goes through ComfyUI's own sampler, so previews, interrupts and the progress bar work.
"""

from __future__ import annotations

import comfy.model_management as model_management
import comfy.sample
import comfy.utils
import latent_preview
import torch

from ..adaface_core.subject import SubjectEmbedding
from .bundle import AdaFaceBundle
from .types import ADAFACE, ADAFACE_SUBJECT, CATEGORY

# Arc2Face samples with diffusers' DPMSolverMultistepScheduler (DPM-Solver++ 2M, timesteps evenly
# spaced from 999): in ComfyUI that is the dpmpp_2m sampler with the sgm_uniform scheduler.
SAMPLER = "dpmpp_2m"
SCHEDULER = "sgm_uniform"
LATENT_CHANNELS = 4


def teacher_conditioning(bundle: AdaFaceBundle, subject: SubjectEmbedding) -> tuple[list, list]:
    """Arc2Face's positive (the ID prompt) and negative (its empty prompt) as CONDITIONING."""
    encoder = bundle.encoder().encoder
    parameter = next(encoder.parameters())
    with torch.inference_mode():
        positive = encoder(subject.id_vector.reshape(1, -1).to(parameter.device, parameter.dtype)).prompt_embeds
        negative = encoder.empty_prompt_embeds()
    device = model_management.intermediate_device()
    return [[positive.float().to(device), {}]], [[negative.float().to(device), {}]]


class AdaFaceTeacherSampler:
    DESCRIPTION = (
        "Draws the subject with the Arc2Face model (the teacher AdaFace learned from), from the ArcFace "
        "vector alone. Decode the latent with an SD1.5 VAE. Needs the arc2face/ UNet folder."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("latent",)
    OUTPUT_TOOLTIPS = ("Arc2Face's images of the subject as SD1.5 latents (decode with VAE Decode).",)
    FUNCTION = "sample"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "adaface": (ADAFACE, {"tooltip": "The models from Load AdaFace (its Arc2Face folder must hold arc2face/)."}),
                "subject": (ADAFACE_SUBJECT, {"tooltip": "The person to draw."}),
                "seed": (
                    "INT",
                    {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": True, "tooltip": "Noise seed; the same seed gives the same images."},
                ),
                "steps": ("INT", {"default": 25, "min": 1, "max": 200, "tooltip": "Sampling steps (Arc2Face uses 25)."}),
                "cfg": ("FLOAT", {"default": 3.0, "min": 0.0, "max": 30.0, "step": 0.1, "tooltip": "Guidance scale (Arc2Face uses 3)."}),
                "width": ("INT", {"default": 512, "min": 64, "max": 2048, "step": 8, "tooltip": "Image width in pixels (Arc2Face was trained at 512)."}),
                "height": ("INT", {"default": 512, "min": 64, "max": 2048, "step": 8, "tooltip": "Image height in pixels."}),
                "batch_size": ("INT", {"default": 1, "min": 1, "max": 64, "tooltip": "How many images to draw."}),
            }
        }

    def sample(
        self,
        adaface: AdaFaceBundle,
        subject: SubjectEmbedding,
        seed: int,
        steps: int,
        cfg: float,
        width: int,
        height: int,
        batch_size: int,
    ) -> tuple[dict]:
        model_management.throw_exception_if_processing_interrupted()
        model = adaface.teacher_model()
        positive, negative = teacher_conditioning(adaface, subject)
        latent = torch.zeros([batch_size, LATENT_CHANNELS, height // 8, width // 8], device=model_management.intermediate_device())
        noise = comfy.sample.prepare_noise(latent, seed)
        # KSampler's own callback: progress bar and previews; the server's progress hook raises on interrupt.
        callback = latent_preview.prepare_callback(model, steps)
        samples = comfy.sample.sample(
            model, noise, steps, cfg, SAMPLER, SCHEDULER, positive, negative, latent,
            denoise=1.0, callback=callback, disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed,
        )
        return ({"samples": samples},)
