"""Stage 1 loss: face distillation from Arc2Face (teacher) into inverter -> SD1.5 (student), paper §3.1.

One chain of k timesteps per sample. Teacher and student see the same noisy latent and timestep;
the loss is the MSE between their noise predictions, masked to the face where a mask exists. The
first t is uniform in ``first_t``·T; each next latent is the teacher's x0 estimate re-noised (with
fresh noise, shared by both) to a smaller t (previous t times a ratio in ``next_t_ratio``). The k
losses are summed and divided by sqrt(k). Sometimes (probability ``cfg_prob``, scale uniform in
``cfg_scale``) both sides use CFG with the same scale, as the reference code does: the teacher against
Arc2Face's empty-prompt negative, the student against SD1.5's. A guided target with an unguided
prediction would teach the subject tokens to carry the guidance themselves, and a sampler's own CFG
would then apply it twice. Only the student's conditional pass builds a graph.

Random IDs have no photo. Their chain starts from the teacher's one-step x0 estimate from pure noise
at t = T-1 (with the same CFG as the chain), which costs one extra teacher forward and puts the
chain on the teacher's own image manifold; real photos start from their VAE latent. Teacher x0
estimates are clamped to ±X0_CLAMP (SD latents stay well inside it) so an early bad estimate at
high t cannot blow the chain up.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch

from adaface_core.devices import host_to_device

from .compositions import fill_subject
from .config import FaceLossConfig
from .face_space import FaceBatch, FaceSpace
from .models import Models
from .prompt_cache import FrozenPromptCache

X0_CLAMP = 5.0


def _uniform(n: int, low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=generator)


def guided(uncond: torch.Tensor, cond: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Classifier-free guidance with a per-row ``scale`` ``[B]``; a row of scale 1 is exactly ``cond``."""
    s = scale.view(-1, 1, 1, 1)
    return cond * s - uncond * (s - 1)


