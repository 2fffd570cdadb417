"""SD1.5 from one single-file checkpoint (the original LDM/CompVis layout that ComfyUI users keep).

Such a file holds the UNet (``model.diffusion_model.*``), the VAE (``first_stage_model.*``) and the CLIP-L
text encoder (``cond_stage_model.transformer[.text_model].*``) but no architecture configs and no
tokenizer. The configs ship in ``trainer/sd15_configs/`` (SD1.5's own, so nothing is looked up on a hub);
the tokenizer comes from ``models.tokenizer``. The UNet and VAE are converted by diffusers' own LDM
converters, checked tensor by tensor against the config (diffusers alone would leave a missing weight on
the meta device and drop an extra one silently), then loaded by its public ``from_single_file`` with that
local config; the text encoder goes through the core's CLIP loader. The file is read once, with
safetensors or ``torch.load(weights_only=True)``: a ``.ckpt`` can never run code.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import torch

from adaface_core.clip_text import ClipTextTransformer
from adaface_core.errors import CheckpointError
from adaface_core.tiny_models import SD15_SCHEDULER
from adaface_core.weights import (check_shapes, clip_text_from_state_dict, read_clip_text_config, read_state_dict,
                                  state_shapes)

logger = logging.getLogger(__name__)

SHIPPED_CONFIGS = Path(__file__).resolve().parent / "sd15_configs"
"""SD1.5's architecture configs (diffusers ``config.json`` of unet/ and vae/, transformers' of text_encoder/)."""
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.transformer."
COMPONENT_PREFIXES = {"unet": UNET_PREFIX, "vae": VAE_PREFIX, "text_encoder": TEXT_PREFIX}
# Tensors an LDM training run leaves in the file besides the three models: the DDPM schedule buffers
# and the EMA copy (the trainer uses the regular weights, as diffusers' converter does by default).
LDM_SCHEDULE_KEYS = frozenset({
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2", "logvar",
})
IGNORED_PREFIXES = ("model_ema.",)
# What a file that is not an SD1.5 LDM checkpoint usually is, told by one of its keys' prefixes.
FOREIGN_HINTS = (
    ("conditioner.embedders.", "an SDXL checkpoint"),
    ("cond_stage_model.model.", "an SD2.x checkpoint (OpenCLIP text encoder)"),
    ("lora_", "a LoRA"),
    ("down_blocks.", "a diffusers-layout UNet file (point models.sd15 at the diffusers folder instead)"),
    ("encoder.down_blocks.", "a diffusers-layout VAE file"),
    ("text_model.", "a CLIP text-encoder file"),
)
TOKENIZER_HELP = (
    "a single-file SD1.5 checkpoint holds no tokenizer: set models.tokenizer to a CLIP tokenizer folder "
    "(vocab.json + merges.txt): the tokenizer/ folder of an SD1.5 diffusers model, or ComfyUI's comfy/sd1_tokenizer"
)


def is_single_file(path: Union[str, Path]) -> bool:
    """True for an existing file, or a missing path named like a checkpoint (so it is reported as one file)."""
    path = Path(path)
    return path.is_file() or path.suffix.lower() in SINGLE_FILE_SUFFIXES


def config_folder(configured: str) -> Path:
    """The architecture-config folder: ``models.sd15_configs`` or the shipped SD1.5 one."""
    return Path(configured).expanduser() if configured else SHIPPED_CONFIGS


def tokenizer_paths(tokenizer: str) -> list[Path]:
    """The two files a CLIP tokenizer needs, in the folder itself or in its ``tokenizer/`` child."""
    folder = Path(tokenizer)
    if (folder / "tokenizer" / "vocab.json").is_file():
        folder = folder / "tokenizer"
    return [folder / "vocab.json", folder / "merges.txt"]


def required_paths(sd15: str, tokenizer: str, configs: str) -> list[tuple[str, Path]]:
    """Every path a single-file SD1.5 needs, named for ``TrainConfig.check_paths``'s one error."""
    folder = config_folder(configs)
    paths = [("models.sd15 (single-file SD1.5 checkpoint)", Path(sd15))]
    if tokenizer:
        paths += [("models.tokenizer", path) for path in tokenizer_paths(tokenizer)]
    else:
        paths.append((f"models.tokenizer ({TOKENIZER_HELP})", Path("<unset>")))
    paths += [
        ("models.sd15_configs unet", folder / "unet" / "config.json"),
        ("models.sd15_configs vae", folder / "vae" / "config.json"),
        ("models.sd15_configs text_encoder", folder / "text_encoder" / "config.json"),
    ]
    return paths


@dataclass
class Sd15File:
    """A single-file checkpoint's tensors, split by model, each still under its LDM prefix."""

    path: Path
    unet: dict[str, torch.Tensor]
    vae: dict[str, torch.Tensor]
    text_encoder: dict[str, torch.Tensor]


def read_sd15_file(path: Union[str, Path]) -> Sd15File:
    """Reads and splits the file once; a file that is not an SD1.5 LDM checkpoint is refused by name."""
    path = Path(path)
    if path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
        raise CheckpointError(f"models.sd15 {path} is a file but not {' or '.join(SINGLE_FILE_SUFFIXES)}; "
                              "give an SD1.5 single-file checkpoint or a diffusers SD1.5 folder")
    try:
        state = read_state_dict(path)
    except CheckpointError as exc:
        if path.suffix.lower() != ".ckpt":
            raise
        raise CheckpointError(
            f"{exc}. Use the model's .safetensors release, or save the file's state_dict as .safetensors once "
            "with a tool you trust"
        ) from exc
    return split_components(state, path)


