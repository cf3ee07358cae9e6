"""Side by side: our generate / img2img / inpaint against diffusers' pipelines on the same weights
and settings, in one process, several repeats each. Prints median seconds and ours/diffusers.

  python benchmarks/bench_inference.py [--model shapes|FOLDER] [--steps 30] [--repeats 5]

Three columns per task: ours with the eager U-Net (the default), ours with `jit=True` (the
TorchScript-frozen U-Net of sdknobs.fast, timed after its one-off trace, whose cost is printed),
and diffusers' pipeline.

Without an embedded model (or with --model tiny) it builds the tiny random test model."""
from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time

import numpy as np
import torch
from PIL import Image, ImageDraw


def timed(fns, repeats):
    """Median seconds of each function, measured interleaved (a, b, c, c, b, a, ...) so that load
    from other processes on the machine hits every side alike. One warm-up call each first (for
    the --jit U-Net that is where the one-off trace happens; it is reported separately)."""
    warm = []
    for fn in fns:
        t = time.perf_counter()
        fn()
        warm.append(time.perf_counter() - t)
    times = [[] for _ in fns]
    order = list(range(len(fns)))
    for i in range(repeats):
        for k in (order if i % 2 == 0 else order[::-1]):
            t = time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - t)
    return [statistics.median(ts) for ts in times], warm


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="shapes")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--guidance", type=float, default=3.0)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    import diffusers
    import transformers

    for lib in (diffusers, transformers):
        lib.utils.logging.set_verbosity_error()
        lib.utils.logging.disable_progress_bar()
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline, StableDiffusionPipeline

    from sdknobs import load_model, SdknobsError
    from sdknobs.loop import make_scheduler
    from sdknobs.pipelines import generate, img2img, inpaint
    from sdknobs.tiny import write_tiny_model

    path = a.model
    try:
        model = load_model(path) if path != "tiny" else None
        jit_model = load_model(path, jit=True) if path != "tiny" else None
    except SdknobsError:
        model = None
    if model is None:
        path = str(write_tiny_model(tempfile.mkdtemp() + "/tiny"))
        model, jit_model = load_model(path), load_model(path, jit=True)
        print("(no embedded model: using the tiny random test model)")
    else:
        from sdknobs.model import EMBEDDED
        path = str(EMBEDDED.get(path, path))
    size = model.default_size
    base = StableDiffusionPipeline.from_pretrained(path, safety_checker=None, requires_safety_checker=False)
    base.scheduler = make_scheduler("ddim", model.scheduler_config)
    parts = {k: getattr(base, k) for k in ("vae", "text_encoder", "tokenizer", "unet", "scheduler")}
    extra = dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    i2i, inp = StableDiffusionImg2ImgPipeline(**parts, **extra), StableDiffusionInpaintPipeline(**parts, **extra)
    for p in (base, i2i, inp):
        p.set_progress_bar_config(disable=True)
    prompt = "a small red circle on the left, white background"
    image = generate(model, prompt, steps=10, guidance=a.guidance, seed=0, progress=False).images[0]
    mask = Image.new("L", image.size, 0)
    ImageDraw.Draw(mask).rectangle([size // 2, 0, size - 1, size - 1], fill=255)
    kw = dict(steps=a.steps, guidance=a.guidance, seed=0, batch=a.batch, progress=False)
    dkw = dict(num_inference_steps=a.steps, guidance_scale=a.guidance, num_images_per_prompt=a.batch)
    g = lambda: torch.Generator().manual_seed(0)
    tasks = {
        "generate": (lambda m: generate(m, prompt, **kw),
                     lambda: base(prompt, height=size, width=size, generator=g(), **dkw)),
        "img2img": (lambda m: img2img(m, image, prompt, strength=0.75, **kw),
                    lambda: i2i(prompt, image=image, strength=0.75, generator=g(), **dkw)),
        "inpaint": (lambda m: inpaint(m, image, mask, prompt, **kw),
                    lambda: inp(prompt, image=image, mask_image=mask, height=size, width=size, generator=g(), **dkw)),
    }
    print(f"model {a.model} ({size}x{size}), {a.steps} steps, batch {a.batch}, guidance {a.guidance}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, diffusers {diffusers.__version__}")
    print("ours = eager U-Net (the default); ours --jit = TorchScript-frozen U-Net (load_model(jit=True)),"
          " timed after its one-off trace")
    print(f"{'task':<10} {'ours s':>8} {'ours --jit s':>13} {'diffusers s':>12} {'ours/diff':>10} {'--jit/diff':>11} {'1st call +s':>12}")
    for name, (ours, ref) in tasks.items():
        (t_ours, t_jit, t_ref), warm = timed([lambda: ours(model), lambda: ours(jit_model), ref], a.repeats)
        print(f"{name:<10} {t_ours:>8.3f} {t_jit:>13.3f} {t_ref:>12.3f} {t_ours / t_ref:>9.2f}x "
              f"{t_jit / t_ref:>10.2f}x {warm[1] - t_jit:>12.1f}")


if __name__ == "__main__":
    logging.basicConfig(level=logging.ERROR)
    main()
