"""Speed options for the frozen UNets (teacher and student): channels-last memory layout and
``torch.compile``. Both leave the losses equal (tests check it on the CPU) and are off by default:
whether they pay off is a GPU measurement (``bench/train_step.py --channels-last --compile``), and
compiling costs minutes before the first step."""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Iterator, Optional

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


@contextmanager
def compiled_unets_see_hooks(run: RunConfig) -> Iterator[None]:
    """Runs the block with ``torch.compile`` guarding on module hooks, when ``run.compile`` is on.

    Stage 2 reads cross-attention activations through forward hooks it adds around each UNet call
    (``feature_capture.py``). By default dynamo does not guard on hooks (``skip_nnmodule_hook_guards``): a
    graph it compiled before they existed (stage 1's, on the same UNet, or any earlier no-grad call) keeps
    running after they are added, and the capture records nothing. With the guard, adding the hooks
    compiles once more and the new graph runs them. Scoped to the training run, not set for the process."""
    if not run.compile:
        yield
        return
    import torch._dynamo

    with torch._dynamo.config.patch(skip_nnmodule_hook_guards=False):
        yield