def split_components(state: dict[str, Any], path: Path) -> Sd15File:
    """Sorts the tensors by model prefix; anything left that an LDM checkpoint does not hold is an error."""
    parts: dict[str, dict[str, torch.Tensor]] = {name: {} for name in COMPONENT_PREFIXES}
    foreign = []
    ema = 0
    for key, value in state.items():
        name = next((n for n, prefix in COMPONENT_PREFIXES.items() if key.startswith(prefix)), None)
        if name is not None and isinstance(value, torch.Tensor):
            parts[name][key] = value
        elif key.startswith(IGNORED_PREFIXES):
            ema += 1
        elif key not in LDM_SCHEDULE_KEYS:
            foreign.append(key)
    missing = [COMPONENT_PREFIXES[name] + "*" for name, tensors in parts.items() if not tensors]
    if missing or foreign:
        raise CheckpointError(_not_sd15_message(path, missing, foreign))
    if ema:
        logger.info("%s: %d EMA tensors ignored (the regular weights are used, as diffusers does)", path.name, ema)
    return Sd15File(path=path, **parts)


def _not_sd15_message(path: Path, missing: list[str], foreign: list[str]) -> str:
    """Says what is missing or foreign, and what the file probably is instead."""
    problems = []
    if missing:
        problems.append(f"it has no {', '.join(missing)} tensors")
    if foreign:
        problems.append(f"it holds {len(foreign)} tensors an SD1.5 LDM checkpoint does not, e.g. {sorted(foreign)[:4]}")
    guesses = sorted({what for key in foreign for prefix, what in FOREIGN_HINTS if key.startswith(prefix)})
    guess = f" It looks like {' / '.join(guesses)}." if guesses else ""
    return (
        f"{path} is not an SD1.5 single-file checkpoint in the original LDM layout ({UNET_PREFIX}*, "
        f"{VAE_PREFIX}*, {TEXT_PREFIX}*): " + "; ".join(problems) + "." + guess
    )


def _unused_keys(tensors: dict[str, torch.Tensor], converted: dict[str, torch.Tensor]) -> list[str]:
    """File tensors diffusers' converter left out.

    Its output holds the file's tensors themselves or views of them (the VAE attention's 1x1 convolutions
    sliced to linear weights), so a tensor whose storage nothing in the output points at was dropped."""
    used = {value.data_ptr() for value in converted.values()}
    return sorted(key for key, value in tensors.items() if value.data_ptr() not in used)


def convert_checked(cls: Any, convert: Any, tensors: dict[str, torch.Tensor], config: dict, what: str,
                    source: str) -> dict[str, torch.Tensor]:
    """diffusers' LDM -> diffusers conversion, then every missing, extra or mis-shaped tensor named at once.

    diffusers itself leaves a weight the file lacks on the meta device (failing later with "Cannot copy out
    of meta tensor") and drops tensors it has no name for without a word; neither may pass silently here.
    """
    try:
        converted = convert(tensors, config)
    except (KeyError, IndexError, ValueError, AttributeError) as exc:
        raise CheckpointError(f"{source}: diffusers cannot convert the {what} from the LDM layout: {exc!r}") from exc
    unused = _unused_keys(tensors, converted)
    if unused:
        raise CheckpointError(f"{source}: {len(unused)} {what} tensors have no place in the architecture of "
                              f"the config folder, e.g. {unused[:4]} (not SD1.5, or a variant that needs its own "
                              "models.sd15_configs)")
    with torch.device("meta"):
        expected = state_shapes(cls.from_config(config).state_dict())
    check_shapes(expected, state_shapes(converted), f"{source} ({what}, in diffusers' names)")
    return converted


def _from_single_file(cls: Any, convert: Any, tensors: dict[str, torch.Tensor], config_dir: Path, what: str,
                      source: Path, dtype: torch.dtype) -> torch.nn.Module:
    """diffusers' public single-file loader on tensors already read and checked, with a local config."""
    config = cls.load_config(str(config_dir), local_files_only=True)
    converted = convert_checked(cls, convert, tensors, config, what, str(source))
    # Without torch_dtype diffusers casts each tensor to the model's float32 as it loads it (an fp16 file
    # included); passing float32 anyway would only trigger its spurious "kept in float32" warning.
    dtype_kwargs = {} if dtype == torch.float32 else {"torch_dtype": dtype}
    # The converted dict already has the model's keys, so from_single_file loads it as it is.
    return cls.from_single_file(converted, config=str(config_dir), local_files_only=True, **dtype_kwargs)


def load_unet(parts: Sd15File, configs: Path, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    return _from_single_file(UNet2DConditionModel, convert_ldm_unet_checkpoint, parts.unet, configs / "unet", "UNet",
                             parts.path, dtype)


def load_vae(parts: Sd15File, configs: Path) -> torch.nn.Module:
    """The VAE in float32, as for a folder: latents are encoded once per image, precision matters more."""
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    return _from_single_file(AutoencoderKL, convert_ldm_vae_checkpoint, parts.vae, configs / "vae", "VAE", parts.path,
                             torch.float32)


def load_text_encoder(parts: Sd15File, configs: Path) -> ClipTextTransformer:
    """Through the core's CLIP loader, which strips the LDM prefix and names every mismatched tensor."""
    config = read_clip_text_config(configs / "text_encoder" / "config.json")
    return clip_text_from_state_dict(parts.text_encoder, config, f"{parts.path} ({TEXT_PREFIX}*)")


def sd15_scheduler() -> Any:
    """SD1.5's training noise schedule (the file stores only its buffers, not the scheduler config)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(SD15_SCHEDULER)
