"""Carrying optimizer state across a dynamic expansion.

An expansion replaces each grown key/value projection by a new parameter holding ``factor`` copies
of the old rows (``adaface_core.clip_text.tile_rows``, which ``ClipAttention.expand`` uses: copy ``j`` of row ``i`` at
row ``j * rows + i``). The copies share the attention weight the old keys had, so with identical
copies each copy's gradient is exactly the old gradient divided by ``factor``. The new parameter's
state is therefore the old state tiled the same way, with gradient moments rescaled by the power of
the gradient they hold: its first updates then have the steady-state size, where fresh moments under
Prodigy's carried step count (bias correction ~1) made them 3-6x too large for hundreds of steps.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import torch

from adaface_core.clip_text import tile_rows

logger = logging.getLogger(__name__)

PRODIGY_GROUP_STATE = ("d", "d_max", "d_numerator", "k")
"""Prodigy's learned step size and its running sums live in the param group, not per parameter."""

GRADIENT_POWER = {"step": 0, "p0": 0, "exp_avg": 1, "s": 1, "exp_avg_sq": 2, "max_exp_avg_sq": 2}
"""How each per-parameter state entry (Prodigy 1.1 and AdamW) scales with the gradient: a copy's
gradient is 1/factor of the old one, so an entry is multiplied by factor ** -power. Prodigy's ``p0``
(the starting point) and ``s`` (gradient EMA) are flat, taken every ``slice_p``-th element."""

Replacements = dict[torch.nn.Parameter, torch.nn.Parameter]
"""Old parameter -> the parameter that replaced it in an expansion."""


def expansion_factor(old: torch.Tensor, new: torch.Tensor) -> Optional[int]:
    """How many copies of ``old``'s rows ``new`` holds (None if it is not a row-tiling of it)."""
    if old.dim() != new.dim() or old.dim() == 0 or old.shape[1:] != new.shape[1:] or new.shape[0] % old.shape[0]:
        return None
    return new.shape[0] // old.shape[0]


def _tile_sliced(value: torch.Tensor, old_shape: torch.Size, factor: int, slice_p: int) -> torch.Tensor:
    """A flat ``p.flatten()[::slice_p]`` entry of the old parameter, as the new parameter's.

    The index map comes from tiling the old flat indices with ``tile_rows``, so it follows the
    weights' layout; an element Prodigy did not sample (only when numel % slice_p != 0) takes the
    nearest preceding sample."""
    indices = torch.arange(old_shape.numel(), device=value.device).view(old_shape)
    return value[tile_rows(indices, factor).flatten()[::slice_p] // slice_p]


def _expand_entry(value: Any, power: int, old_shape: torch.Size, factor: int, slice_p: int) -> Any:
    if not torch.is_tensor(value):
        return value  # Prodigy's integer step
    if value.dim() == 0:
        return value.clone()  # AdamW's step; Prodigy's p0 of an all-zero parameter
    if value.shape == old_shape:
        tiled = tile_rows(value, factor)
    elif value.dim() == 1 and value.numel() == -(-old_shape.numel() // slice_p):
        tiled = _tile_sliced(value, old_shape, factor, slice_p)
    else:
        raise ValueError(f"state of shape {tuple(value.shape)} for a parameter of shape {tuple(old_shape)}")
    return tiled * float(factor) ** -power if power else tiled


def expanded_state(state: dict[str, Any], old_shape: torch.Size, factor: int, slice_p: int = 1) -> Optional[dict[str, Any]]:
    """The state for the parameter that replaced one of ``old_shape`` by ``factor`` row copies, or None
    (the new parameter starts fresh) if the state holds an entry this module does not know."""
    unknown = [key for key in state if key not in GRADIENT_POWER]
    if unknown:
        logger.warning("optimizer state %s unknown: an expanded parameter starts with fresh state", unknown)
        return None
    return {key: _expand_entry(value, GRADIENT_POWER[key], old_shape, factor, slice_p) for key, value in state.items()}


def carry_optimizer_state(old: torch.optim.Optimizer, new: torch.optim.Optimizer,
                          replaced: Optional[Replacements] = None) -> None:
    """After an expansion: surviving parameters keep their state (and Prodigy its step-size estimate);
    the replacing ones get the tiled, rescaled state of the parameters they replace."""
    sources = {new_param: old_param for old_param, new_param in (replaced or {}).items()}
    for group in new.param_groups:
        for param in group["params"]:
            if param in old.state:
                new.state[param] = old.state[param]
            elif sources.get(param) in old.state:
                _carry_replaced(old.state[sources[param]], sources[param], param, group, new)
    for new_group, old_group in zip(new.param_groups, old.param_groups):
        for key in PRODIGY_GROUP_STATE:
            if key in old_group and key in new_group:
                new_group[key] = old_group[key]


def _carry_replaced(state: dict[str, Any], old_param: torch.Tensor, param: torch.nn.Parameter,
                    group: dict[str, Any], new: torch.optim.Optimizer) -> None:
    factor = expansion_factor(old_param, param)
    if factor is None:
        logger.warning("parameter %s replaced by %s is not a row-tiling: it starts with fresh optimizer state",
                       tuple(old_param.shape), tuple(param.shape))
        return
    carried = expanded_state(state, old_param.shape, factor, group.get("slice_p", 1))
    if carried is not None:
        new.state[param] = carried


def replaced_parameters(before: dict[str, torch.nn.Parameter], after: dict[str, torch.nn.Parameter]) -> Replacements:
    """Old -> new parameter for every name whose parameter an expansion replaced."""
    return {before[name]: param for name, param in after.items() if name in before and before[name] is not param}
