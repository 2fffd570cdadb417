"""Device and dtype choice for code that runs without ComfyUI (the CLIs and the trainer)."""

from __future__ import annotations

from typing import Optional

import torch

from .errors import ConfigError


def _mps_available() -> bool:
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


def default_device() -> torch.device:
    """CUDA (also ROCm builds), then Apple MPS, then CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if _mps_available():
        return torch.device("mps")
    return torch.device("cpu")


def chosen_device(name: Optional[str]) -> torch.device:
    """The device a user named (``--device``), or :func:`default_device`; a name torch does not know, or a
    backend this torch build or machine lacks, is a :class:`ConfigError` (not a traceback from the first copy)."""
    if name is None:
        return default_device()
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ConfigError(f"unknown device {name!r}: use cpu, cuda, cuda:1, mps, ...") from None
    available = {"cuda": torch.cuda.is_available, "mps": _mps_available}
    if device.type in available and not available[device.type]():
        raise ConfigError(f"device {name!r} is not available with this torch build on this machine")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"device {name!r} does not exist: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def inference_dtype(device: torch.device, requested: Optional[str] = None) -> torch.dtype:
    """fp16 on GPUs, fp32 on CPU (CPU half kernels are slow or missing), unless asked otherwise."""
    names = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if requested:
        return names[requested]
    return torch.float16 if device.type in ("cuda", "mps") else torch.float32


def host_to_device(tensor: torch.Tensor, device: torch.device, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """``tensor.to(device, dtype)`` without making the host wait for the GPU.

    A plain copy from pageable host memory to CUDA synchronizes the stream: the host stops until every
    kernel queued before the copy has run, and the GPU then idles while the next kernels are launched.
    A copy from pinned memory with ``non_blocking`` is queued like a kernel instead. ``pin_memory`` makes
    a new staging tensor, so the caller may change ``tensor`` at once (a tensor already pinned must not be
    changed until the copy is done). Other devices get a plain copy: a ``non_blocking`` copy to MPS can
    read its source after it is freed (pytorch#189690). The meta device holds no data and takes CUDA's
    flags, so a test there sees every copy the trainer makes. The dtype changes on the device.
    """
    device = torch.device(device)
    if tensor.device.type != "cpu" or device.type not in ("cuda", "meta"):
        return tensor.to(device, dtype)
    if device.type == "cuda":
        tensor = tensor.contiguous().pin_memory()  # a strided view would be re-copied to pageable memory
    moved = tensor.to(device, non_blocking=True)
    return moved if dtype is None else moved.to(dtype)
