"""Stand-in for ``comfy.model_patcher.ModelPatcher``: a module plus the two devices it lives on."""

from __future__ import annotations

import torch


class ModelPatcher:
    def __init__(self, model, load_device, offload_device, size=0, weight_inplace_update=False):
        self.model = model
        if not hasattr(self.model, "device") or self.model.device is None:
            self.model.device = offload_device
        self.load_device = load_device
        self.offload_device = offload_device
        self.size = size or sum(t.nelement() * t.element_size() for t in model.state_dict().values())
        self.model_options = {"transformer_options": {}}
        self.weight_inplace_update = weight_inplace_update

    def model_size(self) -> int:
        return self.size

    def patch_model(self, device_to=None, lowvram_model_memory=0, load_weights=True, force_patch_weights=False):
        if device_to is not None:
            self.model.to(device_to)
            self.model.device = device_to
        return self.model

    def unpatch_model(self, device_to=None, unpatch_weights=True):
        if device_to is not None:
            self.model.to(device_to)
            self.model.device = device_to

    def current_loaded_device(self) -> torch.device:
        return self.model.device