class FaceDistillationLoss:
    """Callable ``(models, batch, generator) -> (loss, metrics)``, the stage-1 plug-in of the loop."""

    def __init__(self, config: FaceLossConfig, latent_size: int):
        self.config = config
        self.latent_size = latent_size
        self._negative: Optional[tuple[torch.nn.Module, torch.Tensor]] = None
        """(the Arc2Face encoder it came from, its empty-prompt embedding): computed once per encoder."""
        self._student_negative = FrozenPromptCache()
        """SD1.5's empty-prompt embedding, the student's negative: encoded once per text encoder."""
        self._alphas: Optional[tuple[Any, torch.Tensor]] = None
        """(the scheduler it came from, its alphas_cumprod on the device): copied once, not at every call."""

    def _alpha_bar(self, models: Models, t: torch.Tensor) -> torch.Tensor:
        if self._alphas is None or self._alphas[0] is not models.scheduler or self._alphas[1].device != t.device:
            self._alphas = (models.scheduler, host_to_device(models.scheduler.alphas_cumprod.float(), t.device))
        return self._alphas[1][t].view(-1, 1, 1, 1)

    def noisy(self, models: Models, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        ab = self._alpha_bar(models, t)
        return ab.sqrt() * x0 + (1 - ab).sqrt() * noise

    def x0(self, models: Models, x_t: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        ab = self._alpha_bar(models, t)
        return ((x_t - (1 - ab).sqrt() * eps) / ab.sqrt()).clamp(-X0_CLAMP, X0_CLAMP)

    def student_prompts(self, n: int, generator: torch.Generator) -> list[str]:
        """One student prompt per sample, drawn from ``student_templates`` (no draw for a single template)."""
        templates = self.config.student_templates
        picks = torch.randint(len(templates), (n,), generator=generator).tolist() if len(templates) > 1 else [0] * n
        return [fill_subject(templates[i], self.config.placeholder) for i in picks]

    @torch.no_grad()
    def teacher_eps(self, models: Models, x_t, t, context, cfg_scale: Optional[torch.Tensor]) -> torch.Tensor:
        """Teacher noise prediction; ``cfg_scale`` ``[B]`` (rows of 1 mean no guidance) or None for none at all.

        None is decided on the host by the caller, so no device value is read back here."""
        unet, dtype = models.teacher_unet, models.frozen_dtype
        if cfg_scale is None:
            return unet(x_t.to(dtype), t, encoder_hidden_states=context.to(dtype)).sample.float()
        if self._negative is None or self._negative[0] is not models.id_encoder:
            self._negative = (models.id_encoder, models.id_encoder.empty_prompt_embeds().detach())
        negative = self._negative[1].to(context).expand_as(context)
        out = unet(torch.cat([x_t, x_t]).to(dtype), torch.cat([t, t]),
                   encoder_hidden_states=torch.cat([negative, context]).to(dtype)).sample.float()
        uncond, cond = out.chunk(2)
        return guided(uncond, cond, cfg_scale)

    def student_eps(self, models: Models, x_t, t, context, cfg_scale: Optional[torch.Tensor]) -> torch.Tensor:
        """Student noise prediction, guided like the teacher's (same rows, same scales).

        The empty-prompt pass runs without a graph: gradients reach the tokens through the conditional
        pass only, times the scale, as in the reference code."""
        unet, dtype = models.unet, models.frozen_dtype
        cond = unet(x_t.to(dtype), t, encoder_hidden_states=context.to(dtype)).sample.float()
        if cfg_scale is None:
            return cond
        with torch.no_grad():
            negative = self._student_negative.encode(models, [""] * x_t.shape[0]).to(x_t.device, dtype)
            uncond = unet(x_t.to(dtype), t, encoder_hidden_states=negative).sample.float()
        return guided(uncond, cond, cfg_scale)

    @torch.no_grad()
    def start_x0(self, models: Models, batch: FaceBatch, pure_noise: torch.Tensor, teacher_ctx: torch.Tensor,
                 cfg_scale: Optional[torch.Tensor], use_masks: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0 ``[B, 4, h, w]``, face mask ``[B, 1, h, w]``) a sample starts from.

        A photo gives its VAE latent and its mask (``batch.photos``: encoded once, then cached); a random ID
        the teacher's one-step estimate from ``pure_noise`` at t = T-1 and the whole latent. Only the random
        rows run the teacher.
        """
        device, size = models.device, self.latent_size
        b = pure_noise.shape[0]
        has_image = batch.has_image if batch.photos is not None else torch.zeros(b, dtype=torch.bool)
        x0 = torch.zeros(b, 4, size, size, device=device)
        mask = torch.ones(b, 1, size, size, device=device)
        if not bool(has_image.all()):  # host tensors: no device sync
            rows = host_to_device((~has_image).nonzero().flatten(), device)
            noise = pure_noise[rows]
            t_top = torch.full((len(rows),), models.num_train_timesteps - 1, dtype=torch.long, device=device)
            scale = None if cfg_scale is None else cfg_scale[rows]
            x0[rows] = self.x0(models, noise, self.teacher_eps(models, noise, t_top, teacher_ctx[rows], scale), t_top)
        if bool(has_image.any()):
            rows = has_image.nonzero().flatten()
            latents, masks = batch.photos.get(models, batch.image_index[rows].tolist(), size)
            rows = host_to_device(rows, device)
            x0[rows] = latents.to(x0)
            if use_masks:
                mask[rows] = masks
        return x0, mask

    def __call__(self, models: Models, batch: FaceBatch, generator: torch.Generator):
        cfg, device = self.config, models.device
        b = batch.id_vectors.shape[0]
        T = models.num_train_timesteps
        size = self.latent_size
        # Drawn on the host (the same draws on every device: exact resume), then copied without a sync.
        use_cfg = torch.rand(b, generator=generator) < cfg.cfg_prob
        cfg_scale = host_to_device(torch.where(use_cfg, _uniform(b, *cfg.cfg_scale, generator), torch.ones(b)), device)
        if not bool(use_cfg.any()):  # a host tensor: no device sync
            cfg_scale = None
        first_t = (_uniform(b, *cfg.first_t, generator) * (T - 1)).round().long()
        ratios = [host_to_device(_uniform(b, *cfg.next_t_ratio, generator), device) for _ in range(cfg.chain_steps - 1)]
        noises = [host_to_device(torch.randn(b, 4, size, size, generator=generator), device)
                  for _ in range(cfg.chain_steps + 1)]

        with torch.no_grad():
            enc = models.id_encoder(host_to_device(batch.id_vectors, device, models.frozen_dtype))
            teacher_ctx, id_tokens = enc.prompt_embeds.detach(), enc.id_tokens.detach()
            x0, mask = self.start_x0(models, batch, noises[-1], teacher_ctx, cfg_scale, cfg.use_masks)

        subject = models.inverter(id_tokens.float())
        student_ctx = models.encode_with_subject(self.student_prompts(b, generator), cfg.placeholder, subject)

        t = host_to_device(first_t, device)
        losses = []
        for i in range(cfg.chain_steps):
            x_t = self.noisy(models, x0, noises[i], t)
            eps_teacher = self.teacher_eps(models, x_t, t, teacher_ctx, cfg_scale)
            eps_student = self.student_eps(models, x_t, t, student_ctx, cfg_scale)
            sq = (eps_student - eps_teacher) ** 2 * mask
            losses.append(sq.sum() / (mask.sum() * sq.shape[1]).clamp_min(1.0))
            if i + 1 < cfg.chain_steps:
                with torch.no_grad():
                    x0 = self.x0(models, x_t, eps_teacher, t)
                    t = (t.float() * ratios[i]).round().long().clamp_min(1)
        loss = sum(losses) / math.sqrt(cfg.chain_steps)
        # Metrics stay tensors: the loop reads them back only at log steps (no sync per micro-batch).
        metrics = {f"loss_t{i}": l.detach() for i, l in enumerate(losses)}
        metrics["random_id_frac"] = (~batch.has_image).float().mean()
        return loss, metrics


class FaceStage:
    """Stage 1 as the loop sees it: a batch sampler and a loss over a batch."""

    name = "face"

    def __init__(self, face_space: FaceSpace, loss: FaceDistillationLoss):
        self.face_space = face_space
        self.loss_fn = loss

    def sample_batch(self, batch_size: int, generator: torch.Generator) -> FaceBatch:
        return self.face_space.sample(batch_size, generator)

    def loss(self, models: Models, batch: FaceBatch, generator: torch.Generator):
        return self.loss_fn(models, batch, generator)
