"""Pretrain the embedded "shapes" model from scratch on the procedural shapes world.

Stage 1 (`vae`): an AutoencoderKL (32x32x3 -> 8x8x4) learns to reconstruct rendered scenes:
    loss = L1(x, x') + edge_weight * L1(grad x, grad x') + kl_weight * KL(q(z|x) || N(0, I))
where grad is the horizontal/vertical finite difference (keeps shape edges and stripes crisp) and
z ~ q(z|x) is sampled with the reparameterisation trick. It trains on every style (solid, striped,
outline), not only the pretraining style, so later style LoRAs have a VAE that can draw them.

Then the VAE is frozen, a fixed pool of scenes is rendered and encoded once (posterior mean and
log-variance cached), and the VAE's `scaling_factor` is set to 1/std of the latents (as SD did).

Stage 2 (`unet`): the CLIP text encoder and the U-Net train jointly with the shared diffusion step
(`sdknobs.training.step.diffusion_loss`): each step draws pool items, samples z = mu + sigma * n
from the cached posterior, re-captions the scenes with fresh wording, drops ~10% of captions to ""
(for classifier-free guidance) and regresses the noise. AdamW, linear warmup then cosine (or
constant) LR, optional EMA of the trained weights (kept if it has the lower validation loss).

Everything random is derived from the seed and the step, or drawn from generators whose state is
checkpointed, so `--resume` reaches bit-for-bit the same weights as an uninterrupted run.

It writes a new model folder (`--out`, default out/shapes-pretrain), never into the installed package (the
shipped `shapes` model stays as it is), and follows the trainer's rules (`training.runs`): everything is
checked before the run folder is created, Ctrl-C saves the last finished step, a non-finite loss stops
the run with a checkpoint kept to go on from at a lower learning rate.

Run: python -m sdknobs.shapes.pretrain [--flags from PretrainConfig]
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import platform
import random
import re
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from sdknobs.atomic import atomic_write, check_out_path, write_text
from sdknobs.errors import SdknobsError
from sdknobs.model import Model, check_device, save_model
from sdknobs.training.checkpoint import load_checkpoint, remove_stale, step_of
from sdknobs.training.plots import loss_curve_png
from sdknobs.training.runs import Guard, Keeper, check_folder, check_numbers, clear, resume_point
from sdknobs.training.step import diffusion_loss, make_noise_scheduler

STAGES = ("vae", "unet")
_PIECES = re.compile(r"[a-z]+|[0-9]|[^\sa-z0-9]+")  # CLIP's pre-tokenizer pieces, for lower-case ASCII captions


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(t) for t in str(text).replace(" ", "").split(",") if t)


@dataclass
class PretrainConfig:
    # --- where things go ---
    out: str = field(default="out/shapes-pretrain", metadata={"help": "output diffusers folder, new or empty (never inside the installed package; load it with --model FOLDER)"})
    run_dir: str = field(default="runs/pretrain", metadata={"help": "checkpoints, loss curves, samples and log go here"})
    resume: bool = field(default=False, metadata={"help": "continue from the newest whole checkpoint in --run-dir (a broken one is skipped)"})
    overwrite: bool = field(default=False, metadata={"help": "replace a model folder --out written earlier; without --resume, also start again from scratch over the checkpoints in --run-dir (they are deleted)"})
    seed: int = field(default=0, metadata={"help": "seed for the weights, the data and every random draw"})
    threads: int = field(default=2, metadata={"help": "torch CPU threads (torch.set_num_threads)"})
    device: str = field(default="cpu", metadata={"help": "torch device to train on (cpu or cuda)"})
    # --- architecture ---
    image_size: int = field(default=32, metadata={"help": "image side in pixels"})
    vae_channels: str = field(default="32,64,64", metadata={"help": "VAE block_out_channels, comma-separated (n blocks = 2**(n-1)x downsampling)"})
    unet_channels: str = field(default="64,128", metadata={"help": "U-Net block_out_channels, comma-separated"})
    layers_per_block: int = field(default=2, metadata={"help": "U-Net resnet layers per block"})
    text_width: int = field(default=64, metadata={"help": "CLIP text encoder width = U-Net cross-attention width"})
    text_layers: int = field(default=2, metadata={"help": "CLIP text encoder layers"})
    heads: int = field(default=2, metadata={"help": "attention heads (text encoder and U-Net)"})
    prediction_type: str = field(default="epsilon", metadata={"help": "U-Net target: epsilon or v_prediction"})
    # --- stage 1: VAE ---
    vae_steps: int = field(default=2000, metadata={"help": "VAE training steps"})
    vae_batch: int = field(default=32, metadata={"help": "VAE batch size (freshly rendered scenes every step)"})
    vae_lr: float = field(default=1e-3, metadata={"help": "VAE peak learning rate (AdamW)"})
    vae_warmup: int = field(default=50, metadata={"help": "VAE linear warmup steps"})
    vae_kl_weight: float = field(default=1e-6, metadata={"help": "weight of the KL term (per-sample sum) in the VAE loss"})
    vae_mse_weight: float = field(default=1.0, metadata={"help": "weight of the MSE term added to L1 in the VAE loss (MSE keeps small shapes from being averaged into the background)"})
    vae_edge_weight: float = field(default=0.5, metadata={"help": "weight of the L1 loss on image gradients (edges)"})
    vae_init_logvar: float = field(default=-6.0, metadata={"help": "initial posterior log-variance (encoder output bias); near 0 the sampling noise drowns the latents and the VAE collapses to a blurry mean"})
    vae_styles: str = field(default="solid,striped,outline", metadata={"help": "shape styles the VAE trains on, comma-separated"})
    # --- stage 2: text encoder + U-Net ---
    unet_steps: int = field(default=3000, metadata={"help": "text encoder + U-Net training steps"})
    unet_minutes: float = field(default=0.0, metadata={"help": "wall-clock budget for stage 2 (0 = none): after the first 100 steps, --unet-steps is lowered so the stage ends in about this time (the cosine schedule then follows the new total)"})
    unet_batch: int = field(default=64, metadata={"help": "U-Net batch size"})
    unet_lr: float = field(default=5e-4, metadata={"help": "U-Net peak learning rate (AdamW)"})
    text_lr: float = field(default=5e-4, metadata={"help": "text encoder peak learning rate (AdamW)"})
    warmup_steps: int = field(default=200, metadata={"help": "U-Net stage linear warmup steps"})
    lr_schedule: str = field(default="cosine", metadata={"help": "after warmup: cosine (down to --min-lr-ratio) or constant"})
    min_lr_ratio: float = field(default=0.1, metadata={"help": "cosine schedule floor, as a fraction of the peak LR"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay (U-Net stage)"})
    grad_clip: float = field(default=1.0, metadata={"help": "gradient-norm clipping (0 = off)"})
    caption_dropout: float = field(default=0.1, metadata={"help": "fraction of captions replaced by '' (for classifier-free guidance)"})
    min_snr_gamma: float = field(default=5.0, metadata={"help": "Min-SNR loss weighting gamma (0 = off)"})
    noise_offset: float = field(default=0.0, metadata={"help": "offset-noise strength (0 = off)"})
    ema_decay: float = field(default=0.999, metadata={"help": "EMA decay of the trained weights (0 = no EMA)"})
    latent_pool: int = field(default=30000, metadata={"help": "scenes rendered and encoded once for stage 2"})
    pool_p_two: float = field(default=0.3, metadata={"help": "fraction of two-shape scenes in the stage-2 pool (more teaches attribute binding)"})
    val_size: int = field(default=256, metadata={"help": "held-out scenes for validation (PSNR / denoising loss)"})
    # --- bookkeeping ---
    checkpoint_every: int = field(default=250, metadata={"help": "save a checkpoint every N steps (each stage)"})
    keep_checkpoints: int = field(default=2, metadata={"help": "checkpoints kept per stage (older ones deleted)"})
    eval_every: int = field(default=250, metadata={"help": "validation every N steps"})
    log_every: int = field(default=10, metadata={"help": "record the (mean) loss every N steps"})
    sample_steps: int = field(default=30, metadata={"help": "DDIM steps for the final sample grid (0 = no grid)"})
    guidance: float = field(default=3.0, metadata={"help": "classifier-free guidance scale for the sample grid"})
    samples: int = field(default=16, metadata={"help": "prompts in the final sample grid"})
    save_fp16: bool = field(default=True, metadata={"help": "store the U-Net and VAE weights in fp16 (they load as fp32); the text encoder stays fp32"})
    progress: bool = field(default=True, metadata={"help": "show tqdm progress bars"})

    def __post_init__(self):
        def need(ok, msg):
            if not ok:
                raise SdknobsError(msg)

        check_numbers(self, seeds=("seed",))
        check_device(self.device)
        try:
            vae_ch, unet_ch = _ints(self.vae_channels), _ints(self.unet_channels)
        except ValueError as e:
            raise SdknobsError(f"--vae-channels / --unet-channels must be comma-separated integers: {e}") from e
        need(len(vae_ch) >= 1 and all(c > 0 and c % 2 == 0 for c in vae_ch), f"--vae-channels {self.vae_channels!r}: need positive even integers")
        need(len(unet_ch) >= 2 and all(c > 0 and c % 2 == 0 for c in unet_ch), f"--unet-channels {self.unet_channels!r}: need >= 2 positive even integers")
        down = 2 ** (len(vae_ch) - 1)
        need(self.image_size > 0 and self.image_size % down == 0, f"--image-size {self.image_size} must be a multiple of {down} (VAE downsampling)")
        latent = self.image_size // down
        udown = 2 ** (len(unet_ch) - 1)
        need(latent % udown == 0, f"--image-size {self.image_size}: latent side {latent} must be a multiple of {udown} (U-Net downsampling)")
        need(self.image_size % 8 == 0, f"--image-size {self.image_size} must be a multiple of 8 (diffusers pipelines require it)")
        need(self.text_width > 0 and self.heads > 0 and self.text_width % self.heads == 0,
             f"--text-width {self.text_width} must be a positive multiple of --heads {self.heads}")
        need(self.prediction_type in ("epsilon", "v_prediction"), f"--prediction-type {self.prediction_type!r}: choose epsilon or v_prediction")
        need(self.lr_schedule in ("cosine", "constant"), f"--lr-schedule {self.lr_schedule!r}: choose cosine or constant")
        from sdknobs.shapes.world import STYLES

        styles = [s for s in self.vae_styles.split(",") if s]
        need(styles and all(s in STYLES for s in styles), f"--vae-styles {self.vae_styles!r}: choose from {', '.join(STYLES)}")
        for name in ("vae_steps", "unet_steps", "vae_batch", "unet_batch", "checkpoint_every", "eval_every",
                     "log_every", "latent_pool", "val_size", "threads", "layers_per_block", "text_layers"):
            need(getattr(self, name) > 0, f"--{name.replace('_', '-')} must be > 0, got {getattr(self, name)}")
        for name in ("vae_warmup", "warmup_steps", "sample_steps", "keep_checkpoints", "samples"):
            need(getattr(self, name) >= 0, f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        for name in ("vae_lr", "unet_lr", "text_lr"):
            need(getattr(self, name) > 0, f"--{name.replace('_', '-')} must be > 0, got {getattr(self, name)}")
        for name in ("vae_kl_weight", "vae_mse_weight", "vae_edge_weight", "weight_decay", "grad_clip", "min_snr_gamma", "noise_offset", "guidance"):
            need(getattr(self, name) >= 0, f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        need(0 <= self.pool_p_two <= 1, f"--pool-p-two must be in [0, 1], got {self.pool_p_two}")
        need(0 <= self.caption_dropout < 1, f"--caption-dropout must be in [0, 1), got {self.caption_dropout}")
        need(0 <= self.ema_decay < 1, f"--ema-decay must be in [0, 1) (0 = off), got {self.ema_decay}")
        need(0 <= self.min_lr_ratio <= 1, f"--min-lr-ratio must be in [0, 1], got {self.min_lr_ratio}")
        most = max(8, 4 * (os.cpu_count() or 1))  # torch crashes when asked for far more threads than cores
        need(self.threads <= most, f"--threads {self.threads}: at most {most} (4 x this machine's cores)")
        need(self.unet_minutes >= 0, f"--unet-minutes must be >= 0 (0 = no budget), got {self.unet_minutes}")

    @property
    def vae_channel_tuple(self) -> tuple[int, ...]:
        return _ints(self.vae_channels)

    @property
    def unet_channel_tuple(self) -> tuple[int, ...]:
        return _ints(self.unet_channels)

    @property
    def latent_size(self) -> int:
        return self.image_size // 2 ** (len(self.vae_channel_tuple) - 1)


# ---------------------------------------------------------------------------------------------
# small helpers


def lr_factor(step: int, total: int, warmup: int, schedule: str = "cosine", floor: float = 0.1) -> float:
    """Multiplier of the peak LR at optimizer step `step` (0-based): linear warmup, then cosine
    from 1 down to `floor` at the last step, or constant 1."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    span = max(1, total - warmup - 1)
    progress = min(1.0, (step - warmup) / span)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def _seed_for(seed: int, *parts) -> int:
    """A stable 63-bit seed derived from the run seed and a label (not Python's salted hash)."""
    return random.Random(":".join(str(p) for p in (seed, *parts))).getrandbits(63)


