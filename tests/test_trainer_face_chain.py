"""Stage-1 face distillation, the chain itself (trainer/losses_face.py, DESIGN §2 Training).

Every UNet call of one loss evaluation is recorded with forward hooks on ``models.unet`` (student) and
``models.teacher_unet`` (teacher); the CFG-combined noise predictions are recorded by wrapping
``teacher_eps`` and ``student_eps`` on the loss instance, and the generator's Gaussian draws by wrapping
``torch.randn`` for that generator only. The tests then re-derive what the method says from those tensors
alone: same x_t and t for both networks, the timestep schedule, the re-noised teacher x0 between steps,
CFG with one scale on both sides (the teacher against the Arc2Face empty prompt, the student against
SD1.5's), the masked MSE and the sum / sqrt(k).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pytest
import torch

from adaface_core.errors import ConfigError
from tests.test_trainer_loss_expansion import _photo_batch, models  # noqa: F401  (module fixture, reused)
from trainer.compositions import fill_subject
from trainer.config import FaceLossConfig, config_from_dict
from trainer.face_space import FaceBatch, FaceSpace
from trainer.losses_face import FaceDistillationLoss

LATENT = 8  # the tiny VAE maps the 64 px photos of ``_photo_batch`` to 8x8 latents
ATOL = 1e-5


@dataclass
class Call:
    x: torch.Tensor
    t: torch.Tensor
    ctx: torch.Tensor
    out: torch.Tensor


@dataclass
class Record:
    student: list[Call] = field(default_factory=list)
    teacher: list[Call] = field(default_factory=list)
    teacher_eps: list[torch.Tensor] = field(default_factory=list)
    """What ``teacher_eps`` returned, in call order (CFG already combined)."""
    student_eps: list[torch.Tensor] = field(default_factory=list)
    """What ``student_eps`` returned, one per chain step (CFG already combined)."""
    draws: list[torch.Tensor] = field(default_factory=list)
    """Every ``torch.randn(..., generator=<the loss's generator>)`` result, in order."""

    def noise_draws(self, shape) -> list[torch.Tensor]:
        return [d for d in self.draws if tuple(d.shape) == tuple(shape)]


def _hook(calls: list[Call]):
    def hook(module, args, kwargs, output):
        x = args[0] if len(args) > 0 else kwargs["sample"]
        t = args[1] if len(args) > 1 else kwargs["timestep"]
        out = output.sample if hasattr(output, "sample") else output[0]
        calls.append(Call(x.detach().float().clone(), torch.as_tensor(t).detach().clone(),
                          kwargs["encoder_hidden_states"].detach().float().clone(), out.detach().float().clone()))
    return hook


def run_loss(models, loss_fn, batch, seed, monkeypatch):
    """One loss evaluation with everything it feeds the two UNets recorded."""
    assert models.unet is not models.teacher_unet
    record = Record()
    generator = torch.Generator().manual_seed(seed)

    real_randn = torch.randn

    def randn(*args, **kwargs):
        out = real_randn(*args, **kwargs)
        if kwargs.get("generator") is generator:
            record.draws.append(out.clone())
        return out

    def recorded(method, into: list[torch.Tensor]):
        def wrapper(*args, **kwargs):
            out = method(*args, **kwargs)
            into.append(out.detach().clone())
            return out
        return wrapper

    handles = [models.unet.register_forward_hook(_hook(record.student), with_kwargs=True),
               models.teacher_unet.register_forward_hook(_hook(record.teacher), with_kwargs=True)]
    try:
        with monkeypatch.context() as m:
            m.setattr(torch, "randn", randn)
            m.setattr(loss_fn, "teacher_eps", recorded(loss_fn.teacher_eps, record.teacher_eps))
            m.setattr(loss_fn, "student_eps", recorded(loss_fn.student_eps, record.student_eps))
            with torch.no_grad():
                loss, metrics = loss_fn(models, batch, generator)
    finally:
        for h in handles:
            h.remove()
    return loss, metrics, record


def random_id_batch(models, n, seed=0):
    space = FaceSpace(None, models.id_dim, random_id_prob=1.0, id_noise_std=0.0)
    batch = space.sample(n, torch.Generator().manual_seed(seed))
    assert not bool(batch.has_image.any())
    return batch


def mixed_batch(tmp_path, models):
    """Two photo rows (face mask = the centre half of the photo) and one random ID (no photo, no mask)."""
    photos = _photo_batch(tmp_path, models, 255)
    random_id = random_id_batch(models, 1, seed=5)
    return FaceBatch(
        torch.cat([photos.id_vectors, random_id.id_vectors]),
        torch.cat([photos.has_image, random_id.has_image]),
        torch.cat([photos.image_index, torch.tensor([-1])]),
        photos.photos,
    )


def expected_latent_mask(b_photos, b_random):
    """By hand: the 64 px mask covers pixels 16..47, i.e. latent cells 2..5 of 8; random IDs: everything."""
    m = torch.zeros(b_photos + b_random, 1, LATENT, LATENT)
    m[:b_photos, :, 2:6, 2:6] = 1
    m[b_photos:] = 1
    return m


def chain_teacher_calls(record, k):
    """The teacher's calls of the chain: the last k (random IDs first get one extra call at t = T-1)."""
    assert len(record.teacher) in (k, k + 1)
    return record.teacher[-k:], record.teacher_eps[-k:]


def chain_student_calls(record, k):
    """(conditional calls, empty-prompt calls or None) of the student, one each per chain step.

    With CFG the student runs its conditional pass, then its empty-prompt pass, at every step."""
    if len(record.student) == k:
        return record.student, None
    assert len(record.student) == 2 * k
    return record.student[0::2], record.student[1::2]


def halves(call: Call, b: int):
    """A teacher call's (x, t, ctx, out) for the conditional rows (all rows without CFG, second half with)."""
    n = call.x.shape[0]
    assert n in (b, 2 * b)
    s = slice(n - b, n)
    return call.x[s], call.t[s], call.ctx[s], call.out[s]


def cfg_scales(record, k, b):
    """Per chain step, per sample, the scale s that makes teacher_eps = uncond + s * (cond - uncond)."""
    scales = []
    for call, eps in zip(*chain_teacher_calls(record, k)):
        if call.x.shape[0] == b:
            assert torch.allclose(eps, call.out, atol=ATOL)  # no CFG: the teacher's plain prediction
            scales.append(torch.ones(b))
            continue
        uncond, cond = call.out.chunk(2)
        d = (cond - uncond).flatten(1)
        s = ((eps - uncond).flatten(1) * d).sum(1) / (d * d).sum(1)
        assert torch.allclose(eps, uncond + s.view(-1, 1, 1, 1) * (cond - uncond), atol=1e-4)
        scales.append(s)
    return torch.stack(scales)


# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg_prob", [0.0, 1.0])
def test_teacher_and_student_see_the_same_x_t_and_t_at_every_step(models, monkeypatch, cfg_prob):
    k, b = 4, 3
    batch = random_id_batch(models, b)
    cfg = FaceLossConfig(chain_steps=k, cfg_prob=cfg_prob)
    _, metrics, rec = run_loss(models, FaceDistillationLoss(cfg, LATENT), batch, 11, monkeypatch)
    assert sorted(metrics) == sorted([f"loss_t{i}" for i in range(k)] + ["random_id_frac"])
    student, student_uncond = chain_student_calls(rec, k)
    assert (student_uncond is not None) == (cfg_prob == 1.0)
    # The student is conditioned on the inverter's tokens spliced into one of the student templates per row,
    # the same for the whole chain.
    with torch.no_grad():
        tokens = models.id_encoder(batch.id_vectors.to(models.frozen_dtype)).id_tokens
        subject = models.inverter(tokens.float())
        per_template = [models.encode_with_subject([fill_subject(t, cfg.placeholder)] * b, cfg.placeholder,
                                                   subject).float() for t in cfg.student_templates]
        negative = models.encode_prompts([""]).float()
    picked = [[j for j, ctx in enumerate(per_template) if torch.allclose(student[0].ctx[r], ctx[r], atol=ATOL)]
              for r in range(b)]
    assert all(len(p) == 1 for p in picked), picked
    student_ctx = torch.stack([per_template[p[0]][r] for r, p in enumerate(picked)])
    teacher, _ = chain_teacher_calls(rec, k)
    for i, (s, tc) in enumerate(zip(student, teacher)):
        x, t, _, _ = halves(tc, b)
        assert s.x.shape == (b, 4, LATENT, LATENT)
        assert torch.equal(s.x, x), i
        assert torch.equal(s.t, t), i
        assert (tc.x.shape[0] == 2 * b) == (cfg_prob == 1.0)
        if tc.x.shape[0] == 2 * b:  # CFG: both halves of the teacher batch share x_t and t
            assert torch.equal(tc.x[:b], tc.x[b:]) and torch.equal(tc.t[:b], tc.t[b:])
        assert torch.allclose(s.ctx, student_ctx, atol=ATOL), i
        if student_uncond is not None:  # CFG: the student's empty-prompt pass sees the same x_t and t
            u = student_uncond[i]
            assert torch.equal(u.x, s.x) and torch.equal(u.t, s.t), i
            assert torch.allclose(u.ctx, negative.expand(b, -1, -1), atol=ATOL), i


def test_timesteps_start_high_and_shrink_by_the_configured_ratio(models, monkeypatch):
    k, b = 5, 16
    T = models.num_train_timesteps
    cfg = FaceLossConfig(chain_steps=k, cfg_prob=0.0)
    _, _, rec = run_loss(models, FaceDistillationLoss(cfg, LATENT), random_id_batch(models, b), 3, monkeypatch)
    ts = torch.stack([c.t for c in rec.student]).double()  # [k, b]
    assert ts.shape == (k, b)
    lo, hi = cfg.first_t
    assert bool((ts[0] >= round(lo * (T - 1))).all() and (ts[0] <= round(hi * (T - 1))).all()), ts[0]
    assert ts[0].unique().numel() > b // 2  # drawn per sample, not one t for the whole batch
    r_lo, r_hi = cfg.next_t_ratio
    for i in range(1, k):
        prev, cur = ts[i - 1], ts[i]
        assert bool((cur < prev).all() and (cur >= 1).all()), (i, prev, cur)
        # t_i = round(t_{i-1} * r), r in next_t_ratio: within half a step of that interval
        assert bool((cur >= prev * r_lo - 0.5).all() and (cur <= prev * r_hi + 0.5).all()), (i, prev, cur)
    ratios = ts[1:] / ts[:-1]
    assert ratios.std() > 0.02  # the ratio is drawn, not fixed

    # A degenerate range pins the arithmetic exactly: t0 = round(0.6 * 999) = 599, then x0.75 each step.
    fixed = FaceLossConfig(chain_steps=3, cfg_prob=0.0, first_t=(0.6, 0.6), next_t_ratio=(0.75, 0.75))
    _, _, rec = run_loss(models, FaceDistillationLoss(fixed, LATENT), random_id_batch(models, 2), 4, monkeypatch)
    assert [c.t.tolist() for c in rec.student] == [[599, 599], [449, 449], [337, 337]]


def _match_draw(record, expected_fn, shape):
    """Index of the single recorded Gaussian draw n with expected_fn(n) equal to the target."""
    hits = [j for j, n in enumerate(record.noise_draws(shape)) if expected_fn(n)]
    assert len(hits) == 1, f"{len(hits)} of the generator's Gaussian draws fit (expected exactly one)"
    return hits[0]


@pytest.mark.parametrize("cfg_prob", [0.0, 1.0])
def test_later_steps_renoise_the_teachers_x0_estimate_with_fresh_noise(models, tmp_path, monkeypatch, cfg_prob):
    k = 4
    batch = mixed_batch(tmp_path, models)
    b = batch.id_vectors.shape[0]
    loss_fn = FaceDistillationLoss(FaceLossConfig(chain_steps=k, cfg_prob=cfg_prob), LATENT)
    _, _, rec = run_loss(models, loss_fn, batch, 21, monkeypatch)
    shape = (b, 4, LATENT, LATENT)
    teacher, teacher_eps = chain_teacher_calls(rec, k)
    student, _ = chain_student_calls(rec, k)
    xs = [c.x for c in student]
    ts = [c.t for c in student]

    # Random IDs, and only they: x0 is the teacher's one-step estimate from pure noise at t = T-1
    # (same CFG as the chain); the photo rows never run that extra teacher pass.
    random_rows = (~batch.has_image).nonzero().flatten()
    r = len(random_rows)
    assert len(rec.teacher) == k + 1
    pre, pre_eps = rec.teacher[0], rec.teacher_eps[0]
    T = models.num_train_timesteps
    t_top = torch.full((r,), T - 1, dtype=torch.long)
    assert torch.equal(pre.t[-r:], t_top) and pre.x.shape[0] == (2 * r if cfg_prob == 1.0 else r)
    pure = _match_draw(rec, lambda n: torch.equal(pre.x[-r:], n[random_rows]), shape)
    assert cfg_scales(rec, k, b).shape == (k, b)
    if cfg_prob == 1.0:
        uncond, cond = pre.out.chunk(2)
        s = cfg_scales(rec, k, b)[0][random_rows]
        assert torch.allclose(pre_eps, uncond + s.view(-1, 1, 1, 1) * (cond - uncond), atol=1e-4)
    else:
        assert torch.allclose(pre_eps, pre.out, atol=ATOL)
    x0 = torch.empty(shape)
    x0[random_rows] = loss_fn.x0(models, pre.x[-r:], pre_eps, t_top)
    # Photos: x0 is the photo's VAE latent (posterior mean).
    pixels = torch.stack([batch.photos.images.load(int(i))[0] for i in batch.image_index[:2]])
    x0[:2] = models.encode_images(pixels)

    draws = rec.noise_draws(shape)
    used = [pure]
    for i in range(k):
        if i > 0:
            assert torch.equal(teacher[i - 1].x[-b:], xs[i - 1])
            x0 = loss_fn.x0(models, xs[i - 1], teacher_eps[i - 1], ts[i - 1])
            assert bool((x0.abs() <= 5.0).all())
        j = _match_draw(rec, lambda n: torch.allclose(loss_fn.noisy(models, x0, n, ts[i]), xs[i], atol=ATOL), shape)
        used.append(j)
    assert len(set(used)) == len(used), used  # fresh noise at every step, none reused

    # The same identity in closed form, independent of the loss's helpers: the noise recovered from x_{i+1}
    # and the teacher's x0 estimate at step i is exactly the fresh draw found above.
    ab = models.scheduler.alphas_cumprod.float()
    for i in range(1, k):
        a_prev, a = ab[ts[i - 1]].view(-1, 1, 1, 1), ab[ts[i]].view(-1, 1, 1, 1)
        x0_hat = ((xs[i - 1] - (1 - a_prev).sqrt() * teacher_eps[i - 1]) / a_prev.sqrt()).clamp(-5, 5)
        noise = (xs[i] - a.sqrt() * x0_hat) / (1 - a).sqrt()
        assert torch.allclose(noise, draws[used[i + 1]], atol=1e-3), i


def test_a_batch_of_photos_runs_no_pure_noise_teacher_pass(models, tmp_path, monkeypatch):
    k = 2
    photos = _photo_batch(tmp_path, models, 255)
    _, _, rec = run_loss(models, FaceDistillationLoss(FaceLossConfig(chain_steps=k, cfg_prob=1.0), LATENT),
                         photos, 3, monkeypatch)
    assert len(rec.teacher) == k  # the chain's teacher calls only


def test_loss_is_the_sum_of_masked_mses_over_sqrt_k(models, tmp_path, monkeypatch):
    k = 3
    batch = mixed_batch(tmp_path, models)
    loss_fn = FaceDistillationLoss(FaceLossConfig(chain_steps=k, cfg_prob=0.0), LATENT)
    loss, metrics, rec = run_loss(models, loss_fn, batch, 8, monkeypatch)
    teacher, _ = chain_teacher_calls(rec, k)
    cells = expected_latent_mask(2, 1)[:, 0].bool()  # [B, H, W]
    assert 0 < int(cells.sum()) < cells.numel()
    per_step = []
    for i, (s, tc) in enumerate(zip(rec.student, teacher)):
        assert tc.x.shape[0] == s.x.shape[0]  # cfg_prob = 0: plain teacher batch
        diff = (s.out - tc.out).permute(0, 2, 3, 1)[cells]  # [cells, C]: only the face / random-ID cells
        assert diff.shape == (int(cells.sum()), 4)
        per_step.append(float((diff ** 2).mean()))
        assert float(metrics[f"loss_t{i}"]) == pytest.approx(per_step[-1], rel=1e-5)
        full = float(((s.out - tc.out) ** 2).mean())
        assert abs(full - per_step[-1]) > 1e-4 * full  # the mask changes the number
    assert float(loss) == pytest.approx(sum(per_step) / math.sqrt(k), rel=1e-5)
    assert float(metrics["random_id_frac"]) == pytest.approx(1 / 3)

    # use_masks = False: every cell counts.
    loss_fn = FaceDistillationLoss(FaceLossConfig(chain_steps=k, cfg_prob=0.0, use_masks=False), LATENT)
    loss, _, rec = run_loss(models, loss_fn, batch, 8, monkeypatch)
    full = [float(((s.out - tc.out) ** 2).mean()) for s, tc in zip(rec.student, chain_teacher_calls(rec, k)[0])]
    assert float(loss) == pytest.approx(sum(full) / math.sqrt(k), rel=1e-5)


def test_cfg_guides_teacher_and_student_with_one_scale_against_their_own_empty_prompts(models, monkeypatch):
    k, b = 3, 4
    cfg = FaceLossConfig(chain_steps=k, cfg_prob=1.0)
    batch = random_id_batch(models, b, seed=2)
    loss, _, rec = run_loss(models, FaceDistillationLoss(cfg, LATENT), batch, 5, monkeypatch)
    with torch.no_grad():
        negative = models.id_encoder.empty_prompt_embeds().float()
        positive = models.id_encoder(batch.id_vectors.to(models.frozen_dtype)).prompt_embeds.float()
    assert negative.shape[0] == 1 and not torch.allclose(negative.expand_as(positive), positive, atol=1e-3)
    for call in rec.teacher:  # the pure-noise pre-step and every chain step
        assert call.x.shape[0] == 2 * b
        assert torch.allclose(call.ctx[:b], negative.expand(b, -1, -1), atol=ATOL)
        assert torch.allclose(call.ctx[b:], positive, atol=ATOL)
        assert not torch.allclose(call.out[:b], call.out[b:], atol=1e-4)  # the prompts matter to the teacher
    scales = cfg_scales(rec, k, b)  # also asserts eps = uncond + s * (cond - uncond)
    lo, hi = cfg.cfg_scale
    assert bool((scales >= lo - 1e-4).all() and (scales <= hi + 1e-4).all()), scales
    assert torch.allclose(scales, scales[:1].expand_as(scales), atol=1e-3)  # one scale per sample, whole chain
    assert scales[0].std() > 0.01  # drawn per sample
    # The student is guided too, with the teacher's scale, against SD1.5's empty prompt (the reference
    # code pairs them: an unguided student would learn tokens that carry the guidance themselves).
    student, student_uncond = chain_student_calls(rec, k)
    with torch.no_grad():
        sd_negative = models.encode_prompts([""]).float()
    assert not torch.allclose(sd_negative.expand(b, -1, -1), student[0].ctx, atol=1e-3)
    for i, (cond, uncond, eps) in enumerate(zip(student, student_uncond, rec.student_eps)):
        assert torch.allclose(uncond.ctx, sd_negative.expand(b, -1, -1), atol=ATOL), i
        s = scales[i].view(-1, 1, 1, 1)
        assert torch.allclose(eps, uncond.out + s * (cond.out - uncond.out), atol=1e-4), i
        assert not torch.allclose(eps, cond.out, atol=1e-4), i
    # The loss is the MSE between the two CFG-combined predictions (random IDs: no mask).
    _, eps = chain_teacher_calls(rec, k)
    expected = sum(float(((s - e) ** 2).mean()) for s, e in zip(rec.student_eps, eps)) / math.sqrt(k)
    assert float(loss) == pytest.approx(expected, rel=1e-5)

    # cfg_prob = 0: a plain B batch on the ID's prompt, no negative, on both sides.
    _, _, rec = run_loss(models, FaceDistillationLoss(FaceLossConfig(chain_steps=k, cfg_prob=0.0), LATENT),
                         batch, 5, monkeypatch)
    for call in rec.teacher:
        assert call.x.shape[0] == b
        assert torch.allclose(call.ctx, positive, atol=ATOL)
    assert torch.equal(cfg_scales(rec, k, b), torch.ones(k, b))
    student, student_uncond = chain_student_calls(rec, k)
    assert student_uncond is None
    assert all(torch.equal(eps, call.out) for eps, call in zip(rec.student_eps, student))


def test_mixed_cfg_batch_gives_plain_predictions_to_the_rows_without_cfg(models, monkeypatch):
    k, b = 2, 8
    cfg = FaceLossConfig(chain_steps=k, cfg_prob=0.5)
    _, _, rec = run_loss(models, FaceDistillationLoss(cfg, LATENT), random_id_batch(models, b, seed=4), 9, monkeypatch)
    scales = cfg_scales(rec, k, b)[0]
    plain = (scales - 1).abs() < 1e-3
    guided = (scales >= cfg.cfg_scale[0] - 1e-4) & (scales <= cfg.cfg_scale[1] + 1e-4)
    assert bool((plain | guided).all()) and bool(plain.any()) and bool(guided.any()), scales
    # The student's rows without CFG are exactly its conditional prediction; the guided rows are not.
    student, _ = chain_student_calls(rec, k)
    for cond, eps in zip(student, rec.student_eps):
        assert torch.equal(eps[plain], cond.out[plain])
        assert not torch.allclose(eps[guided], cond.out[guided], atol=1e-4)


def test_student_templates_are_drawn_per_sample_and_a_prompt_without_the_subject_is_refused(models, monkeypatch):
    templates = ["a photo of {subject}", "an oil painting of {subject}"]
    cfg = FaceLossConfig(chain_steps=1, cfg_prob=0.0, student_templates=templates)
    loss_fn = FaceDistillationLoss(cfg, LATENT)
    prompts = loss_fn.student_prompts(16, torch.Generator().manual_seed(0))
    assert set(prompts) == {"a photo of z", "an oil painting of z"}
    assert prompts == loss_fn.student_prompts(16, torch.Generator().manual_seed(0))  # from the loss's generator
    # Only {subject} is filled in; other braces are the user's text.
    braces = FaceDistillationLoss(FaceLossConfig(student_templates=["a {style} photo of {subject}"]), LATENT)
    assert braces.student_prompts(2, torch.Generator()) == ["a {style} photo of z"] * 2
    # Each row's context is one template's, and a batch mixes them.
    b = 6
    batch = random_id_batch(models, b, seed=1)
    _, _, rec = run_loss(models, loss_fn, batch, 7, monkeypatch)
    with torch.no_grad():
        subject = models.inverter(models.id_encoder(batch.id_vectors.to(models.frozen_dtype)).id_tokens.float())
        per_template = [models.encode_with_subject([fill_subject(t, "z")] * b, "z", subject).float()
                        for t in templates]
    picked = [[j for j, ctx in enumerate(per_template) if torch.allclose(rec.student[0].ctx[r], ctx[r], atol=ATOL)]
              for r in range(b)]
    assert all(len(p) == 1 for p in picked) and {p[0] for p in picked} == {0, 1}, picked

    with pytest.raises(ConfigError, match="student_templates"):
        config_from_dict({"face": {"loss": {"student_templates": ["a photo of a person"]}}}).validate(check_paths=False)
