"""Stand-in for ``comfy.sample``: ``prepare_noise`` as in ComfyUI, ``sample`` as a diffusers loop.

``sample`` runs diffusers' ``DPMSolverMultistepScheduler`` (DPM-Solver++ 2M, timesteps spaced
evenly from 999: what ComfyUI's ``dpmpp_2m`` sampler with the ``sgm_uniform`` scheduler computes)
on the SD1.5 noise schedule, with classifier-free guidance, calling ``callback(step, x0, x, total_steps)``
once per step as ComfyUI's samplers do (like them it never checks for interrupts itself: the
server's progress hook does, through the callback's progress bar). Like ComfyUI it
returns latents in the VAE's own scale (divided by SD1's 0.18215). Only full denoising from an
empty latent and one conditioning entry per side are supported: all the nodes use.
"""

from __future__ import annotations

import warnings

import torch

from . import model_management

SD1_LATENT_SCALE = 0.18215
SUPPORTED = {("dpmpp_2m", "sgm_uniform"): {"algorithm_type": "dpmsolver++", "solver_order": 2, "timestep_spacing": "linspace"}}


def prepare_noise(latent_image, seed, noise_inds=None):
    generator = torch.manual_seed(seed)
    return torch.randn(latent_image.size(), dtype=latent_image.dtype, layout=latent_image.layout, generator=generator, device="cpu")


def _context(conditioning, batch: int, device, dtype) -> torch.Tensor:
    if len(conditioning) != 1:
        raise NotImplementedError("the stand-in sampler takes one conditioning entry per side")
    cond = conditioning[0][0].to(device, dtype)
    return cond.expand(batch, -1, -1) if cond.shape[0] == 1 else cond


@torch.no_grad()
def sample(model, noise, steps, cfg, sampler_name, scheduler, positive, negative, latent_image, denoise=1.0,
           disable_noise=False, start_step=None, last_step=None, force_full_denoise=False, noise_mask=None,
           sigmas=None, callback=None, disable_pbar=False, seed=None):
    from diffusers import DPMSolverMultistepScheduler

    if (sampler_name, scheduler) not in SUPPORTED or denoise != 1.0:
        raise NotImplementedError(f"the stand-in sampler only runs {sorted(SUPPORTED)} at denoise 1, not {(sampler_name, scheduler, denoise)}")
    model_management.load_models_gpu([model])
    unet, device = model.model.diffusion_model, model.load_device
    dtype = next(unet.parameters()).dtype
    with warnings.catch_warnings():  # a numpy-2 deprecation inside diffusers' scheduler set-up
        warnings.simplefilter("ignore", DeprecationWarning)
        solver = DPMSolverMultistepScheduler(
            num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
            **SUPPORTED[(sampler_name, scheduler)],
        )
        solver.set_timesteps(steps)
    batch = noise.shape[0]
    context = torch.cat([_context(negative, batch, device, dtype), _context(positive, batch, device, dtype)])
    x = noise.to(device, dtype) * solver.init_noise_sigma
    alphas = solver.alphas_cumprod.to(device)
    for step, t in enumerate(solver.timesteps):
        eps_uncond, eps_cond = unet(torch.cat([x, x]), t, encoder_hidden_states=context).sample.chunk(2)
        eps = eps_uncond + cfg * (eps_cond - eps_uncond)
        alpha = alphas[int(t)]
        x0 = (x - (1 - alpha).sqrt() * eps) / alpha.sqrt()
        x = solver.step(eps, t, x).prev_sample
        if callback is not None:
            callback(step, x0 / SD1_LATENT_SCALE, x / SD1_LATENT_SCALE, steps)
    return (x / SD1_LATENT_SCALE).to(model_management.intermediate_device())
