"""Model assembly: frozen teacher (Arc2Face UNet + encoder), frozen student body (SD1.5 text encoder + UNet),
the VAE and DDPM schedule, and the one trainable module, the prompt inverter."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Optional

import torch

from adaface_core.arc2face import Arc2FaceEncoder
from adaface_core.checkpoint import load_inverter
from adaface_core.clip_text import ClipTextTransformer
from adaface_core.devices import host_to_device
from adaface_core.errors import ConfigError, ModelFileMissingError
from adaface_core.injection import splice_subject_embeds
from adaface_core.inverter import InverterConfig, PromptInverter
from adaface_core.tokenizer import load_clip_tokenizer, single_token_id
from adaface_core.weights import load_clip_text_folder

from . import single_file
from .config import TrainConfig

logger = logging.getLogger(__name__)


@dataclass
class Models:
    tokenizer: Any
    text_encoder: ClipTextTransformer
    unet: torch.nn.Module
    vae: Optional[torch.nn.Module]
    scheduler: Any
    teacher_unet: Optional[torch.nn.Module]
    id_encoder: Arc2FaceEncoder
    inverter: PromptInverter
    device: torch.device
    frozen_dtype: torch.dtype

    @property
    def num_train_timesteps(self) -> int:
        return int(self.scheduler.config.num_train_timesteps)

    @property
    def id_dim(self) -> int:
        return min(512, self.id_encoder.hidden_size)

    def prompt_ids(self, prompts: list[str]) -> torch.Tensor:
        """``[B, 77]`` token ids, on the host (reading them costs no device sync)."""
        encoded = self.tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        return encoded["input_ids"]

    def placeholder_id(self, word: str) -> int:
        return placeholder_token_id(self.tokenizer, word)

    def encode_with_subject(self, prompts: list[str], placeholder: str, subject: torch.Tensor) -> torch.Tensor:
        """``[B, 77, H]`` SD1.5 prompt embeddings with ``subject`` ``[B, N, H]`` spliced in at the placeholder."""
        ids = self.prompt_ids(prompts)
        embeds = self.text_encoder.token_embeds(host_to_device(ids, self.device))
        spliced = splice_subject_embeds(ids, embeds, self.placeholder_id(placeholder), subject.to(embeds.dtype))
        return self.text_encoder(token_embeds=spliced).last_hidden_state

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        return self.text_encoder(input_ids=host_to_device(self.prompt_ids(prompts), self.device)).last_hidden_state

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """``[B, 3, S, S]`` in [-1, 1] -> scaled VAE latents (the mean of the posterior: deterministic)."""
        if self.vae is None:
            raise ConfigError("no VAE was loaded")
        return vae_latents(self.vae, pixels, self.device)


@torch.no_grad()
def vae_latents(vae: torch.nn.Module, pixels: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``[B, 3, S, S]`` in [-1, 1] -> the posterior mean times the VAE's scaling factor, float32 on ``device``."""
    latents = vae.encode(pixels.to(device, vae.dtype)).latent_dist.mean
    return latents.float() * float(vae.config.scaling_factor)


def _load_unet(folder: Path, what: str, dtype: torch.dtype = torch.float32):
    from diffusers import UNet2DConditionModel

    if not (folder / "config.json").is_file():
        raise ModelFileMissingError(f"{what} UNet folder not found: {folder} (expected config.json and weights)")
    return UNet2DConditionModel.from_pretrained(str(folder), local_files_only=True, torch_dtype=dtype)


def frozen_dtype_for(config: TrainConfig, device: torch.device) -> torch.dtype:
    """bf16 for the frozen models under bf16 mixed precision on CUDA (half the memory, same autocast math);
    float32 otherwise (CPU bf16 is slow and only the tests run there)."""
    return torch.bfloat16 if config.run.mixed_precision == "bf16" and device.type == "cuda" else torch.float32


