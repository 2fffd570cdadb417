"""Tiny SD1.5-shaped models written as ONE single-file checkpoint in the original LDM/CompVis layout.

Users keep SD1.5 as such a file (``v1-5-pruned-emaonly.safetensors``, fine-tunes from model sites).
Tests convert a tiny diffusers folder (``tiny_models.write_sd15_folder``) into that layout, so the
trainer's single-file path loads through the same code as for a real file and its outputs can be
compared with the folder it was made from. The diffusers -> LDM key mapping here is written from the
two module layouts (diffusers' ``UNet2DConditionModel`` / ``AutoencoderKL`` and LDM's
``openaimodel.UNetModel`` / ``model.Encoder``+``Decoder``); the loader under test uses diffusers' own
converter, so a mistake on either side shows up as a mismatch.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Union

import torch
from safetensors.torch import save_file

from .tiny_models import SD15_SCHEDULER
from .weights import read_state_dict

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.transformer.text_model."

# diffusers ResnetBlock2D names -> LDM ResBlock names (the VAE's ResnetBlock differs only in nin_shortcut).
UNET_RESNET_NAMES = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                     "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
# diffusers Attention (VAE mid block) names -> LDM AttnBlock names; LDM's are 1x1 convolutions.
VAE_ATTENTION_NAMES = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}

Rule = tuple[str, str, dict[str, str]]
"""(diffusers prefix, LDM prefix, renames of the first name after the prefix)."""


def _rename(key: str, rules: list[Rule], what: str) -> str:
    """The LDM key of a diffusers key; an unmapped key is an error so no tensor is silently dropped."""
    for old, new, names in rules:
        if key.startswith(old):
            rest = key[len(old):]
            for name, ldm_name in names.items():
                if rest.startswith(name + "."):
                    rest = ldm_name + rest[len(name):]
                    break
            return new + rest
    raise KeyError(f"no LDM name for the {what} tensor {key!r}")


def unet_rules(config: dict) -> list[Rule]:
    """LDM numbers the UNet's layers flat: ``input_blocks.k`` holds (resnet, attention) or a downsampler."""
    per = int(config["layers_per_block"])
    n = len(config["block_out_channels"])
    rules: list[Rule] = [
        ("time_embedding.linear_1.", "time_embed.0.", {}), ("time_embedding.linear_2.", "time_embed.2.", {}),
        ("conv_in.", "input_blocks.0.0.", {}), ("conv_norm_out.", "out.0.", {}), ("conv_out.", "out.2.", {}),
        ("mid_block.resnets.0.", "middle_block.0.", UNET_RESNET_NAMES),
        ("mid_block.attentions.0.", "middle_block.1.", {}),
        ("mid_block.resnets.1.", "middle_block.2.", UNET_RESNET_NAMES),
    ]
    for block in range(n):
        first = 1 + block * (per + 1)
        for layer in range(per):
            rules.append((f"down_blocks.{block}.resnets.{layer}.", f"input_blocks.{first + layer}.0.", UNET_RESNET_NAMES))
            rules.append((f"down_blocks.{block}.attentions.{layer}.", f"input_blocks.{first + layer}.1.", {}))
        rules.append((f"down_blocks.{block}.downsamplers.0.conv.", f"input_blocks.{first + per}.0.op.", {}))
    for block, kind in enumerate(config["up_block_types"]):
        first = block * (per + 1)
        for layer in range(per + 1):
            rules.append((f"up_blocks.{block}.resnets.{layer}.", f"output_blocks.{first + layer}.0.", UNET_RESNET_NAMES))
            rules.append((f"up_blocks.{block}.attentions.{layer}.", f"output_blocks.{first + layer}.1.", {}))
        upsampler_slot = 2 if "CrossAttn" in kind else 1  # after the resnet, and the attention if there is one
        rules.append((f"up_blocks.{block}.upsamplers.0.conv.", f"output_blocks.{first + per}.{upsampler_slot}.conv.", {}))
    return rules