def psnr(x: torch.Tensor, y: torch.Tensor) -> float:
    """PSNR in dB of images in [-1, 1] (peak-to-peak 2), over the whole batch."""
    mse = F.mse_loss(x.clamp(-1, 1).float(), y.clamp(-1, 1).float()).item()
    return float("inf") if mse == 0 else 10 * math.log10(4.0 / mse)


def _grads(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x[..., :, 1:] - x[..., :, :-1], x[..., 1:, :] - x[..., :-1, :]


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    # e <- e + (1 - decay) * (p - e), one fused call over all tensors (foreach: few kernel launches on GPU)
    torch._foreach_lerp_(list(ema.parameters()), [p.detach() for p in model.parameters()], 1.0 - decay)


def _to_uint8_grid(images: torch.Tensor, cols: int, scale: int = 3):
    """[n,3,H,W] in [-1,1] -> PIL grid, upscaled `scale`x with nearest neighbour."""
    from PIL import Image

    n, _, h, w = images.shape
    rows = math.ceil(n / cols)
    arr = ((images.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    grid = Image.new("RGB", (cols * (w * scale + 2), rows * (h * scale + 2)), (255, 255, 255))
    for i in range(n):
        tile = Image.fromarray(arr[i]).resize((w * scale, h * scale), Image.NEAREST)
        grid.paste(tile, ((i % cols) * (w * scale + 2), (i // cols) * (h * scale + 2)))
    return grid


class _Progress:
    """tqdm when asked for and available, else a quiet counter."""

    def __init__(self, enabled: bool, total: int, initial: int, desc: str):
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, mininterval=2.0)

    def update(self, **postfix):
        if self.bar is not None:
            self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(1)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def _log(msg: str) -> None:
    print(f"[pretrain {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _warn(msg: str) -> None:
    print(f"sdknobs: {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# the run


class _Run:
    def __init__(self, cfg: PretrainConfig):
        from sdknobs.tiny import build_model

        self.cfg = cfg
        self.dir = Path(cfg.run_dir)
        self.device = torch.device(cfg.device)
        self.model: Model = build_model(
            seed=cfg.seed, sample_size=cfg.latent_size, vae_channels=cfg.vae_channel_tuple,
            unet_channels=cfg.unet_channel_tuple, text_width=cfg.text_width, text_layers=cfg.text_layers,
            heads=cfg.heads, layers_per_block=cfg.layers_per_block, prediction_type=cfg.prediction_type,
        ).to(self.device)
        with torch.no_grad():  # start with a small posterior variance (see --vae-init-logvar)
            conv_out = self.model.vae.encoder.conv_out
            conv_out.bias[conv_out.out_channels // 2:] = cfg.vae_init_logvar
        self.history: dict[str, list] = {"vae_loss": [], "vae_psnr": [], "unet_loss": [], "unet_val": [], "unet_val_ema": []}
        self.elapsed = {"vae": 0.0, "cache": 0.0, "unet": 0.0}
        self.token_cache: dict[str, torch.Tensor] = {}
        self.word_cache: dict[str, list[int]] = {}

    # --- shared ---
    def _extra(self, stage: str) -> dict:
        return {"stage": stage, "history": self.history, "elapsed": self.elapsed,
                "scaling_factor": float(self.model.vae.config.scaling_factor),
                "config": dataclasses.asdict(self.cfg)}

    def _restore_extra(self, extra: dict) -> None:
        self.history = {k: [tuple(p) for p in v] for k, v in extra["history"].items()}
        self.elapsed = dict(extra["elapsed"])
        self.model.vae.register_to_config(scaling_factor=float(extra["scaling_factor"]))

    def _plot(self) -> None:
        h = self.history
        if h["vae_loss"]:
            loss_curve_png(self.dir / "loss_vae.png", {"train loss (L1+edge+KL)": h["vae_loss"]},
                           title="stage 1: VAE", log_y=True)
            if h["vae_psnr"]:
                loss_curve_png(self.dir / "psnr_vae.png", {"val PSNR (dB)": h["vae_psnr"]},
                               title="stage 1: VAE reconstruction", ylabel="PSNR dB")
        if h["unet_loss"]:
            series = {"train loss (min-SNR weighted)": h["unet_loss"]}
            if h["unet_val"]:
                series["val loss (eps MSE)"] = h["unet_val"]
            if h["unet_val_ema"]:
                series["val loss, EMA weights"] = h["unet_val_ema"]
            loss_curve_png(self.dir / "loss_unet.png", series, title="stage 2: text encoder + U-Net", log_y=True)

    # --- stage 1 ---
    def vae_batch(self, step: int) -> torch.Tensor:
        from sdknobs.shapes.world import make_batch

        styles = tuple(s for s in self.cfg.vae_styles.split(",") if s)
        x, _, _ = make_batch(self.cfg.vae_batch, _seed_for(self.cfg.seed, "vae", step), self.cfg.image_size, styles=styles)
        return x.to(self.device)

    def vae_val(self) -> torch.Tensor:
        from sdknobs.shapes.world import STYLES, make_batch

        x, _, _ = make_batch(self.cfg.val_size, _seed_for(self.cfg.seed, "vae-val"), self.cfg.image_size, styles=STYLES)
        return x.to(self.device)

    @torch.no_grad()
    def eval_vae(self, x_val: torch.Tensor) -> float:
        vae = self.model.vae
        was = vae.training
        vae.eval()
        recon = torch.cat([vae.decode(vae.encode(x).latent_dist.mode()).sample for x in x_val.split(128)])
        vae.train(was)
        return psnr(recon, x_val)

    def guard(self, stage: str, resume_from: Path | None, save, lr_flags: str, start: int) -> Guard:
        keeper = Keeper(self.dir, stage, self.cfg.keep_checkpoints, resumed=resume_from)
        lr = " / ".join(f"{f} (now {getattr(self.cfg, f[2:].replace('-', '_')):g})" for f in lr_flags.split())
        return Guard(keeper, lambda done: save(keeper, done), lr, _warn, start, label=f"stage {STAGES.index(stage) + 1}: ")

    def train_vae(self, resume_from: Path | None, data=None) -> None:
        cfg, vae = self.cfg, self.model.vae
        vae.train().requires_grad_(True)
        opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
        gen = torch.Generator(self.device).manual_seed(_seed_for(cfg.seed, "vae-gen"))
        start = 0
        if resume_from is not None:
            st = load_checkpoint(resume_from, modules={"vae": vae}, optimizers={"vae": opt}, generators={"vae": gen},
                                 data=data)
            start = st["step"]
            self._restore_extra(st["extra"])
            _log(f"resumed stage 1 from {resume_from} at step {start}")
        x_val = self.vae_val()
        bar = _Progress(cfg.progress, cfg.vae_steps, start, "stage 1 VAE")
        acc, n_acc, t0 = 0.0, 0, time.time()

        def save(keeper: Keeper, done: int) -> None:
            nonlocal t0
            self.elapsed["vae"] += time.time() - t0
            t0 = time.time()
            keeper.save(done, modules={"vae": vae}, optimizers={"vae": opt}, generators={"vae": gen},
                        extra=self._extra("vae"))
            self._plot()

        with self.guard("vae", resume_from, save, "--vae-lr", start) as guard:
            for step in range(start, cfg.vae_steps):
                if guard.stop:
                    break
                loss = self.vae_step(step, vae, opt, gen)
                done = step + 1
                guard.step_done(done, loss, vae.parameters())
                acc += loss
                n_acc += 1
                if done % cfg.log_every == 0 or done == cfg.vae_steps:
                    self.history["vae_loss"].append((done, acc / n_acc))
                    acc, n_acc = 0.0, 0
                if done % cfg.eval_every == 0 or done == cfg.vae_steps:
                    p = self.eval_vae(x_val)
                    self.history["vae_psnr"].append((done, p))
                    _log(f"stage 1 step {done}/{cfg.vae_steps}: loss {loss:.4f}, val PSNR {p:.2f} dB")
                bar.update(loss=f"{loss:.4f}")
                if done % cfg.checkpoint_every == 0 or done == cfg.vae_steps:
                    save(guard.keeper, done)
        bar.close()
        guard.keeper.finish()
        self.elapsed["vae"] += time.time() - t0
        vae.eval().requires_grad_(False)
        with torch.no_grad():
            recon = vae.decode(vae.encode(x_val[:16]).latent_dist.mode()).sample
        img = _to_uint8_grid(torch.cat([x_val[:16], recon]), cols=16)
        atomic_write(self.dir / "vae_reconstructions.png", lambda tmp: img.save(tmp, format="PNG"))

    def vae_step(self, step: int, vae, opt, gen) -> float:
        """One stage-1 step; a non-finite loss is returned before the weights change."""
        cfg = self.cfg
        for g in opt.param_groups:
            g["lr"] = cfg.vae_lr * lr_factor(step, cfg.vae_steps, cfg.vae_warmup, "cosine", cfg.min_lr_ratio)
        x = self.vae_batch(step)
        post = vae.encode(x).latent_dist
        z = post.sample(generator=gen)  # reparameterised sample z = mu + sigma * n
        recon = vae.decode(z).sample
        l1 = (recon - x).abs().mean()
        gx, gy = _grads(x)
        rx, ry = _grads(recon)
        edge = (rx - gx).abs().mean() + (ry - gy).abs().mean()
        kl = post.kl().mean()  # sum over latent dims, mean over the batch
        mse = (recon - x).pow(2).mean()
        loss = l1 + cfg.vae_mse_weight * mse + cfg.vae_edge_weight * edge + cfg.vae_kl_weight * kl
        value = loss.item()
        if not math.isfinite(value):
            return value
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(vae.parameters(), cfg.grad_clip)
        opt.step()
        return value

    # --- latent cache ---
    def pool_scenes(self):
        """The fixed stage-2 pool: images and scenes (default pretraining distribution)."""
        from sdknobs.shapes.world import make_batch

        chunk = 1000
        for i in range(0, self.cfg.latent_pool, chunk):
            x, _, scenes = make_batch(min(chunk, self.cfg.latent_pool - i), _seed_for(self.cfg.seed, "pool", i),
                                      self.cfg.image_size, p_two=self.cfg.pool_p_two)
            yield x, scenes

    def build_cache(self) -> None:
        """Encode the pool once: posterior mean / logvar per scene; set the VAE scaling factor."""
        from safetensors.torch import load_file, save_file

        cfg, vae = self.cfg, self.model.vae
        vae.eval().requires_grad_(False)
        t0 = time.time()
        path = self.dir / "latent_cache.safetensors"
        key = json.dumps({k: getattr(cfg, k) for k in ("seed", "image_size", "vae_channels", "latent_pool", "vae_steps", "pool_p_two")}, sort_keys=True)
        self.scenes = []
        cached = None
        if path.exists():
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:
                if (f.metadata() or {}).get("key") == key:
                    cached = load_file(str(path))
        means, logvars = [], []
        bar = _Progress(cfg.progress, cfg.latent_pool, 0, "encode pool" if cached is None else "pool scenes")
        with torch.no_grad():
            for x, scenes in self.pool_scenes():
                self.scenes.extend(scenes)
                if cached is None:
                    for xb in x.to(self.device).split(500):
                        post = vae.encode(xb).latent_dist
                        means.append(post.mean)
                        logvars.append(post.logvar)
                if bar.bar is not None:
                    bar.bar.update(len(scenes))
        bar.close()
        if cached is None:
            # contiguous: the encoder may return channels-last tensors, and the U-Net's convolutions give
            # different bits for a different memory layout (a resumed run reads the cache back contiguous)
            self.mean, self.logvar = torch.cat(means).contiguous(), torch.cat(logvars).contiguous()
            # scaling factor = 1 / std of posterior samples over the pool (as SD computed it)
            g = torch.Generator(self.device).manual_seed(_seed_for(cfg.seed, "scale"))
            z = self.mean + torch.exp(0.5 * self.logvar) * torch.randn(self.mean.shape, generator=g, device=self.device, dtype=self.mean.dtype)
            scale = float(1.0 / z.float().std())
            tensors = {"mean": self.mean.cpu().contiguous(), "logvar": self.logvar.cpu().contiguous(),
                       "scaling_factor": torch.tensor([scale], dtype=torch.float64)}
            atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"key": key}))
            self.elapsed["cache"] += time.time() - t0
            _log(f"encoded {len(self.scenes)} pool scenes in {time.time() - t0:.0f}s; latent std {1 / scale:.4f} "
                 f"-> scaling_factor {scale:.5f}; latent mean {self.mean.mean().item():.4f}")
        else:
            self.mean, self.logvar = cached["mean"].to(self.device).contiguous(), cached["logvar"].to(self.device).contiguous()
            scale = float(cached["scaling_factor"].item())
            _log(f"loaded the latent cache {path} (scaling_factor {scale:.5f})")
        self.model.vae.register_to_config(scaling_factor=scale)

    # --- stage 2 ---
    def tokens(self, captions: list[str]) -> torch.Tensor:
        """Token ids [B, 77] of captions, assembled from per-word ids. CLIP's BPE never merges across
        its pre-tokenizer's pieces (runs of letters; runs of other non-space characters), and the
        world's captions use few words, so caching those pieces gives the tokenizer's exact ids at a
        fraction of its cost (the tokenizer was the bottleneck of large-batch GPU steps; a test checks
        equality with the tokenizer)."""
        tok = self.model.tokenizer
        n = tok.model_max_length
        rows = []
        for c in captions:
            row = self.token_cache.get(c)
            if row is None:
                ids = [tok.bos_token_id]
                for piece in _PIECES.findall(c.lower()):
                    if piece not in self.word_cache:
                        self.word_cache[piece] = tok(piece, add_special_tokens=False).input_ids
                    ids += self.word_cache[piece]
                ids = ids[: n - 1] + [tok.eos_token_id]
                row = torch.tensor(ids + [tok.pad_token_id] * (n - len(ids)))
                if len(self.token_cache) < 500_000:
                    self.token_cache[c] = row
            rows.append(row)
        return torch.stack(rows).to(self.device)

    def unet_batch(self, step: int, gen: torch.Generator):
        """(scaled latents, captions) for one step: pool items, posterior samples, fresh captions."""
        from sdknobs.shapes.world import caption

        cfg = self.cfg
        idx = torch.randint(0, self.mean.shape[0], (cfg.unet_batch,), generator=gen, device=self.device)
        mean, logvar = self.mean[idx], self.logvar[idx]
        z = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=gen, device=self.device, dtype=mean.dtype)
        rng = random.Random(_seed_for(cfg.seed, "captions", step))
        caps = []
        for i in idx.tolist():
            text = caption(self.scenes[i], rng)
            caps.append("" if rng.random() < cfg.caption_dropout else text)
        return z * self.model.latent_scale, caps

    def val_set(self):
        from sdknobs.shapes.world import make_batch

        x, caps, _ = make_batch(self.cfg.val_size, _seed_for(self.cfg.seed, "unet-val"), self.cfg.image_size)
        g = torch.Generator(self.device).manual_seed(_seed_for(self.cfg.seed, "unet-val-noise"))
        with torch.no_grad():
            z = self.model.vae.encode(x.to(self.device)).latent_dist.mode() * self.model.latent_scale
        noise = torch.randn(z.shape, generator=g, device=self.device)
        t = torch.randint(0, self.sched.config.num_train_timesteps, (z.shape[0],), generator=g, device=self.device)
        return z, self.tokens(caps), noise, t

    @torch.no_grad()
    def eval_unet(self, unet, text_encoder, val) -> float:
        """Plain (unweighted) denoising MSE at fixed noise and timesteps on held-out scenes."""
        z, ids, noise, t = val
        modes = (unet.training, text_encoder.training)
        unet.eval()
        text_encoder.eval()
        total = 0.0
        for sl in torch.arange(z.shape[0]).split(128):
            ehs = text_encoder(ids[sl])[0]
            total += diffusion_loss(unet, z[sl], ehs, self.sched, None, noise=noise[sl], timesteps=t[sl]).item() * len(sl)
        unet.train(modes[0])
        text_encoder.train(modes[1])
        return total / z.shape[0]

    def train_unet(self, resume_from: Path | None, data=None) -> None:
        cfg, m = self.cfg, self.model
        unet, te = m.unet, m.text_encoder
        self.sched = make_noise_scheduler(m.scheduler_config, cfg.prediction_type)
        unet.train().requires_grad_(True)
        te.train().requires_grad_(True)
        opt = torch.optim.AdamW([
            {"params": list(unet.parameters()), "lr": cfg.unet_lr, "base_lr": cfg.unet_lr},
            {"params": list(te.parameters()), "lr": cfg.text_lr, "base_lr": cfg.text_lr},
        ], weight_decay=cfg.weight_decay)
        gen = torch.Generator(self.device).manual_seed(_seed_for(cfg.seed, "unet-gen"))
        ema = None
        if cfg.ema_decay:
            ema = {"ema_unet": copy.deepcopy(unet).eval().requires_grad_(False),
                   "ema_text_encoder": copy.deepcopy(te).eval().requires_grad_(False)}
        modules = {"unet": unet, "text_encoder": te, "vae": m.vae, **(ema or {})}
        start = 0
        if resume_from is not None:
            st = load_checkpoint(resume_from, modules=modules, optimizers={"unet": opt}, generators={"unet": gen},
                                 data=data)
            for g, lr in zip(opt.param_groups, (cfg.unet_lr, cfg.text_lr)):
                g["base_lr"] = lr  # this session's --unet-lr / --text-lr (lower after a non-finite loss)
            start = st["step"]
            self._restore_extra(st["extra"])
            _log(f"resumed stage 2 from {resume_from} at step {start}")
        self.build_cache()
        val = self.val_set()
        bar = _Progress(cfg.progress, cfg.unet_steps, start, "stage 2 U-Net")
        acc, n_acc, t0 = 0.0, 0, time.time()
        params = [p for g in opt.param_groups for p in g["params"]]
        t_budget = time.time()
        step = start

        def save(keeper: Keeper, done: int) -> None:
            nonlocal t0
            self.elapsed["unet"] += time.time() - t0
            t0 = time.time()
            keeper.save(done, modules=modules, optimizers={"unet": opt}, generators={"unet": gen},
                        extra=self._extra("unet"))
            self._plot()

        with self.guard("unet", resume_from, save, "--unet-lr --text-lr", start) as guard:
            while step < cfg.unet_steps:
                if guard.stop:
                    break
                if cfg.unet_minutes and step == start + 100 and step < cfg.warmup_steps:
                    # fit the budget: measured rate x remaining time, fixed while still in warmup so the
                    # cosine part of the schedule is planned once with the final total
                    rate = 100 / (time.time() - t_budget)
                    fit = int(step + rate * (cfg.unet_minutes * 60 - (time.time() - t_budget)) * 0.9)
                    if fit < cfg.unet_steps:
                        _log(f"stage 2: {rate:.1f} steps/s; --unet-minutes {cfg.unet_minutes:g} -> {fit} steps (was {cfg.unet_steps})")
                        cfg.unet_steps = max(fit, cfg.warmup_steps + 1)
                        bar.bar is not None and setattr(bar.bar, "total", cfg.unet_steps)
                f = lr_factor(step, cfg.unet_steps, cfg.warmup_steps, cfg.lr_schedule, cfg.min_lr_ratio)
                for g in opt.param_groups:
                    g["lr"] = g["base_lr"] * f
                latents, caps = self.unet_batch(step, gen)
                ehs = te(self.tokens(caps))[0]  # last hidden state, as StableDiffusionPipeline uses
                loss = diffusion_loss(unet, latents, ehs, self.sched, gen, prediction_type=cfg.prediction_type,
                                      min_snr_gamma=cfg.min_snr_gamma or None, noise_offset=cfg.noise_offset)
                if not torch.isfinite(loss):
                    guard.step_done(step + 1, loss.item())  # stops the run, before the weights change
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.grad_clip:
                    torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                opt.step()
                if ema:
                    # decay warms up so the average is not dominated by the random initialisation
                    d = min(cfg.ema_decay, (1 + step) / (10 + step))
                    ema_update(ema["ema_unet"], unet, d)
                    ema_update(ema["ema_text_encoder"], te, d)
                acc += loss.item()
                n_acc += 1
                done = step + 1
                guard.step_done(done, loss.item(), params)
                if done % cfg.log_every == 0 or done == cfg.unet_steps:
                    self.history["unet_loss"].append((done, acc / n_acc))
                    acc, n_acc = 0.0, 0
                if done % cfg.eval_every == 0 or done == cfg.unet_steps:
                    v = self.eval_unet(unet, te, val)
                    self.history["unet_val"].append((done, v))
                    msg = f"stage 2 step {done}/{cfg.unet_steps}: loss {loss.item():.4f}, val {v:.4f}"
                    if ema:
                        ve = self.eval_unet(ema["ema_unet"], ema["ema_text_encoder"], val)
                        self.history["unet_val_ema"].append((done, ve))
                        msg += f", val (EMA) {ve:.4f}"
                    _log(msg)
                bar.update(loss=f"{loss.item():.4f}", lr=f"{opt.param_groups[0]['lr']:.1e}")
                if done % cfg.checkpoint_every == 0 or done == cfg.unet_steps:
                    save(guard.keeper, done)
                step += 1
        bar.close()
        guard.keeper.finish()
        self.elapsed["unet"] += time.time() - t0
        self.used_ema = False
        if ema and self.history["unet_val_ema"] and self.history["unet_val_ema"][-1][1] <= self.history["unet_val"][-1][1]:
            unet.load_state_dict(ema["ema_unet"].state_dict())
            te.load_state_dict(ema["ema_text_encoder"].state_dict())
            self.used_ema = True
        self.final_val = self.eval_unet(unet, te, val)
        unet.eval().requires_grad_(False)
        te.eval().requires_grad_(False)

    # --- output ---
    def export(self) -> Path:
        cfg, m = self.cfg, self.model
        out = Path(cfg.out)
        export = Model(m.tokenizer, copy.deepcopy(m.text_encoder).cpu(), copy.deepcopy(m.unet).cpu(),
                       copy.deepcopy(m.vae).cpu(), dict(m.scheduler_config), family="shapes", source="pretrain")
        if cfg.save_fp16:
            # U-Net and VAE in fp16 (diffusers loads them back as fp32 by default). The text encoder stays
            # fp32: transformers 5 loads a model in its stored dtype unless told otherwise, and an fp16
            # text encoder breaks a plain `StableDiffusionPipeline.from_pretrained(folder)` on the CPU.
            export.unet.to(dtype=torch.float16)
            export.vae.to(dtype=torch.float16)
        save_model(export, out)
        write_text(out / "README.md", self.readme())
        return out

    def readme(self) -> str:
        cfg, m, h = self.cfg, self.model, self.history
        n = lambda mod: sum(p.numel() for p in mod.parameters())  # noqa: E731
        psnr_final = h["vae_psnr"][-1][1] if h["vae_psnr"] else float("nan")
        cmd = "python -m sdknobs.shapes.pretrain " + " ".join(shlex.quote(a) for a in sys.argv[1:])
        changed = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)
                   if getattr(cfg, f.name) != (f.default if f.default is not dataclasses.MISSING else None)}
        total = sum(self.elapsed.values())
        return f"""# shapes: a tiny Stable-Diffusion-shaped model of the procedural shapes world

Trained from scratch by `sdknobs.shapes.pretrain` (nothing downloaded, no pretrained weights).
Loads with `sdknobs.model.load_model("shapes")` (fp32) and with
`diffusers.StableDiffusionPipeline.from_pretrained(<this folder>)`.

## Data
`sdknobs.shapes.world`: {cfg.image_size}x{cfg.image_size} renders of one or two shapes (circle, square,
triangle, star, heart; 6 colours, 2 sizes, 5 positions) on a white, black or gray background, with
generated English captions. Stars and hearts are only ever captioned "shape". The text encoder and
U-Net saw only the solid style ({cfg.latent_pool} fixed scenes, re-captioned every step,
{cfg.caption_dropout:.0%} of captions dropped to "" for classifier-free guidance); the VAE was also
trained on the striped and outline styles ({cfg.vae_styles}) so later style LoRAs can be decoded.

## Architecture
- VAE (AutoencoderKL): block_out_channels {cfg.vae_channel_tuple}, 4 latent channels,
  {cfg.image_size}px -> {cfg.latent_size}x{cfg.latent_size} latents, {n(m.vae) / 1e6:.2f}M params,
  scaling_factor {m.latent_scale:.5f} (= 1 / std of the pool's latents).
- Text encoder (CLIPTextModel): {cfg.text_layers} layers, width {cfg.text_width}, {cfg.heads} heads,
  CLIP's 49,408-token BPE vocabulary, 77 positions; {n(m.text_encoder) / 1e6:.2f}M params.
- U-Net (UNet2DConditionModel): block_out_channels {cfg.unet_channel_tuple}, {cfg.layers_per_block}
  layers per block, cross-attention width {cfg.text_width}; {n(m.unet) / 1e6:.2f}M params.
- Scheduler: SD's scaled_linear betas 0.00085-0.012, 1000 steps, prediction_type {cfg.prediction_type},
  clip_sample False (DDIM for sampling).
- Weights stored in {"fp16 (U-Net, VAE) and fp32 (text encoder)" if cfg.save_fp16 else "fp32"}.

## Training
- Stage 1 (VAE): {cfg.vae_steps} steps of batch {cfg.vae_batch} (fresh renders every step), AdamW lr
  {cfg.vae_lr:g}, warmup {cfg.vae_warmup} then cosine; loss L1 + {cfg.vae_edge_weight:g} x L1 of image
  gradients + {cfg.vae_kl_weight:g} x KL. Final validation PSNR {psnr_final:.2f} dB
  ({cfg.val_size} held-out scenes, all styles, posterior mode). Time {self.elapsed['vae'] / 60:.1f} min.
- Latent cache: {cfg.latent_pool} scenes encoded once in {self.elapsed['cache'] / 60:.1f} min;
  every step re-samples z from the cached posterior.
- Stage 2 (text encoder + U-Net, jointly): {cfg.unet_steps} steps of batch {cfg.unet_batch}, AdamW
  (lr U-Net {cfg.unet_lr:g}, text {cfg.text_lr:g}, weight decay {cfg.weight_decay:g}), warmup
  {cfg.warmup_steps} then {cfg.lr_schedule}, grad clip {cfg.grad_clip:g}, Min-SNR gamma
  {cfg.min_snr_gamma:g}, noise offset {cfg.noise_offset:g}, EMA {cfg.ema_decay:g}
  ({"EMA weights shipped" if getattr(self, "used_ema", False) else "raw weights shipped"}: lower
  validation loss). Final validation denoising MSE {getattr(self, "final_val", float("nan")):.4f}.
  Time {self.elapsed['unet'] / 60:.1f} min.
- Total training time {total / 60:.1f} min (stages resumed from checkpoints count the machine they ran
  on); this run finished on device {cfg.device}{f" ({torch.cuda.get_device_name()})" if cfg.device.startswith("cuda") else ""},
  {platform.machine()} host with {os.cpu_count()} cores, torch {torch.__version__}, {platform.platform()}.
- Finished {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.

## Reproduce
    {cmd}

Settings that differ from the PretrainConfig defaults: {json.dumps({k: v for k, v in changed.items() if k not in ("out", "progress")})}
"""

    @torch.no_grad()
    def sample_grid(self, out: Path) -> None:
        """Generate from the saved folder with diffusers' own pipeline; grid of truth vs sample."""
        from diffusers import DDIMScheduler, StableDiffusionPipeline

        from sdknobs.shapes.world import caption, render, sample_scene

        cfg = self.cfg
        if not cfg.sample_steps or not cfg.samples:
            return
        pipe = StableDiffusionPipeline.from_pretrained(str(out), torch_dtype=torch.float32, safety_checker=None,
                                                       requires_safety_checker=False, local_files_only=True)
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        rng = random.Random(_seed_for(cfg.seed, "samples"))
        scenes = [sample_scene(rng, p_two=0.0) for _ in range(cfg.samples)]
        prompts = [caption(s, rng) for s in scenes]
        g = torch.Generator("cpu").manual_seed(cfg.seed)
        imgs = pipe(prompts, num_inference_steps=cfg.sample_steps, guidance_scale=cfg.guidance,
                    height=cfg.image_size, width=cfg.image_size, generator=g, output_type="pt").images
        truth = torch.stack([torch.from_numpy(np.array(render(s, cfg.image_size))).permute(2, 0, 1)
                             for s in scenes]).float() / 127.5 - 1
        cols = min(8, cfg.samples)
        rows = []
        for i in range(0, cfg.samples, cols):
            rows += [truth[i:i + cols], imgs[i:i + cols] * 2 - 1]
        grid = _to_uint8_grid(torch.cat(rows), cols=cols)
        atomic_write(self.dir / "samples.png", lambda tmp: grid.save(tmp, format="PNG"))
        write_text(self.dir / "samples.txt",
            "rows alternate: rendered truth, then the model's sample for the same prompt\n"
            + "\n".join(f"{i:2d}: {p}" for i, p in enumerate(prompts)) + "\n")


def _outside_package(path: Path, what: str) -> None:
    """Pretraining never writes into the installed package (the shipped model and code live there)."""
    import sdknobs

    pkg = Path(sdknobs.__file__).resolve().parent
    target = path.expanduser().resolve()
    if target == pkg or pkg in target.parents:
        raise SdknobsError(f"{what} {str(path)!r} is inside the installed sdknobs package ({pkg}); pretraining never "
                           f"writes there: choose a folder outside it, e.g. --out out/shapes-pretrain, and load the "
                           f"result with --model FOLDER")


def _check_memory(cfg: PretrainConfig) -> None:
    """Refuse sizes that cannot fit: a lower bound of what the run holds at once, against free RAM (or GPU memory)."""
    from sdknobs.model import available_memory

    dev = torch.device(cfg.device)
    avail = available_memory(dev)
    if avail is None:
        return
    lat, f32 = cfg.latent_size, 4
    parts = {
        "the latent pool (--latent-pool)": cfg.latent_pool * 2 * 4 * lat * lat * f32,
        "one VAE batch's first activations (--vae-batch, --image-size, --vae-channels)":
            cfg.vae_batch * max(cfg.vae_channel_tuple) * cfg.image_size**2 * f32,
        "one U-Net batch's first activations (--unet-batch, --unet-channels)": cfg.unet_batch * max(cfg.unet_channel_tuple) * lat * lat * f32,
        "the widest U-Net convolution with its AdamW state (--unet-channels)": 3 * 9 * max(cfg.unet_channel_tuple) ** 2 * f32,
    }
    need = sum(parts.values())
    if need > 0.8 * avail:
        name, most = max(parts.items(), key=lambda kv: kv[1])
        raise SdknobsError(f"this pretraining needs at least {need / 2**30:.1f} GiB of memory, {most / 2**30:.1f} GiB of it for "
                           f"{name}; {avail / 2**30:.1f} GiB are free on {dev.type}: make it smaller")


def pretrain(cfg: PretrainConfig) -> Path:
    """Run (or resume) both stages and write the diffusers folder `cfg.out`; returns its path.

    Checked before anything is created: --out (outside the package, a new or empty folder, or with
    --overwrite a model folder), --run-dir, and what it holds (see training.runs.resume_point)."""
    out, run_dir = Path(cfg.out), Path(cfg.run_dir)
    for path, what in ((out, "--out"), (run_dir, "--run-dir")):
        _outside_package(path, what)
    check_folder(run_dir, "--run-dir")
    stage, ckpt, data = resume_point(run_dir, STAGES, cfg.resume, cfg.overwrite, out, _warn) or (None, None, None)
    same_out = ckpt is not None and Path(str(data[1]["extra"].get("config", {}).get("out", ""))).absolute() == out.absolute()
    check_out_path(out, "--out", overwrite=cfg.overwrite or same_out, folder=True)
    _check_memory(cfg)
    torch.set_num_threads(cfg.threads)
    if cfg.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 matmuls: fp32 range, ~10-bit mantissa, much faster
    if cfg.overwrite and not cfg.resume:
        clear(run_dir, STAGES)
    remove_stale(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    run = _Run(cfg)
    write_text(run_dir / "config.json", json.dumps(dataclasses.asdict(cfg), indent=2))
    if stage == "vae" and step_of(ckpt) >= cfg.vae_steps:
        st = load_checkpoint(ckpt, modules={"vae": run.model.vae}, data=data)
        run._restore_extra(st["extra"])
        run.model.vae.eval().requires_grad_(False)
        _log(f"stage 1 already done ({ckpt.name})")
    elif stage != "unet":
        run.train_vae(ckpt, data)
    run.train_unet(ckpt if stage == "unet" else None, data)
    run._plot()
    out = run.export()
    _log(f"wrote {out} ({sum(f.stat().st_size for f in out.rglob('*') if f.is_file()) / 1e6:.1f} MB)")
    run.sample_grid(out)
    _log(f"done in {(time.time() - t_start) / 60:.1f} min this session; samples in {run_dir / 'samples.png'}")
    return out


# ---------------------------------------------------------------------------------------------
# command line (the `sdknobs pretrain` CLI builds the same flags from PretrainConfig's fields)


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    from sdknobs.flags import add_config_args

    parser = parser or argparse.ArgumentParser(prog="python -m sdknobs.shapes.pretrain", description=__doc__.splitlines()[0])
    add_config_args(parser, PretrainConfig)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = PretrainConfig(**vars(args))
        pretrain(cfg)
    except SdknobsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