def _frozen(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    if next(module.parameters()).dtype != dtype:
        module = module.to(dtype)
    return module.to(device).eval().requires_grad_(False)


def build_inverter(config: TrainConfig, text_encoder: ClipTextTransformer) -> PromptInverter:
    if config.models.init_inverter:
        inverter = load_inverter(config.models.init_inverter)
        logger.info("inverter initialised from %s", config.models.init_inverter)
    else:
        clip_cfg = text_encoder.config
        inv_cfg = InverterConfig(clip=clip_cfg, attention_multipliers=[1] * clip_cfg.num_hidden_layers)
        inverter = PromptInverter.from_clip(text_encoder, inv_cfg)
        logger.info("fresh inverter initialised from the SD1.5 text encoder (OpenAI CLIP-L weights)")
        if config.stage == "composition":
            logger.warning("stage 2 alone, with no models.init_inverter: it starts from an untrained inverter "
                           "(unless --resume finds a stage-2 checkpoint); point init_inverter at stage 1's "
                           "adaface_inverter.safetensors, or run --stage both")
    inverter.freeze_embeddings()
    return inverter.float().train()


class Sd15Parts(NamedTuple):
    """The student body and what goes with it, whichever layout SD1.5 came in."""

    tokenizer: Any
    text_encoder: ClipTextTransformer
    unet: torch.nn.Module
    vae: Optional[torch.nn.Module]
    scheduler: Any


def placeholder_token_id(tokenizer: Any, word: str) -> int:
    """The one CLIP token of the placeholder the subject tokens replace; a word of several is refused."""
    ids = single_token_id(tokenizer, word)
    if len(ids) != 1:
        raise ConfigError(f"the placeholder {word!r} is {len(ids)} tokens; pick a word that is one CLIP token (e.g. 'z')")
    return ids[0]


def tokenizer_folder(config: TrainConfig) -> Path:
    """Where the SD1.5 CLIP tokenizer is read from: ``models.tokenizer``, else the diffusers folder's own."""
    if config.models.tokenizer:
        return Path(config.models.tokenizer)
    if single_file.is_single_file(config.models.sd15):
        raise ModelFileMissingError(f"models.sd15 is a single file ({config.models.sd15}): {single_file.TOKENIZER_HELP}")
    return Path(config.models.sd15) / "tokenizer"


def _load_sd15_folder(config: TrainConfig, frozen_dtype: torch.dtype, need_vae: bool) -> Sd15Parts:
    """A diffusers SD1.5 folder (unet/ text_encoder/ tokenizer/ vae/ scheduler/); models.tokenizer may override."""
    from diffusers import AutoencoderKL, DDPMScheduler

    sd = Path(config.models.sd15)
    return Sd15Parts(
        tokenizer=load_clip_tokenizer(tokenizer_folder(config)),
        text_encoder=load_clip_text_folder(sd / "text_encoder"),
        unet=_load_unet(sd / "unet", "SD1.5", frozen_dtype),
        vae=AutoencoderKL.from_pretrained(str(sd / "vae"), local_files_only=True, torch_dtype=torch.float32)
        if need_vae else None,
        scheduler=DDPMScheduler.from_pretrained(str(sd / "scheduler"), local_files_only=True),
    )


def _load_sd15_single_file(config: TrainConfig, frozen_dtype: torch.dtype, need_vae: bool) -> Sd15Parts:
    """An LDM-layout single file, read once; architecture configs from models.sd15_configs or the shipped SD1.5 ones."""
    tokenizer = load_clip_tokenizer(tokenizer_folder(config))
    configs = single_file.config_folder(config.models.sd15_configs)
    parts = single_file.read_sd15_file(config.models.sd15)
    logger.info("SD1.5 from the single file %s (architecture configs: %s)", parts.path, configs)
    return Sd15Parts(
        tokenizer=tokenizer,
        text_encoder=single_file.load_text_encoder(parts, configs),
        unet=single_file.load_unet(parts, configs, frozen_dtype),
        vae=single_file.load_vae(parts, configs) if need_vae else None,
        scheduler=single_file.sd15_scheduler(),
    )


def load_sd15(config: TrainConfig, frozen_dtype: torch.dtype = torch.float32, need_vae: bool = True) -> Sd15Parts:
    """SD1.5 from a diffusers folder or a single-file checkpoint, never from a hub."""
    if single_file.is_single_file(config.models.sd15):
        return _load_sd15_single_file(config, frozen_dtype, need_vae)
    return _load_sd15_folder(config, frozen_dtype, need_vae)


def build_models(
    config: TrainConfig,
    device: torch.device,
    frozen_dtype: torch.dtype = torch.float32,
    need_teacher: bool = True,
    need_vae: bool = True,
) -> Models:
    """Loads everything from local files (never a hub) and freezes all but the inverter."""
    a2f = Path(config.models.arc2face)
    sd15 = load_sd15(config, frozen_dtype, need_vae)
    inverter = build_inverter(config, sd15.text_encoder)
    models = Models(
        tokenizer=sd15.tokenizer,
        text_encoder=_frozen(sd15.text_encoder, device, frozen_dtype),
        unet=_frozen(sd15.unet, device, frozen_dtype),
        vae=_frozen(sd15.vae, device, torch.float32) if sd15.vae is not None else None,
        scheduler=sd15.scheduler,
        teacher_unet=_frozen(_load_unet(a2f / "arc2face", "Arc2Face", frozen_dtype), device, frozen_dtype) if need_teacher else None,
        id_encoder=_frozen(Arc2FaceEncoder.from_folder(a2f / "encoder", sd15.tokenizer), device, frozen_dtype),
        inverter=inverter.to(device),
        device=device,
        frozen_dtype=frozen_dtype,
    )
    if models.id_encoder.hidden_size != inverter.config.clip.hidden_size:
        raise ConfigError(
            f"the Arc2Face encoder is {models.id_encoder.hidden_size} wide but the inverter "
            f"{inverter.config.clip.hidden_size}: the models do not belong together"
        )
    trainable = sum(p.numel() for p in inverter.parameters() if p.requires_grad)
    logger.info("models loaded on %s (frozen in %s); %.2fM trainable inverter parameters",
                device, str(frozen_dtype).replace("torch.", ""), trainable / 1e6)
    return models
