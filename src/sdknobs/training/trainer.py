"""The one training engine behind `train-lora` and `train-ti`.

What differs between LoRA and textual inversion is a `Method`: which parameters are trainable
(`setup`, `parameters`), how captions are written (`caption`), how text is encoded (`encode_text`),
what is restored after each optimizer step (`after_optimizer_step`) and what file is written (`save`).
Everything else is here: data, the latent cache, the shared diffusion step
(`training.step.diffusion_loss`), prior preservation, AdamW + LR schedule, gradient accumulation,
clipping, mixed precision, checkpoints and exact resume, validation and Accelerate.

One optimizer step (s = step index, a = grad_accum, r/w = process rank/world):
    for k < a:  batch_k = dataset.batch(s*a + k, batch_size, r, w)          instance (+ class) images
                x0 = scaling_factor * z,  z ~ q(z | image)                      frozen VAE (or cached posterior)
                c  = method.encode_text(method.caption(caption))                 text conditioning
                l_i = w_snr(t_i) * || f(x_t, t_i, c) - target_i ||^2             diffusion_loss, per sample
                L_k = mean_{instance} l_i + prior_loss_weight * mean_{class} l_i
                backward(L_k / a)
    grads <- mean over processes; clip to max_grad_norm; AdamW step; LR schedule step;
    method.after_optimizer_step()
Every random draw of step s on rank r comes from one generator seeded by (seed, s, r), and the global
torch RNG (dropout) is reseeded the same way, so a resumed run equals an uninterrupted one bit for bit.

Multi-process (Accelerate): modules are NOT wrapped in DistributedDataParallel. The trainable weights
live inside modules the Method and the pipelines call directly (peft LoRA layers inside the U-Net, TI's
rows inside the text encoder's embedding), and a DDP wrapper would hide their attributes. Instead the
trainable parameters are broadcast from rank 0 once, and after the `a` micro-batches their gradients are
averaged with one all-reduce (what DDP does, bucketed). The optimizer is prepared by Accelerate (device
placement, fp16 loss scaling) and only the main process validates and writes files.
"""
from __future__ import annotations

import dataclasses
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from sdknobs.config import _f  # config fields with help text (lora/ti import it from here)
from sdknobs.errors import SdknobsError
from sdknobs.fast import training_unet
from sdknobs.model import available_memory
from sdknobs.training.checkpoint import NonFiniteWeights, load_checkpoint, nonfinite, remove_stale, remove_stale_file
from sdknobs.training.data import CaptionedDataset, Example, read_folder, seed_for, split_validation
from sdknobs.training.dist import _Dist, accelerator_from_env  # noqa: F401  (re-exported)
from sdknobs.training.method import (Method, ParamSubsetMethod, _atomic_write_text, _named_parameters,  # noqa: F401
                                     atomic_save_file)
from sdknobs.training.plots import loss_curve_png
from sdknobs.training.runs import Guard, Keeper, check_file, check_folder, check_numbers, clear, resume_point
from sdknobs.training.step import StepTrace, diffusion_loss, make_noise_scheduler

LR_SCHEDULERS = ("constant", "cosine", "linear")
MIXED_PRECISION = ("no", "fp16", "bf16")
VAL_TIMESTEPS = 4  # validation loss: each held-out image at t = (k + 1/2) T / 4, k = 0..3, fixed noise
STAGE = "train"  # checkpoint folders are run_dir/ckpt-train-<step>
MAX_RESOLUTION = 4096
METHOD_NAMES = {"lora": "a LoRA (train-lora)", "ti": "a textual-inversion (train-ti)"}


