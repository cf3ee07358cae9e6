"""The denoising loop. txt2img, img2img, inpainting and outpainting all call `denoise`.

Notation (DDPM/DDIM papers): x_0 is a clean latent, eps noise, abar_t = prod_{s<=t} (1 - beta_s),
and the forward process is  x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps   (scheduler.add_noise).

- txt2img starts from pure noise at the first timestep (strength 1).
- img2img starts from the forward process applied to the image's latent at a later timestep:
  with S steps and strength s, init = int(S * s) steps are run, starting at index S - init.
- inpainting keeps the unmasked region on the forward-process path of the original at every step:
  z <- m * z_denoised + (1 - m) * forward(x_0, t_next)  with one fixed eps; after the last step, x_0.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from tqdm.auto import tqdm

from sdknobs.errors import SdknobsError

# name -> (diffusers class, config overrides, A1111 sampler name for PNG metadata)
SCHEDULERS = {
    "ddim": ("DDIMScheduler", {}, "DDIM"),
    "euler": ("EulerDiscreteScheduler", {}, "Euler"),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}, "Euler a"),
    "dpm++2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "use_karras_sigmas": False}, "DPM++ 2M"),
    "dpm++2m-karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "use_karras_sigmas": True}, "DPM++ 2M Karras"),
    "ddpm": ("DDPMScheduler", {}, "DDPM"),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}, "PLMS"),
}


def make_scheduler(name: str, config: dict):
    """A diffusers scheduler by our short name, configured from the model's scheduler config."""
    import diffusers

    if name not in SCHEDULERS:
        raise SdknobsError(f"--scheduler {name!r} is not known; choose one of {', '.join(SCHEDULERS)}")
    cls_name, overrides, _ = SCHEDULERS[name]
    cfg = {k: v for k, v in config.items() if not k.startswith("_")}
    return getattr(diffusers, cls_name).from_config({**cfg, **overrides})


SEED_MAX = 2**64 - 1  # torch.Generator.manual_seed takes 64 bits


def check_seed(seed: int, what: str = "--seed") -> None:
    """-1 (draw one, A1111's habit) or 0..2**64-1."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not (seed == -1 or 0 <= seed <= SEED_MAX):
        raise SdknobsError(f"{what} must be -1 (random) or an integer in 0..{SEED_MAX}, got {seed!r}")


def resolve_seed(seed: int) -> int:
    """The seed a run uses: -1 becomes a fresh random one (recorded with the picture)."""
    check_seed(seed)
    if seed == -1:
        import secrets

        return secrets.randbelow(2**32)
    return seed


def check_strength(strength: float) -> None:
    if not 0.0 <= strength <= 1.0:  # also refuses NaN
        raise SdknobsError(f"--strength must be in [0, 1], got {strength}")


def start_index(steps: int, strength: float) -> int:
    """Index into the schedule where img2img starts: strength s runs int(steps * s) of `steps` steps."""
    check_strength(strength)
    init = min(int(steps * strength), steps)
    return steps - init


@dataclass
class StartInfo:
    index: int  # first step run (0 = txt2img)
    steps_run: int
    timestep: float  # t at which denoising starts
    alpha_bar: float  # abar_t there: the share of the image's signal variance that survives


def check_steps(steps: int, scheduler_config: dict, what: str = "--steps") -> None:
    """1 <= steps <= the scheduler's training timesteps (diffusers refuses more)."""
    most = int(scheduler_config.get("num_train_timesteps", 1000))
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= most:
        raise SdknobsError(f"{what} must be an integer in 1..{most} (the scheduler's training timesteps), got {steps!r}")


def prepare_timesteps(scheduler, steps: int, strength: float, device) -> tuple[torch.Tensor, StartInfo]:
    check_steps(steps, scheduler.config)
    scheduler.set_timesteps(steps, device=device)
    if len(scheduler.timesteps) and float(scheduler.timesteps.max()) >= len(scheduler.alphas_cumprod):
        most = len(scheduler.alphas_cumprod) - int(scheduler.config.get("steps_offset", 0))
        raise SdknobsError(f"--steps {steps}: {type(scheduler).__name__} with this model's schedule reaches timestep "
                           f"{int(scheduler.timesteps.max())}, past its last ({len(scheduler.alphas_cumprod) - 1}); "
                           f"use at most {most} steps")
    i0 = start_index(steps, strength)
    timesteps = scheduler.timesteps[i0 * scheduler.order :]
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(i0 * scheduler.order)
    if len(timesteps) == 0:
        return timesteps, StartInfo(i0, 0, float("nan"), 1.0)
    t0 = timesteps[0]
    abar = float(scheduler.alphas_cumprod[int(round(float(t0)))])
    return timesteps, StartInfo(i0, steps - i0, float(t0), abar)


