"""Stand-in for ``comfy.model_management`` on a CPU-only machine (``--cpu``).

``load_models_gpu`` moves each patcher's module to its load device and records it, which is what
the tests check; the real one also frees memory and may load partially.
"""

from __future__ import annotations

import threading

import torch

current_loaded_models: list = []


def get_torch_device() -> torch.device:
    return torch.device("cpu")


def unet_offload_device() -> torch.device:
    return torch.device("cpu")


def intermediate_device() -> torch.device:
    return torch.device("cpu")


def is_device_cpu(device) -> bool:
    return getattr(device, "type", device) == "cpu"


def should_use_fp16(device=None, model_params=0, prioritize_performance=True, manual_cast=False) -> bool:
    return device is not None and not is_device_cpu(device) and torch.cuda.is_available()


def load_models_gpu(models, memory_required=0, force_patch_weights=False, minimum_memory_required=None, force_full_load=False):
    for patcher in models:
        patcher.patch_model(device_to=patcher.load_device)
        if patcher not in current_loaded_models:
            current_loaded_models.insert(0, patcher)


def soft_empty_cache(force=False) -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class InterruptProcessingException(Exception):
    pass


_interrupt_lock = threading.RLock()
interrupt_processing = False


def interrupt_current_processing(value=True) -> None:
    global interrupt_processing
    with _interrupt_lock:
        interrupt_processing = value


def processing_interrupted() -> bool:
    with _interrupt_lock:
        return interrupt_processing


def throw_exception_if_processing_interrupted() -> None:
    global interrupt_processing
    with _interrupt_lock:
        if interrupt_processing:
            interrupt_processing = False
            raise InterruptProcessingException()
