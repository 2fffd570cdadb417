"""Stand-in for ``comfy.sd.load_diffusion_model``.

ComfyUI reads a diffusers-format UNet file, detects SD1.5 from its keys and returns a MODEL
(a ``ModelPatcher``). Here diffusers builds the UNet from the ``config.json`` beside the file, whatever
its size: real ComfyUI only accepts a known layout and refuses the tests' tiny UNets ("Could not detect
model type"), so these tests check the pack's call, not ComfyUI's detection (a full-size SD1.5-shaped
UNet, as Arc2Face's is, loads and samples in real ComfyUI 0.3.64).
"""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import load_file

from . import model_management
from .model_patcher import ModelPatcher


class SD1Model(torch.nn.Module):
    """Like ComfyUI's ``BaseModel``: the UNet as ``diffusion_model`` plus a plain ``device`` attribute."""

    def __init__(self, diffusion_model: torch.nn.Module):
        super().__init__()
        self.diffusion_model = diffusion_model
        self.device = None


def load_diffusion_model(unet_path, model_options={}):  # noqa: B006 - ComfyUI's signature
    from diffusers import UNet2DConditionModel

    config_path = os.path.join(os.path.dirname(unet_path), "config.json")
    if not os.path.isfile(unet_path) or not os.path.isfile(config_path):
        raise RuntimeError(f"ERROR: Could not detect model type of: {unet_path}")
    with open(config_path, encoding="utf-8") as handle:
        config = {k: v for k, v in json.load(handle).items() if not k.startswith("_")}
    unet = UNet2DConditionModel.from_config(config)
    unet.load_state_dict(load_file(unet_path))
    unet.eval().requires_grad_(False)
    if "dtype" in model_options:
        unet.to(model_options["dtype"])
    return ModelPatcher(SD1Model(unet), load_device=model_management.get_torch_device(), offload_device=model_management.unet_offload_device())