def denoise(
    unet,
    scheduler,
    cond: torch.Tensor,
    uncond: torch.Tensor | None,
    *,
    steps: int,
    guidance: float,
    shape: tuple[int, ...],
    generator: torch.Generator,
    x0: torch.Tensor | None = None,
    strength: float = 1.0,
    mask: torch.Tensor | None = None,
    callback: Callable[[dict], None] | None = None,
    progress: bool = True,
    before_step: Callable[[int, torch.Tensor, int], None] | None = None,
    added_cond: tuple[dict | None, dict | None] | None = None,
) -> tuple[torch.Tensor, StartInfo]:
    """Run the sampler and return the final latent (in U-Net space) and where it started.

    cond/uncond: text embeddings [B, 77, D]; uncond None means no classifier-free guidance.
    generator: one, or one per image (diffusers' convention: image i's noise, and its fresh noise in
      ancestral samplers, come from generator i alone).
    x0: the clean starting latent (img2img / inpainting), already scaled by the VAE scaling factor.
    strength: 1.0 starts from pure noise (x0 then only serves the kept region of a mask).
    mask: [B or 1, 1, h, w] on the latent grid, 1 = repaint, 0 = keep x0.
    callback: called after every step with {"i", "t", "x", "steps"}.
    before_step: called as before_step(i, t, steps) before each U-Net call, i counted in the full schedule
      (LoRA timestep windows switch adapters here).
    added_cond: (uncond's, cond's) extra U-Net inputs `added_cond_kwargs` (SDXL: {"text_embeds", "time_ids"}, from
      `Family.added_cond`), batched like cond/uncond; None for families whose U-Net takes none.
    """
    device, dtype = cond.device, cond.dtype
    timesteps, info = prepare_timesteps(scheduler, steps, strength, device)
    if mask is not None and x0 is None:
        raise SdknobsError("denoise: a mask needs the starting latent x0")
    if strength < 1.0 and x0 is None:
        raise SdknobsError("denoise: strength < 1 needs the starting latent x0")
    from diffusers.utils.torch_utils import randn_tensor

    eps = randn_tensor(shape, generator=generator, device=device, dtype=dtype)  # the one fixed noise (per image for a list)
    if strength >= 1.0:
        x = eps * scheduler.init_noise_sigma
    else:
        x = scheduler.add_noise(x0, eps, timesteps[:1].repeat(shape[0]))  # x_t = sqrt(abar) x0 + sqrt(1-abar) eps
    context = cond if uncond is None else torch.cat([uncond, cond])
    unet_kwargs = {}
    if added_cond is not None and added_cond[1] is not None:
        a_u, a_c = added_cond
        unet_kwargs["added_cond_kwargs"] = a_c if uncond is None else {k: torch.cat([a_u[k], a_c[k]]) for k in a_c}
    # DDIM takes eta (0: deterministic); ancestral samplers take the generator for their fresh noise.
    extra = {}
    if "generator" in scheduler.step.__code__.co_varnames:
        extra["generator"] = generator
    for i, t in enumerate(tqdm(timesteps, desc="denoise", disable=not progress, leave=False)):
        if before_step is not None:
            before_step(info.index + i, t, steps)
        xin = x if uncond is None else torch.cat([x, x])
        xin = scheduler.scale_model_input(xin, t)
        pred = unet(xin, t, encoder_hidden_states=context, return_dict=False, **unet_kwargs)[0]
        if uncond is not None:
            pred_u, pred_c = pred.chunk(2)
            pred = pred_u + guidance * (pred_c - pred_u)
        x = scheduler.step(pred, t, x, **extra, return_dict=False)[0]
        if mask is not None:
            # Keep region follows the forward process of the original to the next timestep.
            kept = x0 if i == len(timesteps) - 1 else scheduler.add_noise(x0, eps, timesteps[i + 1 : i + 2])
            x = (1 - mask) * kept + mask * x
        if callback is not None:
            callback({"i": info.index + i, "t": t, "x": x, "steps": steps})
    return x, info
