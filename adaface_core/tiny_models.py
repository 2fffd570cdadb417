"""Tiny random models written in exactly the on-disk layouts users download.

Tests and the trainer's smoke preset load these through the same code that loads the real
models, so a layout or loading bug shows up without multi-GB downloads. The vocabulary is CLIP's
real one (from the ``open_clip_torch`` package), so token ids match the real tokenizer; only the
widths and depths are small. Nothing here is meaningful as a model: it proves the machinery.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import torch
from safetensors.torch import save_file

from .checkpoint import save_inverter
from .clip_text import ClipTextConfig, ClipTextTransformer
from .inverter import InverterConfig, PromptInverter
from .tokenizer import packaged_clip_bpe, write_tokenizer_from_bpe

# SD1.5's noise schedule (diffusers scheduler_config.json of runwayml/stable-diffusion-v1-5).
SD15_SCHEDULER = {
    "_class_name": "PNDMScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "clip_sample": False,
}


@dataclass(frozen=True)
class TinySpec:
    """Sizes of the tiny models. ``hidden_size`` is shared by all three text encoders (as 768 is)."""

    hidden_size: int = 64
    num_layers: int = 3
    num_heads: int = 4
    unet_channels: tuple[int, ...] = (32, 32, 64, 64)
    seed: int = 0

    def clip_config(self) -> ClipTextConfig:
        return ClipTextConfig(
            hidden_size=self.hidden_size,
            intermediate_size=self.hidden_size * 4,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
        )


def write_tokenizer(folder: Union[str, Path]) -> Path:
    """``vocab.json`` + ``merges.txt`` of the real CLIP vocabulary (an SD1.5 ``tokenizer/`` folder)."""
    return write_tokenizer_from_bpe(packaged_clip_bpe(), Path(folder))


def random_clip_text(spec: TinySpec, seed_offset: int = 0) -> ClipTextTransformer:
    torch.manual_seed(spec.seed + seed_offset)
    model = ClipTextTransformer(spec.clip_config())
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim >= 2:
                param.normal_(0.0, 0.02 if "embedding" in name else param.shape[1] ** -0.5)
    return model


def write_clip_text_folder(model: ClipTextTransformer, folder: Union[str, Path], weights_name: str = "model.safetensors") -> Path:
    """A transformers-4 style ``CLIPTextModel`` folder: ``config.json`` + ``text_model.*`` weights, as
    ``model.safetensors`` or, as ``save_pretrained(safe_serialization=False)`` writes it, ``pytorch_model.bin``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(model.config.to_hf_json(), encoding="utf-8")
    tensors = {f"text_model.{k}": v.contiguous() for k, v in model.state_dict().items()}
    if weights_name.endswith(".safetensors"):
        save_file(tensors, str(folder / weights_name), metadata={"format": "pt"})
    else:
        torch.save(tensors, folder / weights_name)
    return folder


def unet_config(spec: TinySpec) -> dict:
    """An SD1.5-shaped ``UNet2DConditionModel`` config with small widths."""
    n = len(spec.unet_channels)
    return {
        "sample_size": 8,
        "in_channels": 4,
        "out_channels": 4,
        "block_out_channels": list(spec.unet_channels),
        "down_block_types": ["CrossAttnDownBlock2D"] * (n - 1) + ["DownBlock2D"],
        "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * (n - 1),
        "layers_per_block": 1,
        "cross_attention_dim": spec.hidden_size,
        "attention_head_dim": 8,
        "norm_num_groups": 16,
    }


def write_unet_folder(spec: TinySpec, folder: Union[str, Path], seed_offset: int = 0) -> Path:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(spec.seed + seed_offset)
    UNet2DConditionModel(**unet_config(spec)).save_pretrained(str(folder))
    return Path(folder)


def write_vae_folder(spec: TinySpec, folder: Union[str, Path]) -> Path:
    from diffusers import AutoencoderKL

    torch.manual_seed(spec.seed + 7)
    AutoencoderKL(
        block_out_channels=[16, 32, 32, 32],
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=64,
    ).save_pretrained(str(folder))
    return Path(folder)


def write_sd15_folder(spec: TinySpec, root: Union[str, Path]) -> Path:
    """A diffusers SD1.5 folder: ``unet/``, ``text_encoder/``, ``tokenizer/``, ``vae/``, ``scheduler/``."""
    root = Path(root)
    write_tokenizer(root / "tokenizer")
    write_clip_text_folder(random_clip_text(spec, seed_offset=1), root / "text_encoder")
    write_unet_folder(spec, root / "unet", seed_offset=2)
    write_vae_folder(spec, root / "vae")
    (root / "scheduler").mkdir(parents=True, exist_ok=True)
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(SD15_SCHEDULER, indent=2), encoding="utf-8")
    model_index = {
        "_class_name": "StableDiffusionPipeline",
        "scheduler": ["diffusers", "PNDMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (root / "model_index.json").write_text(json.dumps(model_index, indent=2), encoding="utf-8")
    return root


def write_arc2face_folder(spec: TinySpec, root: Union[str, Path], with_unet: bool = True) -> Path:
    """FoivosPar/Arc2Face's layout: ``encoder/`` (CLIPTextModel, ``pytorch_model.bin`` as published) and
    ``arc2face/`` (UNet, ``diffusion_pytorch_model.safetensors``)."""
    root = Path(root)
    write_clip_text_folder(random_clip_text(spec, seed_offset=3), root / "encoder", "pytorch_model.bin")
    if with_unet:
        write_unet_folder(spec, root / "arc2face", seed_offset=4)
    return root


def write_inverter_file(spec: TinySpec, path: Union[str, Path], num_tokens: int = 16) -> Path:
    """An untrained inverter initialised from a tiny CLIP, as a checkpoint file."""
    clip = random_clip_text(spec, seed_offset=1)
    config = InverterConfig(clip=clip.config, num_tokens=num_tokens, attention_multipliers=[1] * spec.num_layers)
    return save_inverter(PromptInverter.from_clip(clip, config), path)
