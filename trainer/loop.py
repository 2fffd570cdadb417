"""The training loop shared by every stage.

A stage is a plug-in (``Stage``): ``sample_batch(batch_size, generator)`` and
``loss(models, batch, generator) -> (loss, metrics)``. Everything else is here: optimizer
(Prodigy or AdamW) and LR warm-up, gradient accumulation, gradient averaging across processes,
clipping, dynamic expansion with optimizer rebuild, logging, checkpoints and exact resume.

Distributed training: the inverter is not wrapped in DDP (its parameters are replaced by an
expansion); after the accumulated backward passes, the gradients are averaged across processes
in one flat all-reduce, which is what DDP does, so every process keeps identical weights.
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Optional, Protocol

import torch

from adaface_core.errors import ConfigError
from adaface_core.inverter import PromptInverter

from .checkpointing import clean_stale, find_resume_checkpoint, load_checkpoint, save_checkpoint, set_rng_state
from .config import OptimConfig, StageConfig
from .expansion import ExpansionSchedule
from .logs import TrainLogger, carry_logs
from .models import Models
from .optimizer_expansion import PRODIGY_GROUP_STATE, Replacements, carry_optimizer_state, replaced_parameters

logger = logging.getLogger(__name__)

FINAL_INVERTER = "adaface_inverter.safetensors"
"""A stage's result in its folder, written when the stage ends (the file Load AdaFace reads)."""


class Stage(Protocol):
    """What a training stage supplies to the loop."""

    name: str

    def sample_batch(self, batch_size: int, generator: torch.Generator) -> Any: ...

    def loss(self, models: Models, batch: Any, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]: ...


class SimulatedCrash(RuntimeError):
    """Raised by the loop at ``crash_at_step`` (tests of kill-and-resume)."""


@dataclass
class StageResult:
    stage: str
    final_checkpoint: Path
    steps: int
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    steps_per_second: float = 0.0
    loss_curve: Optional[Path] = None
    heldout: Optional[dict] = None
    """Held-out figures before/after the stage (stages with ``evaluate``, i.e. stage 2)."""


def build_optimizer(params: list[torch.nn.Parameter], config: OptimConfig, previous: Optional[torch.optim.Optimizer] = None,
                    replaced: Optional[Replacements] = None):
    """A new optimizer; after an expansion, ``previous``'s state carried over (``replaced``: old -> new
    parameter for the grown projections)."""
    if config.optimizer == "prodigy":
        from prodigyopt import Prodigy

        optimizer = Prodigy(params, lr=config.lr, d_coef=config.d_coef, weight_decay=config.weight_decay,
                            betas=tuple(config.betas), use_bias_correction=config.bias_correction)
    elif config.optimizer == "adamw":
        # fused: one kernel for all parameters on the GPU instead of a loop of small ones
        fused = bool(params) and params[0].device.type == "cuda"
        optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay, betas=tuple(config.betas),
                                      fused=fused or None)
    else:
        raise ConfigError(f"unknown optimizer {config.optimizer!r} (prodigy or adamw)")
    if previous is not None:
        carry_optimizer_state(previous, optimizer, replaced)
    return optimizer


def restore_optimizer(optimizer: torch.optim.Optimizer, saved: dict[str, Any], optimizer_name: str) -> None:
    """Loads a checkpoint's optimizer state under the settings now in force.

    ``load_state_dict`` alone brings back the old run's hyperparameters too (lr, d_coef, betas, weight
    decay): a resume with a new LR would silently go on at the old one. The moments and Prodigy's
    learned step size come from the checkpoint, every setting from the config; the state of another
    optimizer is refused rather than misread.
    """
    settings = [{k: v for k, v in group.items() if k not in ("params", *PRODIGY_GROUP_STATE)} for group in optimizer.param_groups]
    saved_kind = "prodigy" if any("d_coef" in group for group in saved["param_groups"]) else "adamw"
    if ("d_coef" in optimizer.param_groups[0]) != (saved_kind == "prodigy"):
        raise ConfigError(f"the checkpoint holds {saved_kind} optimizer state but the config asks for {optimizer_name}: "
                          f"resume with optim.optimizer: {saved_kind}, or start the stage over in a new --output")
    optimizer.load_state_dict(saved)
    for group, fresh in zip(optimizer.param_groups, settings):
        group.pop("initial_lr", None)  # the schedule starts again from the configured LR
        group.update(fresh)


def lr_factor(config: OptimConfig, max_steps: int, step: int) -> float:
    """The LR multiplier at optimizer step ``step`` (0-based): linear warm-up, then optionally linear decay."""
    factor = min(1.0, (step + 1) / config.warmup_steps) if config.warmup_steps > 0 else 1.0
    if config.lr_schedule == "linear" and step > config.lr_decay_start:
        span = max(1, max_steps - config.lr_decay_start)
        factor *= 1.0 - (1.0 - config.lr_final_factor) * min(1.0, (step - config.lr_decay_start) / span)
    return factor


