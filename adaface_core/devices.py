"""Device and dtype choice for code that runs without ComfyUI (the CLIs and the trainer)."""

from __future__ import annotations

from typing import Optional

import torch


def default_device() -> torch.device:
    """CUDA (also ROCm builds), then Apple MPS, then CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def inference_dtype(device: torch.device, requested: Optional[str] = None) -> torch.dtype:
    """fp16 on GPUs, fp32 on CPU (CPU half kernels are slow or missing), unless asked otherwise."""
    names = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if requested:
        return names[requested]
    return torch.float16 if device.type in ("cuda", "mps") else torch.float32
