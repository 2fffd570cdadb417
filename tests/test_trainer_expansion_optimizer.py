"""The optimizer across a dynamic expansion: the grown key/value projections keep training at the
steady-state step size instead of restarting with zero moments under Prodigy's carried step count."""

import copy

import pytest
import torch

from adaface_core.clip_text import ClipAttention, ClipTextConfig, tile_rows
from trainer.config import OptimConfig
from trainer.loop import build_optimizer
from trainer.optimizer_expansion import expanded_state, replaced_parameters

PROJECTIONS = ("k_proj.weight", "k_proj.bias", "v_proj.weight", "v_proj.bias")


def make_layer() -> tuple[ClipAttention, torch.Tensor, torch.Tensor]:
    """A tiny attention layer and a fixed batch it cannot fit exactly (so the gradient stays steady)."""
    torch.manual_seed(0)
    layer = ClipAttention(ClipTextConfig(hidden_size=16, num_attention_heads=2))
    return layer, torch.randn(16, 8, 16), torch.randn(16, 8, 16)


def backward(layer: ClipAttention, x: torch.Tensor, target: torch.Tensor) -> float:
    loss = ((layer(x) - target) ** 2).mean()
    loss.backward()
    return loss.item()


def train_step(layer: ClipAttention, optimizer: torch.optim.Optimizer, x, target) -> tuple[float, float]:
    """One step; returns the loss and k_proj's mean |update| per element, in units of Prodigy's d * lr."""
    optimizer.zero_grad(set_to_none=True)
    loss = backward(layer, x, target)
    before = layer.k_proj.weight.detach().clone()
    optimizer.step()
    group = optimizer.param_groups[0]
    return loss, ((layer.k_proj.weight - before).abs().mean() / (group["d"] * group["lr"])).item()


def expand(layer: ClipAttention, optimizer: torch.optim.Optimizer, factor: int) -> torch.optim.Optimizer:
    """What ``Trainer._expand`` does: grow the layer, rebuild the optimizer carrying the state over."""
    before = dict(layer.named_parameters())
    layer.expand(factor, perturb_std=0.0)
    replaced = replaced_parameters(before, dict(layer.named_parameters()))
    return build_optimizer(list(layer.parameters()), OptimConfig(), previous=optimizer, replaced=replaced)


def test_tile_rows_is_the_expansions_layout_and_each_copy_gets_a_share_of_the_gradient():
    layer, x, target = make_layer()
    backward(layer, x, target)
    old = {name: (p.detach().clone(), p.grad.clone()) for name, p in layer.named_parameters()}
    layer.zero_grad()
    layer.expand(3, perturb_std=0.0)
    backward(layer, x, target)
    grown = dict(layer.named_parameters())
    for name in PROJECTIONS:
        weight, grad = old[name]
        assert torch.equal(grown[name].detach(), tile_rows(weight, 3)), name
        # the premise of rescaling the moments: identical copies split the old gradient evenly
        assert torch.allclose(grown[name].grad, tile_rows(grad, 3) / 3, atol=1e-5), name


@pytest.mark.parametrize("factor", [2, 3])
def test_expanded_projections_take_steady_state_steps_right_after_an_expansion(factor):
    """At zero noise an expansion leaves the function unchanged, so training must go on as if it had not
    happened: same step size for the grown projections, same losses (fresh moments gave 21x steps and
    the loss jumped 2.6x). Checked over the first steps: then rounding breaks the copies' symmetry and
    they start to learn different keys, which is what the expansion is for."""
    layer, x, target = make_layer()
    optimizer = build_optimizer(list(layer.parameters()), OptimConfig())
    for _ in range(200):
        train_step(layer, optimizer, x, target)
    plain, plain_optimizer = copy.deepcopy((layer, optimizer))
    optimizer = expand(layer, optimizer, factor)
    for step in range(3):
        plain_loss, plain_size = train_step(plain, plain_optimizer, x, target)
        loss, size = train_step(layer, optimizer, x, target)
        assert size == pytest.approx(plain_size, rel=1e-3), step
        assert loss == pytest.approx(plain_loss, rel=1e-4), step
    assert optimizer.param_groups[0]["d"] == pytest.approx(plain_optimizer.param_groups[0]["d"], rel=1e-4)


def test_sliced_prodigy_state_is_tiled_like_the_weights():
    """Prodigy's ``s`` and ``p0`` hold every ``slice_p``-th element of the flattened parameter."""
    full = torch.arange(24.0).view(6, 4)
    state = {"step": 7, "s": full.flatten()[::4].clone(), "p0": full.flatten()[::4].clone(), "exp_avg": full.clone()}
    carried = expanded_state(state, full.shape, factor=2, slice_p=4)
    assert carried["step"] == 7
    assert torch.equal(carried["p0"], tile_rows(full, 2).flatten()[::4])
    assert torch.equal(carried["s"], tile_rows(full, 2).flatten()[::4] / 2)
    assert torch.equal(carried["exp_avg"], tile_rows(full, 2) / 2)


def test_unknown_optimizer_state_leaves_the_grown_parameter_fresh():
    assert expanded_state({"step": 1, "momentum_buffer": torch.zeros(2)}, torch.Size([2]), factor=2) is None


def test_an_optimizer_reloaded_after_an_expansion_continues_identically():
    """Resume: the carried state saves and loads like any other, so a resumed run takes the same steps."""
    layer, x, target = make_layer()
    optimizer = build_optimizer(list(layer.parameters()), OptimConfig())
    for _ in range(5):
        train_step(layer, optimizer, x, target)
    optimizer = expand(layer, optimizer, 2)
    train_step(layer, optimizer, x, target)
    resumed = copy.deepcopy(layer)
    resumed_optimizer = build_optimizer(list(resumed.parameters()), OptimConfig())
    resumed_optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    for _ in range(3):
        assert train_step(resumed, resumed_optimizer, x, target) == train_step(layer, optimizer, x, target)
    for (name, a), b in zip(layer.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name