def build_lr_scheduler(optimizer, config: OptimConfig, max_steps: int, step: int):
    """The schedule positioned at ``step``: it has no state beyond the step, so a resume rebuilds it."""
    for group in optimizer.param_groups:
        group.setdefault("initial_lr", group["lr"])
    return torch.optim.lr_scheduler.LambdaLR(optimizer, partial(lr_factor, config, max_steps), last_epoch=step - 1)


def precision_context(accelerator):
    """The autocast training runs under (none in full precision)."""
    return accelerator.autocast() if accelerator.mixed_precision != "no" else nullcontext()


def trainable_parameters(inverter: PromptInverter) -> list[torch.nn.Parameter]:
    return [p for p in inverter.parameters() if p.requires_grad]


def _all_reduce_gradients(params: list[torch.nn.Parameter], accelerator) -> None:
    if accelerator.num_processes <= 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    torch.distributed.all_reduce(flat)
    flat /= accelerator.num_processes
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset : offset + n].view_as(p).clone()
        offset += n


class Trainer:
    """Runs one stage from its config; ``resume`` is a folder to continue from (or None)."""

    def __init__(self, stage: Stage, stage_config: StageConfig, models: Models, accelerator, stage_dir: Path,
                 seed: int = 0, save_every: int = 1000, keep_last: int = 3, log_every: int = 10,
                 resume: Optional[Path] = None, tensorboard: bool = True, crash_at_step: Optional[int] = None,
                 show_progress: bool = True, metadata: Optional[dict[str, str]] = None):
        self.stage = stage
        self.config = stage_config
        self.models = models
        self.accelerator = accelerator
        self.stage_dir = Path(stage_dir)
        self.checkpoints_dir = self.stage_dir / "checkpoints"
        self.seed = seed
        self.save_every = save_every
        self.keep_last = keep_last
        self.log_every = max(1, log_every)
        self.tensorboard = tensorboard
        self.crash_at_step = crash_at_step
        self.show_progress = show_progress
        self.metadata = dict(metadata or {}, stage=stage.name)
        self.generator = torch.Generator().manual_seed(seed * 7919 + 104729 * (accelerator.process_index + 1))
        self.expansion = ExpansionSchedule(stage_config.expansion, seed)
        self.step = 0
        if accelerator.is_main_process:
            clean_stale(self.checkpoints_dir)
        accelerator.wait_for_everyone()
        rng = None
        checkpoint = find_resume_checkpoint(resume, stage.name) if resume is not None else None
        if resume is not None and checkpoint is None:
            logger.warning("--resume %s: no %s checkpoint there; starting this stage from the beginning", resume, stage.name)
        loaded = load_checkpoint(checkpoint, accelerator.process_index) if checkpoint is not None else None
        if loaded is not None and loaded.state.get("stage") != stage.name:
            # e.g. --stage both --resume <a stage-1 folder>: stage 2 must not take stage 1's step and optimizer
            logger.warning("--resume %s: %s is a %s checkpoint; the %s stage starts from the beginning",
                           resume, checkpoint, loaded.state.get("stage"), stage.name)
            checkpoint = loaded = None
        if loaded is not None:
            models.inverter = loaded.inverter.float().to(models.device)
            models.inverter.freeze_embeddings()
            self.step = int(loaded.state["step"])
            self.expansion.load_state_dict(loaded.state["expansion"])
            self.expansion.check_applied(models.inverter)
            rng = loaded.rng
            logger.info("resumed %s from %s (step %d, multipliers %s)", stage.name, checkpoint, self.step,
                        models.inverter.config.attention_multipliers)
            if accelerator.is_main_process:
                carry_logs(checkpoint.parent.parent, self.stage_dir, self.step)
            accelerator.wait_for_everyone()  # the held-out report reads what was carried
        self.expansion.check(models.inverter)
        self.optimizer = build_optimizer(trainable_parameters(models.inverter), stage_config.optim)
        if loaded is not None:
            restore_optimizer(self.optimizer, loaded.state["optimizer"], stage_config.optim.optimizer)
        # Built from the step alone, after the optimizer's state is back: a resume with another max_steps or
        # LR continues on the schedule now in force, not on the old one.
        self.lr_scheduler = build_lr_scheduler(self.optimizer, stage_config.optim, stage_config.max_steps, self.step)
        if rng is not None:
            set_rng_state(rng, self.generator)

    @property
    def inverter(self) -> PromptInverter:
        return self.models.inverter

    def _state(self) -> dict[str, Any]:
        return {
            "stage": self.stage.name,
            "optimizer": self.optimizer.state_dict(),
            "expansion": self.expansion.state_dict(),
        }

    def save(self) -> Path:
        return save_checkpoint(self.checkpoints_dir, self.step, self.inverter, self._state(), self.accelerator,
                               self.generator, self.keep_last, self.metadata)

    def _expand(self, factors: list[int]) -> None:
        before = dict(self.inverter.named_parameters())
        self.expansion.apply(self.inverter, factors, self.step)
        self.inverter.to(self.models.device)
        replaced = replaced_parameters(before, dict(self.inverter.named_parameters()))
        self.optimizer = build_optimizer(trainable_parameters(self.inverter), self.config.optim, previous=self.optimizer,
                                         replaced=replaced)
        self.lr_scheduler = build_lr_scheduler(self.optimizer, self.config.optim, self.config.max_steps, self.step)

    def check_replicas(self) -> None:
        """With several processes: every process must hold the same weights (raises if not)."""
        if self.accelerator.num_processes <= 1:
            return
        flat = torch.cat([p.detach().float().reshape(-1) for p in self.inverter.parameters()])
        stats = torch.stack([flat.sum(), flat.abs().sum(), (flat * torch.linspace(0, 1, flat.numel(), device=flat.device)).sum()])
        gathered = self.accelerator.gather(stats[None]).reshape(self.accelerator.num_processes, -1)
        if not torch.allclose(gathered, gathered[:1].expand_as(gathered), rtol=1e-6, atol=1e-6):
            raise RuntimeError(f"the {self.accelerator.num_processes} processes ended with different weights: {gathered.tolist()}")
        logger.info("weights agree across %d processes (checksum %.6f)", self.accelerator.num_processes, float(stats[0]))

    def train_step(self) -> tuple[float, dict[str, torch.Tensor]]:
        """One optimizer step over ``grad_accum`` micro-batches; returns the process-averaged loss and the
        last micro-batch's metrics (device tensors: read them back only when logging).

        The loss is read back once per step for the plateau detector; that costs no extra wait, since
        Prodigy's step already reads two values per parameter back from the device."""
        optim = self.config.optim
        params = trainable_parameters(self.inverter)
        total = torch.zeros((), device=self.models.device)
        metrics: dict[str, torch.Tensor] = {}
        for _ in range(optim.grad_accum):
            batch = self.stage.sample_batch(optim.batch_size, self.generator)
            with precision_context(self.accelerator):
                loss, metrics = self.stage.loss(self.models, batch, self.generator)
            (loss / optim.grad_accum).backward()
            total += loss.detach().float() / optim.grad_accum
        _all_reduce_gradients(params, self.accelerator)
        if optim.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, optim.max_grad_norm)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        mean = self.accelerator.reduce(total, "mean") if self.accelerator.num_processes > 1 else total
        return float(mean), metrics

    def train(self) -> StageResult:
        max_steps = self.config.max_steps
        log = TrainLogger(self.stage_dir, self.stage.name, self.step, max_steps, self.accelerator.is_main_process,
                          self.tensorboard, self.show_progress)
        losses: list[float] = []
        start = time.perf_counter()
        start_step = self.step
        last_saved: Optional[Path] = None
        try:
            while self.step < max_steps:
                lr = self.optimizer.param_groups[0]["lr"]  # the step's own LR (the scheduler moves it on)
                multipliers = list(self.inverter.config.attention_multipliers)  # the step's own (an expansion follows it)
                loss, metrics = self.train_step()
                self.step += 1
                losses.append(loss)
                if not math.isfinite(loss):
                    raise FloatingPointError(f"{self.stage.name} loss is {loss} at step {self.step}; "
                                             "lower the learning rate or check the models")
                factors = self.expansion.step(self.step, loss)
                if factors is not None:
                    self._expand(factors)
                if self.step % self.log_every == 0 or self.step == max_steps:
                    log.log(self.step, loss, lr, multipliers, {k: float(v) for k, v in metrics.items()})
                log.progress(self.step, loss)
                if self.step % self.save_every == 0 or self.step == max_steps:
                    last_saved = self.save()
                if self.crash_at_step is not None and self.step == self.crash_at_step:
                    raise SimulatedCrash(f"simulated crash after step {self.step}")
        finally:
            curve = log.close()
        seconds = time.perf_counter() - start
        if last_saved is None:
            last_saved = self.save()
        final = self.stage_dir / FINAL_INVERTER
        if self.accelerator.is_main_process:
            from adaface_core.checkpoint import save_inverter

            save_inverter(self.inverter, final, dict(self.metadata, step=str(self.step)))
        self.accelerator.wait_for_everyone()
        self.check_replicas()
        done = self.step - start_step
        return StageResult(self.stage.name, final, self.step, losses, seconds, done / seconds if seconds > 0 else 0.0, curve)


@torch.no_grad()
def heldout_loss(stage: Stage, models: Models, batches: int, batch_size: int, seed: int = 1234) -> float:
    """The stage loss on fixed batches (same IDs, noises and timesteps every call): for comparing weights."""
    generator = torch.Generator().manual_seed(seed)
    was_training = models.inverter.training
    models.inverter.eval()
    try:
        total = sum(float(stage.loss(models, stage.sample_batch(batch_size, generator), generator)[0]) for _ in range(batches))
    finally:
        models.inverter.train(was_training)
    return total / batches
