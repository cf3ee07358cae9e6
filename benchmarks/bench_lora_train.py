"""LoRA training speed, side by side in one process: ours (`sdknobs.training.trainer.train` with `LoraMethod`)
against a reference loop written the way diffusers' examples/text_to_image/train_text_to_image_lora.py
does it: peft LoraConfig(r, lora_alpha=r, init "gaussian") on to_q/to_k/to_v/to_out.0 via
`unet.add_adapter`, an Accelerator, a DataLoader that loads + transforms + tokenizes every item, and per
step VAE encode -> noise -> text encoder -> U-Net -> MSE -> backward -> clip -> AdamW -> LR schedule.

Both train the same LoRA (same layers, rank, alpha, init, AdamW settings, batch, resolution, steps) on
the same images. Ours differs by design: latents are cached (`--cache-latents`: the frozen VAE encodes
each image once), the frozen text encoder's output is cached per caption (LoraMethod.encode_text), the
U-Net is traced once per input shape (`--jit`, the default: fast.TracedUNet, same bits as eager, no
Python per module) and AdamW is fused. The trace is recorded in the first step, which counts as setup.

  python benchmarks/bench_lora_train.py                          # shapes model, CPU, fp32, batch 4
  python benchmarks/bench_lora_train.py --batch-sizes 1,4 --steps 60 --threads 2
  python benchmarks/bench_lora_train.py --device cuda --sd15-random --resolution 512 --batch-sizes 1,8 --dtype bf16 --steps 20

--sd15-random builds SD1.5's architecture (U-Net, VAE, 768-wide CLIP text encoder) from the configs in
sdknobs/assets/configs/sd1 with random weights: nothing is downloaded. Step time = median of the steps
after --warmup; setup = everything before the first step (data, caches); peak memory =
torch.cuda.max_memory_allocated (GPU only). Runs alternate ours, reference, reference, ours (--repeats
pairs) so load from other processes hits both alike."""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]  # what train_text_to_image_lora.py adapts (attn1 and attn2)


