"""The diffusion training step (DDPM, Ho et al. 2020; latent diffusion, Rombach et al. 2022).

For a batch of clean latents x0 (VAE latents already multiplied by vae.config.scaling_factor, so they
have roughly unit variance) and text conditioning c:

    eps ~ N(0, I)                                   noise, same shape as x0
    t   ~ Uniform{0, ..., T-1}                      one timestep per sample
    x_t = sqrt(abar_t) * x0 + sqrt(1 - abar_t) * eps      (scheduler.add_noise; abar = alphas_cumprod)
    pred = U-Net(x_t, t, c)
    target = eps                                    for prediction_type "epsilon"
           = sqrt(abar_t) * eps - sqrt(1 - abar_t) * x0   for "v_prediction" (scheduler.get_velocity)
    loss = mean_i  w_i * mean_pixels (pred_i - target_i)^2

w_i = 1 normally. With Min-SNR-gamma weighting (Hang et al. 2023, "Efficient Diffusion Training via
Min-SNR Weighting Strategy"), SNR(t) = abar_t / (1 - abar_t) and

    w = min(SNR, gamma) / SNR          (epsilon prediction)
    w = min(SNR, gamma) / (SNR + 1)    (v prediction)

which stops the many easy low-noise timesteps from dominating the gradient.

Noise offset (Guttenberg 2023, "Diffusion with offset noise") adds a per-sample, per-channel constant
to eps, `eps += offset * N(0, 1)[b, c, 1, 1]`, so the model learns to shift the mean brightness.

All randomness (eps, t, offset) comes from the caller's `torch.Generator`, so a run is reproducible
and resumable bit for bit.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F


def make_noise_scheduler(scheduler_config: dict, prediction_type: str | None = None):
    """A DDPMScheduler with the model's noise schedule (betas, T), for training."""
    from diffusers import DDPMScheduler

    keep = {"num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
            "prediction_type", "steps_offset", "timestep_spacing", "rescale_betas_zero_snr"}
    cfg = {k: v for k, v in scheduler_config.items() if k in keep}
    if prediction_type is not None:
        cfg["prediction_type"] = prediction_type
    return DDPMScheduler(**cfg)


@dataclass
class StepTrace:
    """Every intermediate of one training step (for `trace-step`-style inspection and tests)."""

    latents: torch.Tensor  # x0, [B, C, h, w], already scaled
    noise: torch.Tensor  # eps, [B, C, h, w]
    timesteps: torch.Tensor  # t, [B] (long)
    noisy_latents: torch.Tensor  # x_t, [B, C, h, w]
    encoder_hidden_states: torch.Tensor  # c, [B, L, D]
    model_pred: torch.Tensor  # U-Net output, [B, C, h, w]
    target: torch.Tensor  # eps or v, [B, C, h, w]
    per_sample_loss: torch.Tensor  # mean squared error per sample, [B]
    weights: torch.Tensor  # Min-SNR weights (ones when off), [B]
    loss: torch.Tensor  # scalar

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {f.name: tuple(getattr(self, f.name).shape) for f in fields(self)}


def compute_snr(scheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """SNR(t) = abar_t / (1 - abar_t) for each timestep."""
    abar = scheduler.alphas_cumprod.to(device=timesteps.device)[timesteps].float()
    return abar / (1.0 - abar)


def diffusion_loss(
    unet: torch.nn.Module,
    latents: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    scheduler,
    generator: torch.Generator,
    *,
    prediction_type: str | None = None,
    min_snr_gamma: float | None = None,
    noise_offset: float = 0.0,
    timesteps: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    return_trace: bool = False,
    added_cond_kwargs: dict | None = None,
):
    """One denoising-loss evaluation; returns the scalar loss (or a `StepTrace` if `return_trace`).

    `latents` must already be scaled by the VAE's scaling_factor. `timesteps` / `noise` may be given
    to evaluate at fixed points (validation); otherwise they are drawn from `generator`.
    `added_cond_kwargs`: SDXL's {"text_embeds": pooled [B, P], "time_ids": [B, 6]} for the U-Net (None: SD1/SD2).
    """
    prediction_type = prediction_type or scheduler.config.prediction_type
    if prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', not {prediction_type!r}")
    # one memory layout (channels-last inputs make the convolutions give different bits, which would
    # break bit-exact resume)
    latents = latents.contiguous()
    b = latents.shape[0]
    dev = latents.device

    # eps ~ N(0, I)
    if noise is None:
        noise = torch.randn(latents.shape, generator=generator, device=dev, dtype=latents.dtype)
        if noise_offset:
            # eps += offset * N(0,1) per (sample, channel): lets the model change overall brightness
            noise = noise + noise_offset * torch.randn(
                (b, latents.shape[1], 1, 1), generator=generator, device=dev, dtype=latents.dtype)
    # t ~ U{0, ..., T-1}
    if timesteps is None:
        T = scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, T, (b,), generator=generator, device=dev, dtype=torch.long)

    # x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps
    noisy = scheduler.add_noise(latents, noise, timesteps)

    # U-Net prediction, conditioned on t and the text (`unet`: the diffusers U-Net or fast.TracedUNet)
    if added_cond_kwargs is None:
        pred = unet(noisy, timesteps, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]
    else:  # SDXL: pooled text + size/crop ids (the plain diffusers U-Net; the traced one takes three inputs)
        pred = unet(noisy, timesteps, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added_cond_kwargs,
                    return_dict=False)[0]

    # regression target: eps, or v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0
    if prediction_type == "epsilon":
        target = noise
    else:
        target = scheduler.get_velocity(latents, noise, timesteps)

    # per-sample MSE, in fp32 whatever the model's dtype
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))

    # Min-SNR-gamma weights
    if min_snr_gamma:
        snr = compute_snr(scheduler, timesteps)
        clipped = torch.clamp(snr, max=min_snr_gamma)
        weights = clipped / snr if prediction_type == "epsilon" else clipped / (snr + 1.0)
    else:
        weights = torch.ones_like(per_sample)
    loss = (per_sample * weights).mean()

    if not return_trace:
        return loss
    return StepTrace(latents, noise, timesteps, noisy, encoder_hidden_states, pred, target,
                     per_sample, weights, loss)
