"""`sdknobs bench quality`: how well a model draws the shapes world, scored by the analyzers.

A fixed prompt set covers every attribute value (single- and two-shape scenes); fixed seeds,
30 steps. Prints per-attribute accuracy, VAE reconstruction PSNR, and the baselines the later
knobs must move: how often the unnamed shapes (star, heart) and the unseen styles (striped,
outline) appear for the prompts the customization issues use."""
from __future__ import annotations

import itertools
import random
from collections import Counter
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from sdknobs.shapes import world
from sdknobs.shapes.analyze import analyze, score

ATTRS = ("background", "colour", "kind", "size", "position")


def quality_scenes(n_single: int = 150, n_two: int = 60) -> list[world.Scene]:
    """Single-shape scenes cycling through every kind x colour x background, sizes and positions
    interleaved; two-shape scenes on opposite positions with two colours. Named kinds only, solid."""
    single = []
    combos = list(itertools.product(world.KINDS_NAMED, world.COLOURS, world.BACKGROUNDS))
    for i in range(n_single):
        kind, colour, bg = combos[i % len(combos)]
        shape = world.Shape(kind, colour, world.SIZES[i % 2], world.POSITIONS[(i // 2) % len(world.POSITIONS)])
        single.append(world.Scene(bg, (shape,)))
    rng = random.Random(1234)
    two = [world.sample_scene(rng, kinds=world.KINDS_NAMED, p_two=1.0) for _ in range(n_two)]
    two = [world.Scene(s.background, tuple(world.Shape(x.kind, x.colour, x.size, x.position) for x in s.shapes))
           for s in two]  # no jitter: the prompt says where, the analyzer checks the anchor
    return single + two


def captions(scenes, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    named = {k: k for k in world.KINDS_NAMED}  # the prompt always names the kind it asks for
    return [world.caption(s, rng, words=named) for s in scenes]


@torch.inference_mode()
def sample(model, prompts: list[str], *, steps=30, guidance=3.0, seed=0, batch=50, scheduler="ddim", progress=True):
    """Images for many prompts, `batch` at a time, through the one denoising loop."""
    from sdknobs.loop import denoise, make_scheduler
    from sdknobs.pipelines import decode
    from sdknobs.text import encode_prompt

    out = []
    chunks = [prompts[i : i + batch] for i in range(0, len(prompts), batch)]
    for j, chunk in enumerate(tqdm(chunks, desc="sampling", disable=not progress)):
        emb = encode_prompt(model, chunk, None, guidance)
        f, side = model.vae_scale_factor, model.default_size
        shape = (len(chunk), model.unet.config.in_channels, side // f, side // f)
        g = torch.Generator(device=model.device).manual_seed(seed + j)
        x, _ = denoise(model.unet, make_scheduler(scheduler, model.scheduler_config), emb.cond, emb.uncond,
                       steps=steps, guidance=guidance, shape=shape, generator=g, progress=False)
        out += decode(model, x)
    return out


@torch.inference_mode()
def vae_psnr(model, n: int = 256, seed: int = 99) -> float:
    """Reconstruction PSNR (dB) of the VAE on held-out rendered scenes (all styles), posterior mode."""
    x, _, _ = world.make_batch(n, seed, model.default_size, styles=world.STYLES)
    x = x.to(model.device, model.dtype)
    rec = model.vae.decode(model.vae.encode(x).latent_dist.mode(), return_dict=False)[0].clamp(-1, 1)
    mse = ((rec - x) / 2).pow(2).mean().item()
    return float(10 * torch.log10(torch.tensor(1.0 / mse)))


@dataclass
class QualityReport:
    single: dict
    two_both: float
    psnr: float
    baselines: dict
    n_images: int
    images: list = field(default_factory=list, repr=False)  # the scored samples, in prompt order

    def lines(self) -> list[str]:
        out = [f"images scored: {self.n_images}"]
        out += [f"  {a:<24} {v:6.1%}" for a, v in self.single.items()]
        out.append(f"  {'two-shape both correct':<24} {self.two_both:6.1%}")
        out.append(f"  {'VAE PSNR':<24} {self.psnr:6.2f} dB")
        out.append("baselines (rate of what the analyzers find, for prompts the knobs will use):")
        for prompt, rates in self.baselines.items():
            out.append(f"  {prompt!r}: " + ", ".join(f"{k} {v:.0%}" for k, v in rates.items()))
        return out


BASELINE_PROMPTS = {
    # unnamed shapes: "shape" is the only word the model has for them
    "a large red shape in the centre, white background": "kind",
    "a large red star in the centre, white background": "kind",
    "a large red heart in the centre, white background": "kind",
    # unseen styles: never in pretraining
    "a large red striped circle in the centre, white background": "style",
    "a large red outlined square in the centre, white background": "style",
}


def quality(model, *, steps=30, guidance=3.0, n_single=150, n_two=60, n_baseline=40, progress=True) -> QualityReport:
    scenes = quality_scenes(n_single, n_two)
    images = sample(model, captions(scenes), steps=steps, guidance=guidance, progress=progress)
    scores = [score(analyze(im), s) for im, s in zip(images, scenes)]
    single = {a: sum(sc[a] for sc in scores[:n_single]) / n_single for a in ATTRS}
    single["all (single shape)"] = sum(sc["all"] for sc in scores[:n_single]) / n_single
    two_both = sum(sc["both"] for sc in scores[n_single:]) / max(1, n_two)
    baselines = {}
    for prompt, attr in BASELINE_PROMPTS.items():
        pics = sample(model, [prompt] * n_baseline, steps=steps, guidance=guidance, seed=500, progress=False)
        found = Counter()
        for im in pics:
            shapes = analyze(im).shapes
            found[getattr(shapes[0], attr) if shapes else "nothing"] += 1
        baselines[prompt] = {k: v / n_baseline for k, v in found.most_common()}
    return QualityReport(single, two_both, vae_psnr(model), baselines, len(images) + n_baseline * len(BASELINE_PROMPTS), images)


def register_cli(sub) -> None:
    sp = sub.add_parser("bench", help="benchmarks on the embedded model (quality)")
    bsub = sp.add_subparsers(dest="bench", required=True, metavar="BENCH")
    q = bsub.add_parser("quality", help="per-attribute accuracy of generated shapes-world images, VAE PSNR, baselines")
    q.add_argument("--model", default="shapes")
    q.add_argument("--steps", type=int, default=30)
    q.add_argument("--guidance", type=float, default=3.0)
    q.add_argument("--n-single", type=int, default=150, help="single-shape prompts")
    q.add_argument("--n-two", type=int, default=60, help="two-shape prompts")
    q.add_argument("--n-baseline", type=int, default=40, help="images per baseline prompt")
    q.add_argument("--grid", default="", help="also write a PNG grid of the first 40 samples here")
    q.set_defaults(func=_cmd_quality, config=None)


def _cmd_quality(args) -> None:
    from sdknobs.model import load_model

    model = load_model(args.model)
    rep = quality(model, steps=args.steps, guidance=args.guidance, n_single=args.n_single, n_two=args.n_two,
                  n_baseline=args.n_baseline)
    print(f"model {args.model}, {args.steps} DDIM steps, guidance {args.guidance}")
    print("\n".join(rep.lines()))
    if args.grid:
        from sdknobs.images import grid, save_png

        pics = rep.images[:40]
        save_png(grid([pics[i : i + 8] for i in range(0, 40, 8)], scale=3), args.grid)
        print(args.grid)
