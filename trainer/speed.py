"""Speed options for the frozen UNets (teacher and student): channels-last memory layout and
``torch.compile``. Both leave the losses equal (tests check it on the CPU) and are off by default:
whether they pay off is a GPU measurement (``bench/train_step.py --channels-last --compile``), and
compiling costs minutes before the first step."""

from __future__ import annotations

import logging
from typing import Optional

import torch

from .config import RunConfig
from .models import Models

logger = logging.getLogger(__name__)


def prepare_unet(unet: torch.nn.Module, channels_last: bool, compile_backend: Optional[str]) -> None:
    """In place: the module keeps its type and attributes (stage 2 still sets attention processors on it)."""
    if channels_last:
        unet.to(memory_format=torch.channels_last)
    if compile_backend:
        unet.compile(backend=compile_backend)


def apply_speed_options(models: Models, run: RunConfig, compile_backend: str = "inductor") -> None:
    """Applies ``run.gradient_checkpointing``, ``run.channels_last`` and ``run.compile`` to the UNets."""
    if run.gradient_checkpointing:
        models.unet.enable_gradient_checkpointing()
    backend = compile_backend if run.compile else None
    for unet in (models.unet, models.teacher_unet):
        if unet is not None:
            prepare_unet(unet, run.channels_last, backend)
    if run.channels_last or run.compile:
        logger.info("frozen UNets: channels_last=%s, torch.compile=%s", run.channels_last, backend or "off")