@dataclass
class TrainConfig:
    """Options shared by train-lora and train-ti (every field has a default, so methods can subclass)."""

    data_dir: str = _f("", "folder of training images with captions (<name>.txt files or metadata.jsonl)", required=True)
    out: str = _f("", "the final file to write (e.g. out/my.safetensors)")
    run_dir: str = _f("", "checkpoints, validation grids, loss curve and log (default: <out without suffix>-run)")
    model: str = _f("shapes", "base model: a diffusers folder, a single-file checkpoint, or an embedded name")
    model_config: str = _f("", "for a single-file checkpoint of another architecture: a diffusers folder with its configs")
    device: str = _f("", "cpu, cuda, cuda:1 ... (default: cuda if available; under accelerate launch, its device)")
    mixed_precision: str = _f("no", "no, fp16 or bf16: autocast compute (trainable weights stay fp32); fp16 needs a GPU")
    # None = the model's default (training/defaults.py: its sdknobs.json, else its family's, else "fallback")
    steps: int | None = _f(None, "optimizer steps", type=int, fallback=500)
    learning_rate: float | None = _f(None, "AdamW peak learning rate", type=float, fallback=1e-4)
    batch_size: int | None = _f(None, "images per micro-batch per process (class images come on top)", type=int,
                                fallback=1)
    grad_accum: int = _f(1, "micro-batches per optimizer step (gradient accumulation)")
    seed: int = _f(0, "seed for data order, augmentation, noise and timesteps")
    resolution: int = _f(0, "training image side in px, a multiple of 8 (0 = the model's default size)")
    center_crop: bool = _f(True, "centre-crop after resizing the shorter side (else crop at the top-left)")
    repeats: int = _f(1, "times each image appears per epoch (kohya's repeats)")
    flip: bool = _f(False, "random horizontal flips")
    caption_dropout: float = _f(0.0, "probability a caption is replaced by '' (keeps classifier-free guidance working)")
    lr_scheduler: str = _f("constant", f"learning-rate schedule after warmup: {', '.join(LR_SCHEDULERS)}")
    lr_warmup_steps: int = _f(0, "linear warmup steps from 0 to --learning-rate")
    weight_decay: float = _f(1e-2, "AdamW decoupled weight decay")
    max_grad_norm: float = _f(1.0, "clip the gradient norm to this (0 = off)")
    min_snr_gamma: float | None = _f(None, "Min-SNR loss weighting gamma (0 = off; 5 is usual)", type=float, fallback=0.0)
    noise_offset: float = _f(0.0, "offset-noise strength (0 = off; ~0.05 lets the model change overall brightness)")
    cache_latents: bool = _f(False, "encode each image once with the frozen VAE (posterior mean and std; both orientations with --flip) and sample from the cache")
    gradient_checkpointing: bool = _f(False, "recompute activations in the backward pass (less memory, slower)")
    jit: bool = _f(True, "record the U-Net's forward once per input shape (TorchScript, fast.TracedUNet): same bits "
                   "and gradients as eager, without Python per module; not used with --gradient-checkpointing or "
                   "--mixed-precision")
    class_data_dir: str = _f("", "prior preservation: folder of class images with their own captions")
    prior_loss_weight: float = _f(1.0, "weight of the class images' loss (prior preservation)")
    checkpoint_every: int = _f(100, "save a checkpoint every N steps (0 = only at the end)")
    keep_checkpoints: int = _f(2, "checkpoints kept in --run-dir (older ones deleted; 0 = keep all)")
    resume: bool = _f(False, "continue from the newest whole checkpoint in --run-dir (a broken one is skipped)")
    overwrite: bool = _f(False, "replace an existing --out file; without --resume, also start again from scratch over "
                                "the checkpoints of an earlier run in --run-dir (they are deleted)")
    validate_every: int = _f(100, "validation every N steps, and at the start and the end (0 = off)")
    validation_prompts: list = _f([], "prompts for the validation image grid (none: no grid)")
    validation_split: int = _f(0, "images held out of training for the validation loss")
    validation_steps: int = _f(20, "sampler steps for the validation grid")
    validation_guidance: float = _f(5.0, "guidance scale for the validation grid")
    validation_seeds: list = _f([0, 1], "seeds (grid columns) for the validation grid", type=int)
    sample_prompts: str = _f("", "a text file of prompts rendered at every validation into <run-dir>/samples, one PNG "
                                 "each with its parameters: one prompt a line, with kohya's per-line options --n "
                                 "NEGATIVE, --s STEPS, --l GUIDANCE, --d SEED, --w WIDTH, --h HEIGHT ('#' = comment)")
    save_every: int = _f(0, "every N steps also write the LoRA / embedding as it is then, in the final file's format "
                            "and metadata, into --run-dir as <out name>-<step, 6 digits><suffix> (kohya's "
                            "NAME-000200.safetensors); 0 = off")
    progress: bool = _f(True, "show a progress bar")

    def __post_init__(self):
        def need(ok, msg):
            if not ok:
                raise SdknobsError(msg)

        need(bool(self.data_dir), "--data-dir is required: a folder of images with captions")
        check_numbers(self)
        if self.device:
            from sdknobs.model import check_device

            check_device(self.device)
        need(bool(self.out), "--out is required: the file to write")
        need(self.mixed_precision in MIXED_PRECISION, f"--mixed-precision {self.mixed_precision!r}: choose one of {', '.join(MIXED_PRECISION)}")
        need(self.lr_scheduler in LR_SCHEDULERS, f"--lr-scheduler {self.lr_scheduler!r}: choose one of {', '.join(LR_SCHEDULERS)}")
        for name in ("steps", "batch_size", "grad_accum", "repeats", "validation_steps"):
            need(getattr(self, name) is None or getattr(self, name) >= 1, f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for name in ("resolution", "lr_warmup_steps", "checkpoint_every", "keep_checkpoints", "validate_every",
                     "validation_split", "weight_decay", "max_grad_norm", "min_snr_gamma", "noise_offset",
                     "prior_loss_weight", "validation_guidance", "save_every"):
            need(getattr(self, name) is None or getattr(self, name) >= 0, f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        need(self.learning_rate is None or self.learning_rate > 0, f"--learning-rate must be > 0, got {self.learning_rate}")
        need(self.resolution <= MAX_RESOLUTION, f"--resolution {self.resolution} is above {MAX_RESOLUTION}")
        need(0 <= self.caption_dropout < 1, f"--caption-dropout must be in [0, 1), got {self.caption_dropout}")
        need(self.resolution % 8 == 0, f"--resolution {self.resolution} is not a multiple of 8")
        need(all(isinstance(p, str) for p in self.validation_prompts), "--validation-prompts must be strings")
        need(len(self.validation_seeds) >= 1 or not self.validation_prompts, "--validation-seeds needs at least one seed")
        if self.sample_prompts:
            from sdknobs.training.samples import read_sample_prompts

            read_sample_prompts(self.sample_prompts)  # every line checked now, before any training
            need(bool(self.validate_every), f"--sample-prompts {self.sample_prompts!r} is rendered at validations, but "
                 f"--validate-every 0 never validates; give --validate-every N")
        need(not self.validation_split or self.validate_every, f"--validation-split {self.validation_split} holds images "
             f"out of training, but --validate-every 0 never validates; give --validate-every N or --validation-split 0")

    @property
    def run_path(self) -> Path:
        return Path(self.run_dir) if self.run_dir else Path(self.out).with_name(Path(self.out).stem + "-run")


@dataclass
class TrainResult:
    out: Path
    run_dir: Path
    steps: int
    seconds: float  # wall time of this call (a resumed run counts only its own part)
    train_loss: list[tuple[int, float]]  # (step, loss of that step, averaged over micro-batches and processes)
    val_loss: list[tuple[int, float]]  # (step, held-out loss at fixed t and noise); step 0 = before training
    trainable_params: int


def _set_checkpointing(m: torch.nn.Module, on: bool) -> None:
    """Gradient (activation) checkpointing on a diffusers or transformers module (non-reentrant)."""
    if hasattr(m, "enable_gradient_checkpointing"):  # diffusers
        m.enable_gradient_checkpointing() if on else m.disable_gradient_checkpointing()
    elif hasattr(m, "activation_checkpointing_enable"):  # transformers >= 5
        m.activation_checkpointing_enable({"use_reentrant": False}) if on else m.activation_checkpointing_disable()
    else:
        m.gradient_checkpointing_enable({"use_reentrant": False}) if on else m.gradient_checkpointing_disable()


def _flat_params(params) -> list[torch.nn.Parameter]:
    return [p for item in params for p in (item["params"] if isinstance(item, dict) else [item])]


def load_for_training(cfg: TrainConfig):
    """The base model in fp32 (trainable weights must be fp32; --mixed-precision autocasts the compute)."""
    from sdknobs.model import load_model

    return load_model(cfg.model, device=cfg.device or None, dtype="fp32", config=cfg.model_config or None)


class _MethodState:
    """Lets checkpoint.save/load_checkpoint treat a Method like a module."""

    def __init__(self, method: Method):
        self.method = method

    def state_dict(self):
        return self.method.state_dict()

    def load_state_dict(self, sd, strict=True):
        self.method.load_state_dict(sd)


class _Session:
    """Everything one training run holds: data, frozen model + method, optimizer, schedules, caches."""

    def __init__(self, model, method: Method, cfg: TrainConfig, dist: _Dist):
        from diffusers.optimization import get_scheduler

        from sdknobs.images import check_multiple
        from sdknobs.loop import check_steps

        self.model, self.method, self.cfg, self.dist = model, method, cfg, dist
        self.res = cfg.resolution or model.default_size
        check_multiple("--resolution", self.res, model.size_multiple)
        if cfg.validation_prompts:
            check_steps(cfg.validation_steps, model.scheduler_config, "--validation-steps")
        self.samples = []
        if cfg.sample_prompts:  # each line against this model: its size multiple and scheduler
            from sdknobs.training.samples import read_sample_prompts

            self.samples = read_sample_prompts(cfg.sample_prompts)
            for sp in self.samples:
                where = f"{cfg.sample_prompts} line {sp.line}"
                for side, v in (("--w", sp.width), ("--h", sp.height)):
                    if v is not None and v % model.size_multiple:
                        raise SdknobsError(f"{where}: {side} {v} is not a multiple of {model.size_multiple}, as this "
                                           f"model needs")
                check_steps(sp.steps or cfg.validation_steps, model.scheduler_config,
                            f"{where}: --s" if sp.steps else "--validation-steps")
        need, free = cfg.batch_size * (1 + bool(cfg.class_data_dir)) * 3 * self.res**2 * 4, available_memory()
        if free is not None and need > 0.8 * free:  # a lower bound: the micro-batch's images alone
            raise SdknobsError(f"--batch-size {cfg.batch_size} at resolution {self.res} needs at least {need / 2**30:.1f} GiB "
                               f"of memory for one micro-batch's images, more than the {free / 2**30:.1f} GiB free; lower "
                               f"it (--grad-accum N trains on N micro-batches per step)")
        if any(p.device != dist.device for m in model.components().values() for p in m.parameters()):
            model.to(dist.device)
        # data: instance images (minus the held-out ones) and class images
        examples = read_folder(cfg.data_dir, resolution=self.res, center_crop=cfg.center_crop,
                               require_captions=method.needs_captions)
        train_ex, self.val_ex = split_validation(examples, cfg.validation_split, cfg.seed)
        class_ex = (read_folder(cfg.class_data_dir, resolution=self.res, center_crop=cfg.center_crop,
                                what="--class-data-dir") if cfg.class_data_dir else [])
        self.data = CaptionedDataset(train_ex, repeats=cfg.repeats, flip=cfg.flip, caption_dropout=cfg.caption_dropout,
                                     class_examples=class_ex, seed=cfg.seed)
        # parameters: freeze everything, let the method attach its weights, train only those
        for m in model.components().values():
            m.requires_grad_(False)
        method.setup(model)
        groups = method.parameters()
        self.params = _flat_params(groups)
        if not self.params:
            raise SdknobsError(f"method {method.name!r} has no trainable parameters")
        ids = {id(p) for p in self.params}
        for p in _named_parameters(model).values():
            p.requires_grad_(id(p) in ids)
        for p in self.params:
            p.requires_grad_(True)
            if p.dtype in (torch.float16, torch.bfloat16):
                raise SdknobsError(f"trainable parameters are {p.dtype}: load the model in fp32 (load_for_training) "
                                   f"and use --mixed-precision for half-precision compute")
        if any(id(p) in ids for p in model.vae.parameters()):
            raise SdknobsError(f"method {method.name!r} trains VAE weights; the trainer keeps the VAE frozen")
        self.trainable_modules = [m for name, m in model.components().items()  # (SDXL: text_encoder_2 too)
                                  if name != "vae" and any(id(p) in ids for p in m.parameters())]
        self.n_params = sum(p.numel() for p in self.params)
        dist.broadcast(self.params)  # every process starts from rank 0's weights (as DDP does)
        # fused: one kernel per step for all tensors instead of ~10 ops per tensor (LoRA has ~100 small
        # ones); elsewhere foreach (a few batched ops), which torch enables by default only on the GPU
        fused = all(p.device.type in ("cpu", "cuda") and p.dtype == torch.float32 for p in self.params)
        self.opt = torch.optim.AdamW(groups, lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                                     fused=fused or None, foreach=None if fused else True)
        if dist.acc:
            self.opt = dist.acc.prepare_optimizer(self.opt)
        # diffusers' schedules; "constant" = constant after warmup
        name = "constant_with_warmup" if cfg.lr_scheduler == "constant" else cfg.lr_scheduler
        self.sched = get_scheduler(name, self.opt, num_warmup_steps=cfg.lr_warmup_steps, num_training_steps=cfg.steps)
        self.noise_sched = make_noise_scheduler(model.scheduler_config)
        if cfg.gradient_checkpointing:
            for m in self.trainable_modules:
                _set_checkpointing(m, True)
        # the training step's U-Net: traced (identical results, less Python) unless checkpointing or autocast
        # would have to be recorded too
        self.unet = training_unet(model.unet, cfg.jit and not cfg.gradient_checkpointing and not dist.amp
                                  and not model.spec.size_conditioning)  # (the traced U-Net takes no added_cond)
        self.cache = self._encode_all(class_ex + train_ex, both_flips=cfg.flip) if cfg.cache_latents else None
        self._val = None

    # --- latents ---
    @torch.no_grad()
    def _encode_all(self, examples: list[Example], both_flips: bool) -> dict:
        """(path, flipped) -> (posterior mean, std) of the frozen VAE, for every image (and its mirror)."""
        vae, out = self.model.vae, {}
        items = [(e, f) for e in examples for f in ((False, True) if both_flips else (False,))]
        for i in range(0, len(items), 16):
            chunk = items[i:i + 16]
            x = torch.stack([e.image.flip(-1) if f else e.image for e, f in chunk]).to(self.dist.device, vae.dtype)
            post = vae.encode(x).latent_dist
            for (e, f), mu, sd in zip(chunk, post.mean, post.std):
                out[(e.path, f)] = (mu.contiguous(), sd.contiguous())
        return out

    @torch.no_grad()
    def latents(self, batch: list[Example], g: torch.Generator) -> torch.Tensor:
        """x0 = scaling_factor * z, z = mu + sigma * n ~ q(z | image) (reparameterised, n from the step generator)."""
        vae = self.model.vae
        if self.cache is not None:
            mu = torch.stack([self.cache[(e.path, e.flipped)][0] for e in batch])
            sd = torch.stack([self.cache[(e.path, e.flipped)][1] for e in batch])
            z = mu + sd * torch.randn(mu.shape, generator=g, device=mu.device, dtype=mu.dtype)
        else:
            x = torch.stack([e.image for e in batch]).to(self.dist.device, vae.dtype)
            z = vae.encode(x).latent_dist.sample(generator=g)
        return (z * self.model.latent_scale).contiguous()

    # --- the step ---
    def micro_loss(self, batch: list[Example], g: torch.Generator) -> tuple[torch.Tensor, StepTrace]:
        cfg, model = self.cfg, self.model
        x0 = self.latents(batch, g)
        captions = ["" if e.dropped else self.method.caption(e.caption, e) for e in batch]
        self.last_captions = captions
        with self.dist.autocast():
            c, pooled = self.method.encode(model, captions)
            tr = diffusion_loss(self.unet, x0, c, self.noise_sched, g, prediction_type=model.prediction_type,
                                min_snr_gamma=cfg.min_snr_gamma or None, noise_offset=cfg.noise_offset,
                                return_trace=True, added_cond_kwargs=self.added_cond(batch, pooled))
        # L = mean_instance(w_snr * mse) + prior_loss_weight * mean_class(w_snr * mse)
        l = tr.per_sample_loss * tr.weights
        is_class = torch.tensor([e.is_class for e in batch], device=l.device)
        loss = l[~is_class].mean()
        if is_class.any():
            loss = loss + cfg.prior_loss_weight * l[is_class].mean()
        tr.loss = loss
        return loss, tr

    def added_cond(self, batch: list[Example], pooled) -> dict | None:
        """SDXL's U-Net inputs beside the text: the pooled output and, per picture, the six size/crop ids as
        diffusers' train_text_to_image_lora_sdxl.py makes them: original size = the file's (H, W), crop = the
        crop's (top, left) in the resized picture (left -> resized width - left when flipped, as that script
        does), target = the training resolution. None for families without size conditioning."""
        spec = self.model.spec
        if not spec.size_conditioning:
            return None
        ids = []
        for e in batch:
            top, left = e.crop_top_left
            left = e.resized_width - left if e.flipped and e.resized_width else left
            h, w = e.original_size or (self.res, self.res)
            ids.append(spec.time_ids(self.res, self.res, original_size=(w, h), crop_top_left=(left, top)))
        return {"text_embeds": pooled, "time_ids": torch.tensor(ids, dtype=pooled.dtype, device=pooled.device)}

    def train_mode(self, on: bool):
        for m in self.trainable_modules:
            m.train(on)

    def close(self):
        """Back to inference: eval mode, no gradient checkpointing, nothing requires grad."""
        self.train_mode(False)
        for m in self.trainable_modules:
            _set_checkpointing(m, False)
        for p in self.params:
            p.requires_grad_(False)

    def optimizer_step(self, step: int) -> float:
        """One full optimizer step (all micro-batches); returns the loss averaged over micro-batches and processes."""
        cfg, d = self.cfg, self.dist
        seed = seed_for(cfg.seed, "step", step, d.rank)
        # dropout and anything else drawing from the global RNG (torch.manual_seed would also seed every
        # accelerator backend, ~0.5 ms a step on a CPU-only run)
        if d.device.type == "cpu":
            torch.default_generator.manual_seed(seed)
        else:
            torch.manual_seed(seed)
        g = torch.Generator(d.device).manual_seed(seed)  # latents, noise, timesteps
        self.opt.zero_grad(set_to_none=True)
        total = 0.0
        for k in range(cfg.grad_accum):
            loss, _ = self.micro_loss(self.data.batch(step * cfg.grad_accum + k, cfg.batch_size, d.rank, d.world), g)
            d.backward(loss / cfg.grad_accum)
            total += loss.item() / cfg.grad_accum
        d.average_grads(self.params)
        if cfg.max_grad_norm:
            d.clip(self.opt, self.params, cfg.max_grad_norm)
        d.step(self.opt)
        self.sched.step()
        self.method.after_optimizer_step()
        return d.mean(total)

    # --- validation ---
    @torch.no_grad()
    def val_loss(self) -> float | None:
        """Plain denoising MSE (no Min-SNR) on the held-out images, each at VAL_TIMESTEPS fixed timesteps
        with fixed noise and the posterior mean: the same points at every call, so comparable across steps."""
        if not self.val_ex:
            return None
        if self._val is None:
            K, T = VAL_TIMESTEPS, self.noise_sched.config.num_train_timesteps
            ex = [e for e in self.val_ex for _ in range(K)]
            x = torch.stack([e.image for e in ex]).to(self.dist.device, self.model.vae.dtype)
            x0 = self.model.vae.encode(x).latent_dist.mean * self.model.latent_scale
            t = torch.tensor([int((k + 0.5) * T / K) for k in range(K)] * len(self.val_ex), device=x0.device)
            g = torch.Generator(x0.device).manual_seed(seed_for(self.cfg.seed, "validation-noise"))
            noise = torch.randn(x0.shape, generator=g, device=x0.device, dtype=x0.dtype)
            with torch.random.fork_rng(devices=[]):  # a method may draw captions (TI templates): fix them too
                torch.manual_seed(seed_for(self.cfg.seed, "validation-captions"))
                captions = [self.method.caption(e.caption, e) for e in ex]
            self._val = (x0, t, noise, captions)
        x0, t, noise, captions = self._val
        ex = [e for e in self.val_ex for _ in range(VAL_TIMESTEPS)]  # (their size/crop ids, for SDXL)
        self.train_mode(False)
        total = 0.0
        for i in range(0, len(captions), 32):
            sl = slice(i, i + 32)
            with self.dist.autocast():
                c, pooled = self.method.encode(self.model, captions[sl])
                loss = diffusion_loss(self.model.unet, x0[sl], c, self.noise_sched, None, noise=noise[sl], timesteps=t[sl],
                                      added_cond_kwargs=self.added_cond(ex[sl], pooled))
            total += loss.item() * len(captions[sl])
        self.train_mode(True)
        return total / len(captions)

    def sample_grid(self, path: Path) -> Path | None:
        """Prompts down, seeds across, sampled with our own pipeline on the current weights."""
        from sdknobs.images import grid, save_png
        from sdknobs.pipelines import generate

        cfg = self.cfg
        if not cfg.validation_prompts:
            return None
        self.train_mode(False)
        cells = [[generate(self.model, p, steps=cfg.validation_steps, guidance=cfg.validation_guidance, seed=s,
                           width=self.res, height=self.res, progress=False).images[0] for s in cfg.validation_seeds]
                 for p in cfg.validation_prompts]
        self.train_mode(True)
        img = grid(cells, scale=max(1, 128 // self.res), col_titles=[f"seed {s}" for s in cfg.validation_seeds],
                   row_titles=[str(i) for i in range(len(cells))])
        text = "\n".join(f"{i}: {p}" for i, p in enumerate(cfg.validation_prompts))
        return save_png(img, path, f"{text}\nSteps: {cfg.validation_steps}, CFG scale: {cfg.validation_guidance}")

    def sample_paths(self, folder: Path, step: int) -> list[Path]:
        return [folder / f"{step:06d}-{i:02d}.png" for i in range(len(self.samples))]

    def render_samples(self, folder: Path, step: int) -> list[Path]:
        """--sample-prompts: one PNG per line at this step, with the line's options (A1111 parameters)."""
        from sdknobs.images import save_png
        from sdknobs.pipelines import generate

        cfg, out = self.cfg, []
        if not self.samples:
            return out
        folder.mkdir(parents=True, exist_ok=True)
        self.train_mode(False)
        for sp, path in zip(self.samples, self.sample_paths(folder, step)):
            r = generate(self.model, sp.prompt, negative_prompt=sp.negative_prompt,
                         steps=sp.steps or cfg.validation_steps,
                         guidance=cfg.validation_guidance if sp.guidance is None else sp.guidance,
                         seed=cfg.seed if sp.seed is None else sp.seed, width=sp.width or self.res,
                         height=sp.height or self.res, progress=False)
            out.append(save_png(r.images[0], path, f"{r.parameters[0]}, Training step: {step}, "
                                                   f"Sample prompts: {Path(cfg.sample_prompts).name} line {sp.line}"))
        self.train_mode(True)
        return out


SAMPLES = "samples"  # run_dir/samples/<step>-<line index>.png: the --sample-prompts pictures


def save_every_path(cfg: TrainConfig, run_dir: Path, step: int) -> Path:
    """Where --save-every writes the file of `step`: kohya's NAME-000200.safetensors, in the run folder."""
    out = Path(cfg.out)
    return run_dir / f"{out.stem}-{step:06d}{out.suffix}"


def _check_planned(cfg: TrainConfig, s, run_dir: Path, first: int, validating, resuming: bool) -> None:
    """The files this run will write in the run folder besides checkpoints (--save-every files, --sample-prompts
    pictures, from step `first` on) must not exist already, unless --overwrite, or --resume of the same run
    (whose earlier session wrote them)."""
    if cfg.overwrite or resuming:
        return
    planned = [save_every_path(cfg, run_dir, k) for k in range(first + 1, cfg.steps + 1)
               if cfg.save_every and k % cfg.save_every == 0]
    if validating and s.samples:  # validations: at step 0 (a fresh run), every --validate-every steps, the last
        steps = ({0} if first == 0 else set()) | set(range(first + cfg.validate_every - first % cfg.validate_every,
                                                           cfg.steps + 1, cfg.validate_every)) | {cfg.steps}
        for k in sorted(steps):
            planned += s.sample_paths(run_dir / SAMPLES, k)
    for p in planned:
        if p.exists():
            raise SdknobsError(f"{p} exists (an earlier run's file); give --overwrite to replace it, or another --run-dir")


_RESUME_KEYS = ("data_dir", "class_data_dir", "seed", "batch_size", "grad_accum", "resolution", "repeats", "flip",
                "caption_dropout", "validation_split", "cache_latents")


def _check_resume(ckpt: Path, state: dict, method: Method, cfg: TrainConfig) -> bool:
    """The checkpoint must come from the same kind of run with the same data stream; True if it names the
    same --out (which --resume may then replace)."""
    old = state["extra"].get("config", {})
    kind = state["extra"].get("method") or ("ti" if "token" in old else "lora" if "rank" in old else method.name)
    if kind != method.name:
        raise SdknobsError(f"--resume: {str(ckpt)!r} is {METHOD_NAMES.get(kind, repr(kind))} checkpoint, but this run "
                           f"trains {METHOD_NAMES.get(method.name, repr(method.name))}; give the --run-dir of a "
                           f"{method.name} run, or a new one")
    for k in _RESUME_KEYS:  # the settings that decide the data stream must not change under a resume
        if old.get(k) != getattr(cfg, k):
            raise SdknobsError(f"--resume: --{k.replace('_', '-')} was {old.get(k)!r} in {ckpt}, now "
                               f"{getattr(cfg, k)!r}; use the same value or another --run-dir")
    if state["step"] > cfg.steps:
        raise SdknobsError(f"--resume: {ckpt.name} is at step {state['step']}, beyond --steps {cfg.steps}")
    return Path(str(old.get("out", ""))).absolute() == Path(cfg.out).absolute()


def _set_base_lrs(sched, base: list[float]) -> bool:
    """After loading a scheduler's state: the peak learning rates of this session's flags, not the checkpoint's
    (so a run stopped by a non-finite loss goes on with a lower --learning-rate). True if they changed."""
    if list(sched.base_lrs) == base:
        return False
    sched.base_lrs = list(base)
    for g, lam, b in zip(sched.optimizer.param_groups, sched.lr_lambdas, base):
        g["initial_lr"], g["lr"] = b, b * lam(sched.last_epoch)
    sched._last_lr = [g["lr"] for g in sched.optimizer.param_groups]
    return True


def train(model, method: Method, cfg: TrainConfig, *, accelerator=None, log=print) -> TrainResult:
    """Train `method`'s parameters on `model` (frozen otherwise) and write `cfg.out`; see the module docstring.

    Everything is checked before the run folder is created (paths, resume source, data, method setup).
    With an `accelerator`, its device and mixed_precision win over cfg.device / cfg.mixed_precision."""
    t_start = time.time()
    from sdknobs.training import defaults

    sources = defaults.resolve(cfg, model, method.name)  # flags left unset: the model's, family's or fallback value
    dist = _Dist(accelerator, cfg, model)
    run_dir = cfg.run_path
    early: list[str] = []  # warnings from before the run folder (and its log) exist
    check_file(cfg.out, "--out", overwrite=True)  # a writable place for a file (whether it may be replaced: below)
    check_folder(run_dir, "--run-dir")
    found = resume_point(run_dir, (STAGE,), cfg.resume, cfg.overwrite, cfg.out, early.append)
    _, ckpt, ckpt_data = found or (None, None, None)
    same_out = ckpt is not None and _check_resume(ckpt, ckpt_data[1], method, cfg)
    check_file(cfg.out, "--out", overwrite=cfg.overwrite or same_out)
    rng_state = torch.get_rng_state()
    s = _Session(model, method, cfg, dist)  # reads and checks the data; the method checks its own settings
    first = ckpt_data[1]["step"] if ckpt is not None else 0
    validating = cfg.validate_every and (s.val_ex or cfg.validation_prompts or s.samples)
    _check_planned(cfg, s, run_dir, first, validating, resuming=ckpt is not None)
    if dist.main:
        if cfg.overwrite and not cfg.resume:
            clear(run_dir, (STAGE,))
        remove_stale(run_dir)
        remove_stale_file(cfg.out)
        run_dir.mkdir(parents=True, exist_ok=True)

    def say(msg: str, warn: bool = False) -> None:
        if dist.main:
            line = f"[{method.name} {time.strftime('%H:%M:%S')}] {msg}"
            with open(run_dir / "train.log", "a") as f:
                f.write(line + "\n")
            print(f"sdknobs: {msg}", file=sys.stderr, flush=True) if warn else log(line)

    for msg in early:
        say(msg, warn=True)
    say(f"settings: {defaults.describe(sources, cfg)}")
    hist: dict[str, list] = {"train_loss": [], "val_loss": [], "grids": []}
    start = 0
    if ckpt is not None:
        base_lrs = list(s.sched.base_lrs)
        state = load_checkpoint(ckpt, modules={"method": _MethodState(method)}, optimizers={"opt": s.opt},
                                restore_rng=False, data=ckpt_data)
        s.sched.load_state_dict(state["extra"]["scheduler"])
        if _set_base_lrs(s.sched, base_lrs):
            say(f"--resume: peak learning rate(s) now {', '.join(f'{b:g}' for b in base_lrs)} (the checkpoint's: "
                f"{', '.join(f'{b:g}' for b in state['extra']['scheduler']['base_lrs'])})")
        if state["extra"].get("scaler") and dist.scaler_obj() is not None:
            dist.scaler_obj().load_state_dict(state["extra"]["scaler"])
        hist = {k: [tuple(x) if isinstance(x, list) else x for x in v] for k, v in state["extra"]["history"].items()}
        start = state["step"]
        say(f"resumed from {ckpt} at step {start}")
    say(f"{len(s.data.examples)} training images x {cfg.repeats} repeats, {len(s.data.class_examples)} class images, "
        f"{len(s.val_ex)} held out; {s.n_params:,} trainable parameters; {dist.world} process(es) on {dist.device}")
    keeper = Keeper(run_dir, STAGE, cfg.keep_checkpoints, resumed=ckpt)
    lr_flag = f"--learning-rate (now {cfg.learning_rate:g})"

    def validate(step: int) -> None:
        if dist.main:
            v = s.val_loss()
            if v is not None:
                hist["val_loss"].append((step, v))
            grid = s.sample_grid(run_dir / f"val_step_{step:06d}.png")
            if grid is not None:
                hist["grids"].append(grid.name)
            hist.setdefault("samples", []).extend(str(p.relative_to(run_dir)) for p in s.render_samples(
                run_dir / SAMPLES, step))
            say(f"step {step}/{cfg.steps}: " + (f"val loss {v:.5f}" if v is not None else "validation pictures written"))
        dist.barrier()

    def checkpoint(step: int) -> None:
        bad = nonfinite(method.state_dict())  # on every process (the same weights everywhere), before any waits
        if bad is not None:
            raise NonFiniteWeights(f"weight {bad!r} holds NaN or inf")
        if dist.main:
            scaler = dist.scaler_obj()
            keeper.save(step, modules={"method": _MethodState(method)}, optimizers={"opt": s.opt},
                        extra={"method": method.name, "config": dataclasses.asdict(cfg), "scheduler": s.sched.state_dict(),
                               "history": hist, "scaler": scaler.state_dict() if scaler is not None else {}})
        dist.barrier()

    def file_meta(step: int) -> dict[str, str]:
        """The trained file's metadata (a --save-every file's at its step; the final file's at cfg.steps)."""
        meta = {"sdknobs_method": method.name, "steps": step, "resolution": s.res, "learning_rate": cfg.learning_rate,
                "lr_scheduler": cfg.lr_scheduler, "batch_size": cfg.batch_size * dist.world * cfg.grad_accum,
                "min_snr_gamma": cfg.min_snr_gamma, "seed": cfg.seed, "base_model": cfg.model,
                "base_family": model.family, "prediction_type": model.prediction_type,
                "train_images": len(s.data.examples), "repeats": cfg.repeats,
                "prior_preservation": bool(s.data.class_examples), **method.metadata()}
        return {k: str(v) for k, v in meta.items()}

    def save_every(step: int) -> None:
        if dist.main:
            path = method.save(model, save_every_path(cfg, run_dir, step), file_meta(step))
            hist.setdefault("saved", []).append(path.name)
            say(f"step {step}/{cfg.steps}: wrote {path}")
        dist.barrier()

    from tqdm.auto import tqdm

    bar = tqdm(total=cfg.steps, initial=start, desc=f"train {method.name}", disable=not (cfg.progress and dist.main),
               dynamic_ncols=True, mininterval=1.0)
    s.train_mode(True)
    try:
        with Guard(keeper, checkpoint, lr_flag, lambda m: say(m, warn=True), start, enabled=dist.world == 1) as g:
            if validating and start == 0:
                validate(0)
            for step in range(start, cfg.steps):
                if g.stop:
                    break
                loss = s.optimizer_step(step)
                done = step + 1
                g.step_done(done, loss, s.params)
                hist["train_loss"].append((done, loss))
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{s.sched.get_last_lr()[0]:.2e}", refresh=False)
                bar.update(1)
                if validating and (done % cfg.validate_every == 0 or done == cfg.steps):
                    validate(done)
                if cfg.save_every and done % cfg.save_every == 0:
                    save_every(done)
                if (cfg.checkpoint_every and done % cfg.checkpoint_every == 0) or done == cfg.steps:
                    checkpoint(done)
    finally:
        bar.close()
        s.close()
        torch.set_rng_state(rng_state)
    if dist.main:
        keeper.finish()

    out = Path(cfg.out)
    seconds = time.time() - t_start
    if dist.main:
        out = method.save(model, out, file_meta(cfg.steps))
        series = {"train loss" + (" (Min-SNR weighted)" if cfg.min_snr_gamma else ""): hist["train_loss"]}
        if hist["val_loss"]:
            series["validation loss (fixed t, noise)"] = hist["val_loss"]
        loss_curve_png(run_dir / "loss_curve.png", series, title=f"train-{method.name}", log_y=True,
                       smooth_window=max(1, len(hist["train_loss"]) // 50))
        _atomic_write_text(run_dir / "history.json", json.dumps(
            {"config": dataclasses.asdict(cfg), "defaults_from": sources, "trainable_params": s.n_params, "out": str(out), "processes": dist.world,
             "seconds_this_session": seconds, **hist}, indent=1))
        say(f"wrote {out} ({cfg.steps} steps, {seconds:.1f}s this session)")
    dist.barrier()
    return TrainResult(out, run_dir, cfg.steps, seconds, hist["train_loss"], hist["val_loss"], s.n_params)


def trace_step(model, method: Method, cfg: TrainConfig) -> tuple[StepTrace, dict]:
    """One optimizer step (first micro-batch of step 0) with every intermediate, for `trace-step` commands.

    extra: captions (as the text encoder saw them), paths, image shape, loss, lr, trainable_params,
    grads / grad_norms per trainable parameter name (BEFORE after_optimizer_step), nonzero_grad_rows
    (row indices of 2-D parameters with a non-zero gradient: TI's new token rows) and changed_rows
    (rows that differ after the optimizer step AND after_optimizer_step). Writes nothing."""
    from sdknobs.training import defaults

    defaults.resolve(cfg, model, method.name)
    s = _Session(model, method, cfg, _Dist(None, cfg, model))
    names = {id(p): n for n, p in _named_parameters(model).items()}
    before = {id(p): p.detach().clone() for p in s.params}
    rng_state = torch.get_rng_state()
    seed = seed_for(cfg.seed, "step", 0, 0)
    torch.manual_seed(seed)
    g = torch.Generator(s.dist.device).manual_seed(seed)
    batch = s.data.batch(0, cfg.batch_size)
    s.train_mode(True)
    s.opt.zero_grad(set_to_none=True)
    loss, tr = s.micro_loss(batch, g)
    s.dist.backward(loss)
    lr = s.opt.param_groups[0]["lr"]
    scale = s.dist.scaler.get_scale() if s.dist.scaler else 1.0  # fp16 loss scaling
    grads = {names.get(id(p), f"param{i}"): (p.grad.detach() / scale if p.grad is not None else torch.zeros_like(p))
             for i, p in enumerate(s.params)}
    if cfg.max_grad_norm:
        s.dist.clip(s.opt, s.params, cfg.max_grad_norm)
    s.dist.step(s.opt)
    s.sched.step()
    method.after_optimizer_step()
    s.close()
    torch.set_rng_state(rng_state)

    def rows(t: torch.Tensor) -> list[int]:
        return torch.nonzero(t.reshape(t.shape[0], -1).abs().sum(1)).flatten().tolist() if t.dim() >= 2 else []

    extra = {
        "captions": s.last_captions,
        "paths": [e.path for e in batch], "is_class": [e.is_class for e in batch],
        "image_shape": tuple(batch[0].image.shape), "loss": float(loss.item()),
        "lr": lr, "trainable_params": s.n_params,
        "grads": grads, "grad_norms": {n: float(t.float().norm()) for n, t in grads.items()},
        "nonzero_grad_rows": {n: rows(t) for n, t in grads.items()},
        "changed_rows": {names.get(id(p), f"param{i}"): rows(p.detach() - before[id(p)]) for i, p in enumerate(s.params)},
    }
    return tr, extra