def vae_rules(config: dict) -> list[Rule]:
    """LDM's decoder counts its up levels from the lowest resolution's opposite end: ``up.{n-1-k}``."""
    n = len(config["block_out_channels"])
    rules: list[Rule] = [("quant_conv.", "quant_conv.", {}), ("post_quant_conv.", "post_quant_conv.", {})]
    for part in ("encoder", "decoder"):
        rules += [
            (f"{part}.conv_in.", f"{part}.conv_in.", {}), (f"{part}.conv_out.", f"{part}.conv_out.", {}),
            (f"{part}.conv_norm_out.", f"{part}.norm_out.", {}),
            (f"{part}.mid_block.resnets.0.", f"{part}.mid.block_1.", {}),
            (f"{part}.mid_block.resnets.1.", f"{part}.mid.block_2.", {}),
            (f"{part}.mid_block.attentions.0.", f"{part}.mid.attn_1.", VAE_ATTENTION_NAMES),
        ]
    for level in range(n):
        rules.append((f"encoder.down_blocks.{level}.resnets.", f"encoder.down.{level}.block.", {}))
        rules.append((f"encoder.down_blocks.{level}.downsamplers.0.conv.", f"encoder.down.{level}.downsample.conv.", {}))
        ldm_level = n - 1 - level
        rules.append((f"decoder.up_blocks.{level}.resnets.", f"decoder.up.{ldm_level}.block.", {}))
        rules.append((f"decoder.up_blocks.{level}.upsamplers.0.conv.", f"decoder.up.{ldm_level}.upsample.conv.", {}))
    return rules


def _vae_resnet_tail(key: str) -> str:
    """``...block.J.conv_shortcut.*`` -> ``...block.J.nin_shortcut.*``: the rename sits after the layer index."""
    return key.replace(".conv_shortcut.", ".nin_shortcut.")


def ldm_unet(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    rules = unet_rules(config)
    return {UNET_PREFIX + _rename(k, rules, "UNet"): v for k, v in state.items()}


def ldm_vae(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    rules = vae_rules(config)
    out = {}
    for key, value in state.items():
        new = _vae_resnet_tail(_rename(key, rules, "VAE"))
        if ".mid.attn_1." in new and value.ndim == 2:
            value = value[:, :, None, None]  # LDM's attention projections are 1x1 convolutions
        out[VAE_PREFIX + new] = value
    return out


def ldm_text_encoder(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``text_model.*`` (transformers 4) or unprefixed (5) -> ``cond_stage_model.transformer.text_model.*``."""
    out = {TEXT_PREFIX + (k[len("text_model."):] if k.startswith("text_model.") else k): v for k, v in state.items()}
    # Real files carry the position-id buffer; keeping it proves the loader tolerates it.
    out.setdefault(TEXT_PREFIX + "embeddings.position_ids", torch.arange(77, dtype=torch.int64)[None])
    return out


def ldm_schedule_buffers() -> dict[str, torch.Tensor]:
    """The DDPM buffers an LDM checkpoint stores beside the models (SD1.5's scaled-linear betas)."""
    steps = SD15_SCHEDULER["num_train_timesteps"]
    betas = torch.linspace(SD15_SCHEDULER["beta_start"] ** 0.5, SD15_SCHEDULER["beta_end"] ** 0.5, steps) ** 2
    return {"betas": betas, "alphas_cumprod": torch.cumprod(1 - betas, 0)}


def _read_component(folder: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """A diffusers/transformers component folder's (safetensors) weights and config."""
    weights = next(iter(sorted(folder.glob("*.safetensors"))), folder / "model.safetensors")
    return read_state_dict(weights), json.loads((folder / "config.json").read_text(encoding="utf-8"))


def write_single_file_from_folder(folder: Union[str, Path], path: Union[str, Path]) -> Path:
    """``folder`` (a diffusers SD1.5 folder of safetensors) as one LDM-layout ``.safetensors`` checkpoint."""
    folder = Path(folder)
    unet, unet_cfg = _read_component(folder / "unet")
    vae, vae_cfg = _read_component(folder / "vae")
    text, _ = _read_component(folder / "text_encoder")
    tensors = {**ldm_unet(unet, unet_cfg), **ldm_vae(vae, vae_cfg), **ldm_text_encoder(text), **ldm_schedule_buffers()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


def write_config_folder(folder: Union[str, Path], configs: Union[str, Path]) -> Path:
    """The architecture configs (unet/, vae/, text_encoder/ ``config.json``) that match ``folder``'s models."""
    configs = Path(configs)
    for name in ("unet", "vae", "text_encoder"):
        (configs / name).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(Path(folder) / name / "config.json", configs / name / "config.json")
    return configs