def build_sd15_random(device, dtype, tiny=False):
    """SD1.5's architecture with random weights (or a shrunken copy with --tiny-arch, for tests)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from sdknobs.model import ASSETS, Model
    from sdknobs.tiny import SD_SCHEDULER_CONFIG, load_tokenizer

    cfg_dir = ASSETS / "configs" / "sd1"
    ucfg = json.loads((cfg_dir / "unet" / "config.json").read_text())
    vcfg = json.loads((cfg_dir / "vae" / "config.json").read_text())
    tcfg = CLIPTextConfig.from_json_file(cfg_dir / "text_encoder" / "config.json")
    if tiny:  # same block structure, narrow: runs on a CPU in seconds
        ucfg.update(block_out_channels=[32, 32, 64, 64], cross_attention_dim=32, attention_head_dim=2)
        vcfg.update(block_out_channels=[16, 16, 32, 32], norm_num_groups=8)
        tcfg.update(dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2))
    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel.from_config(ucfg)
        vae = AutoencoderKL.from_config(vcfg)
        te = CLIPTextModel(tcfg)
    m = Model(load_tokenizer(), te, unet, vae, dict(SD_SCHEDULER_CONFIG), family="SD1.x", source="sd15-random")
    m.to(dtype=dtype)
    for mod in m.components().values():
        mod.eval().requires_grad_(False)
    m.extra["sha256"] = "random-weights"  # skip hashing 860M random weights for the file's metadata
    return m


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_ours(model, data, args, batch, out_dir) -> dict:
    from sdknobs.lora.train import LoraMethod, LoraTrainConfig
    from sdknobs.training.trainer import train

    stamps, device = [], model.device  # (model.device walks the U-Net's modules: ~ms; look it up once)

    class Timed(LoraMethod):
        def after_optimizer_step(self):
            sync(device)
            stamps.append(time.perf_counter())

    cfg = LoraTrainConfig(
        data_dir=str(data), out=str(out_dir / "ours.safetensors"), run_dir=str(out_dir / "ours-run"), model="bench",
        device=str(model.device), steps=args.steps, learning_rate=args.lr, batch_size=batch, seed=0,
        resolution=args.resolution, rank=args.rank, alpha=args.rank, targets=["attn"], cache_latents=True,
        mixed_precision=args.mixed_precision, max_grad_norm=1.0, weight_decay=1e-2, lr_scheduler="constant",
        validate_every=0, checkpoint_every=0, keep_checkpoints=1, progress=False)
    t0 = time.perf_counter()
    train(model, Timed(cfg), cfg, log=lambda s: None)
    return timing(t0, stamps, args.warmup, device, end=time.perf_counter())


class RefData(torch.utils.data.Dataset):
    """As the example's dataset: every access loads the image, resizes the shorter side (bilinear),
    centre-crops and scales to [-1, 1]; `collate` tokenizes the batch's captions (the example tokenizes in
    its batched transform)."""

    def __init__(self, folder, res, tokenizer):
        self.files = sorted(p for p in Path(folder).iterdir() if p.suffix == ".png")
        self.res, self.tok = res, tokenizer

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        im = Image.open(self.files[i]).convert("RGB")
        s = self.res / min(im.size)
        im = im.resize((max(self.res, round(im.width * s)), max(self.res, round(im.height * s))), Image.BILINEAR)
        left, top = (im.width - self.res) // 2, (im.height - self.res) // 2
        im = im.crop((left, top, left + self.res, top + self.res))
        x = torch.from_numpy(np.asarray(im, np.float32) / 127.5 - 1.0).permute(2, 0, 1)
        return {"pixel_values": x, "caption": self.files[i].with_suffix(".txt").read_text().strip()}

    def collate(self, items):
        ids = self.tok([it["caption"] for it in items], max_length=self.tok.model_max_length, padding="max_length",
                       truncation=True, return_tensors="pt").input_ids
        return {"pixel_values": torch.stack([it["pixel_values"] for it in items]), "input_ids": ids}


def run_reference(model, data, args, batch) -> dict:
    from accelerate import Accelerator
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig

    t0, device = time.perf_counter(), model.device
    acc = Accelerator(mixed_precision=args.mixed_precision, cpu=device.type == "cpu")
    unet, vae, te = model.unet, model.vae, model.text_encoder
    noise_scheduler = DDPMScheduler.from_config({k: v for k, v in model.scheduler_config.items() if not k.startswith("_")})
    unet.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.rank, init_lora_weights="gaussian", target_modules=TARGETS))
    if args.mixed_precision != "no":
        cast_training_params(unet, dtype=torch.float32)
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-08)
    ds = RefData(data, args.resolution, model.tokenizer)
    loader = torch.utils.data.DataLoader(ds, shuffle=True, collate_fn=ds.collate, batch_size=batch, num_workers=0,
                                         drop_last=True)
    lr_scheduler = get_scheduler("constant", optimizer=optimizer, num_warmup_steps=0, num_training_steps=args.steps)
    unet, optimizer, loader, lr_scheduler = acc.prepare(unet, optimizer, loader, lr_scheduler)
    unet.train()
    stamps, step = [], 0
    while step < args.steps:
        for b in loader:
            with acc.accumulate(unet):
                latents = vae.encode(b["pixel_values"].to(dtype=vae.dtype)).latent_dist.sample()
                latents = latents * vae.config.scaling_factor
                noise = torch.randn_like(latents)
                timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],),
                                          device=latents.device).long()
                noisy = noise_scheduler.add_noise(latents, noise, timesteps)
                hidden = te(b["input_ids"], return_dict=False)[0]
                pred = unet(noisy, timesteps, hidden, return_dict=False)[0]
                loss = F.mse_loss(pred.float(), noise.float(), reduction="mean")
                acc.gather(loss.repeat(batch)).mean().item()  # the example logs the mean loss every step
                acc.backward(loss)
                if acc.sync_gradients:
                    acc.clip_grad_norm_(params, 1.0)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
            sync(device)
            stamps.append(time.perf_counter())
            step += 1
            if step >= args.steps:
                break
    r = timing(t0, stamps, args.warmup, device, end=time.perf_counter())
    acc.free_memory()  # the Accelerator keeps references to what it prepared
    return r


def timing(t0, stamps, warmup, device, end) -> dict:
    diffs = [b - a for a, b in zip(stamps, stamps[1:])]
    steps = diffs[max(0, warmup - 1):] or diffs or [float("nan")]
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return {"step_s": statistics.median(steps), "setup_s": stamps[0] - t0 if stamps else float("nan"),
            "total_s": end - t0, "peak_gib": peak}


def fresh_model(args, device, dtype):
    from sdknobs import SdknobsError, load_model

    if args.sd15_random:
        return build_sd15_random(device, dtype, tiny=args.tiny_arch)
    if args.model != "tiny":
        try:
            return load_model(args.model, device=str(device), dtype={torch.float32: "fp32", torch.bfloat16: "bf16",
                                                                     torch.float16: "fp16"}[dtype])
        except SdknobsError:
            print("(no embedded model: using the tiny random test model)")
    from sdknobs.tiny import build_model

    return build_model().to(device, dtype)


def one(kind, args, device, dtype, data, batch, out_dir) -> dict:
    """One training run on a freshly built model; a failure (e.g. out of memory) is reported, not fatal."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    try:
        model = fresh_model(args, device, dtype)
        return run_ours(model, data, args, batch, out_dir) if kind == "ours" else run_reference(model, data, args, batch)
    except Exception as e:  # noqa: BLE001 - keep the other rows of the table
        print(f"{kind} at batch {batch} failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}")
        return {"step_s": float("nan"), "setup_s": float("nan"), "total_s": float("nan"), "peak_gib": float("nan")}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="shapes", help="shapes, tiny, or a diffusers folder (ignored with --sd15-random)")
    ap.add_argument("--sd15-random", action="store_true", help="SD1.5 architecture with random weights")
    ap.add_argument("--tiny-arch", action="store_true", help="with --sd15-random: a narrow copy (tests)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"],
                    help="frozen weights' dtype; bf16/fp16 also autocast the compute (LoRA factors stay fp32)")
    ap.add_argument("--resolution", type=int, default=0, help="px (0 = the model's default size)")
    ap.add_argument("--batch-sizes", default="4")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=1, help="ours/ref/ref/ours pairs per batch size")
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1,
                    help="CPU threads (default 1: on a shared 2-core machine a second thread waits on busy cores)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    import diffusers
    import transformers

    for lib in (diffusers, transformers):
        lib.utils.logging.set_verbosity_error()
        lib.utils.logging.disable_progress_bar()
    from sdknobs.shapes import world

    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    args.mixed_precision = "no" if args.dtype == "fp32" else args.dtype
    batches = [int(b) for b in args.batch_sizes.split(",")]
    probe = fresh_model(args, device, dtype)
    args.resolution = args.resolution or probe.default_size
    name = "sd15-random" + (" (tiny arch)" if args.tiny_arch else "") if args.sd15_random else args.model
    del probe
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        data = world.write_dataset(Path(tmp) / "data", args.images, seed=0, size=args.resolution)
        print(f"{args.images} training images at {args.resolution} px written in {time.perf_counter() - t:.1f}s")
        for batch in batches:
            res = {"ours": [], "ref": []}
            for r in range(args.repeats):
                for kind in ("ours", "ref", "ref", "ours") if args.repeats > 1 or device.type == "cpu" else ("ours", "ref"):
                    out_dir = Path(tempfile.mkdtemp(dir=tmp, prefix=f"{kind}-b{batch}-"))
                    res[kind].append(one(kind, args, device, dtype, data, batch, out_dir))
            o = {k: statistics.median(x[k] for x in res["ours"]) for k in res["ours"][0]}
            f = {k: statistics.median(x[k] for x in res["ref"]) for k in res["ref"][0]}
            rows.append((batch, o, f))
    print(f"\nLoRA training: {name}, {args.resolution} px, rank {args.rank} on {'/'.join(TARGETS)} (attn1+attn2), "
          f"AdamW lr {args.lr:g}, {device.type} {args.dtype}, {args.threads} thread(s), {args.steps} steps "
          f"(median of steps after {args.warmup})")
    print("| batch | ours ms/step | ref ms/step | ours steps/s | ref steps/s | ours/ref speed | ours setup s "
          "| ref setup s | ours peak GiB | ref peak GiB |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for batch, o, f in rows:
        print(f"| {batch} | {o['step_s'] * 1e3:.1f} | {f['step_s'] * 1e3:.1f} | {1 / o['step_s']:.2f} | "
              f"{1 / f['step_s']:.2f} | {f['step_s'] / o['step_s']:.2f}x | {o['setup_s']:.1f} | {f['setup_s']:.1f} | "
              f"{o['peak_gib']:.2f} | {f['peak_gib']:.2f} |")
    return rows


if __name__ == "__main__":
    main()
