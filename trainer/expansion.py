"""Dynamic model expansion (paper §2.2): a plateau detector on the EMA of the loss, and the schedule
of expansions it (or a forced step) triggers. Both keep their state as plain numbers for resume."""

from __future__ import annotations

import logging
import math
from typing import Optional

import torch

from adaface_core.errors import ConfigError
from adaface_core.inverter import PromptInverter

from .config import ExpansionConfig

logger = logging.getLogger(__name__)


class PlateauDetector:
    """Says "plateau" when the EMA loss has not improved by ``min_rel_improvement`` for ``patience`` steps."""

    def __init__(self, ema_beta: float, patience: int, min_rel_improvement: float, warmup_steps: int):
        self.ema_beta = ema_beta
        self.patience = patience
        self.min_rel_improvement = min_rel_improvement
        self.warmup_steps = warmup_steps
        self.reset()

    def reset(self) -> None:
        self.ema: Optional[float] = None
        self.count = 0
        self.best = math.inf
        self.since_best = 0

    def update(self, loss: float) -> bool:
        if not math.isfinite(loss):
            return False
        self.count += 1
        if self.ema is None:
            self.ema = loss
        else:
            self.ema = self.ema_beta * self.ema + (1 - self.ema_beta) * loss
        ema = self.ema  # starts at the first loss, so no bias correction is needed
        if self.count <= self.warmup_steps:
            self.best = min(self.best, ema)
            return False
        if ema < self.best * (1 - self.min_rel_improvement):
            self.best = ema
            self.since_best = 0
            return False
        self.since_best += 1
        return self.since_best >= self.patience

    def state_dict(self) -> dict:
        return {"ema": self.ema, "count": self.count, "best": self.best, "since_best": self.since_best}

    def load_state_dict(self, state: dict) -> None:
        self.ema = state["ema"]
        self.count = int(state["count"])
        self.best = float(state["best"])
        self.since_best = int(state["since_best"])


class ExpansionSchedule:
    """Applies ``config.factors[i]`` at the i-th plateau (or at ``forced_steps[i]``, whichever comes first)."""

    def __init__(self, config: ExpansionConfig, seed: int = 0):
        self.config = config
        self.seed = seed
        self.done = 0
        self.last_step = 0
        self.plateau = PlateauDetector(config.ema_beta, config.patience, config.min_rel_improvement, config.warmup_steps)

    def check(self, inverter: PromptInverter) -> None:
        layers = len(inverter.clip.encoder.layers)
        for i, factors in enumerate(self.config.factors):
            if len(factors) != layers:
                raise ConfigError(f"expansion {i + 1} lists {len(factors)} factors but the inverter has {layers} layers")

    def check_applied(self, inverter: PromptInverter) -> None:
        """On resume: the expansions this stage already applied must be the config's first ones.

        A config that now lists other factors for them describes a model that was never trained; the
        checkpoint keeps the layers it has, so the mismatch is refused rather than silently ignored.
        """
        if not self.done:
            return
        history = inverter.config.expansion_history
        applied = [entry["factors"] for entry in history[-self.done:]] if len(history) >= self.done else None
        listed = [list(f) for f in self.config.factors[: self.done]]
        if applied != listed:
            raise ConfigError(
                f"the checkpoint already applied {self.done} expansion(s) with factors {applied}, but the config's "
                f"expansion.factors now begin with {listed}: restore the applied factors (only later ones may "
                "change) or start over with --overwrite")

    @property
    def remaining(self) -> int:
        return len(self.config.factors) - self.done if self.config.enabled else 0

    def step(self, step: int, loss: float) -> Optional[list[int]]:
        """Called once per optimizer step with the (process-averaged) loss; returns factors to apply or None."""
        plateau = self.plateau.update(loss)
        if not self.remaining:
            return None
        forced = self.config.forced_steps[self.done] if self.done < len(self.config.forced_steps) else 0
        if forced and step >= forced:
            reason = f"forced at step {forced}"
        elif plateau and step - self.last_step >= self.config.min_steps_between:
            reason = f"loss plateau (EMA {self.plateau.ema:.5f})"
        else:
            return None
        logger.info("expansion %d/%d at step %d: %s", self.done + 1, len(self.config.factors), step, reason)
        return list(self.config.factors[self.done])

    def apply(self, inverter: PromptInverter, factors: list[int], step: int) -> None:
        """Expands the inverter (a new parameter set: the caller rebuilds its optimizer)."""
        generator = torch.Generator().manual_seed(self.seed * 1000003 + step)
        inverter.expand(factors, perturb_std=self.config.perturb_std, generator=generator, step=step)
        self.done += 1
        self.last_step = step
        self.plateau.reset()
        logger.info("inverter attention multipliers now %s", inverter.config.attention_multipliers)

    def state_dict(self) -> dict:
        return {"done": self.done, "last_step": self.last_step, "plateau": self.plateau.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.done = int(state["done"])
        self.last_step = int(state["last_step"])
        self.plateau.load_state_dict(state["plateau"])
