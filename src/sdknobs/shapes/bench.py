"""`sdknobs bench quality`: how well a model draws the shapes world, scored by the analyzers.

A fixed prompt set covers every attribute value (single- and two-shape scenes); fixed seeds,
30 steps. Prints per-attribute accuracy, VAE reconstruction PSNR, and the baselines the later
knobs must move: how often the unnamed shapes (star, heart) and the unseen styles (striped,
outline) appear for the prompts the customization issues use.

`sdknobs bench analyzers` checks the analyzers themselves on pictures that look like model output, in
tiers: renders, blurred + noised renders, renders through the model's VAE, and hand-labelled
generated pictures (tests/data/analyzer_labels.json)."""
from __future__ import annotations

import itertools
import json
import random
from collections import Counter
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from sdknobs.shapes import world
from sdknobs.shapes.analyze import ATTRS as SHAPE_ATTRS
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
                       steps=steps, guidance=guidance, shape=shape, generator=g, progress=False,
                       added_cond=emb.added_cond(model, side, side))  # SDXL's pooled output and size ids
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


# --- the analyzers' own accuracy, in tiers of pictures more and more like the model's output ------------
TIER_ATTRS = ("background",) + SHAPE_ATTRS + ("count", "all")
LABELS = "tests/data/analyzer_labels.json"


def tier_scenes(n: int, seed: int = 123) -> list[world.Scene]:
    """Every kind, colour, style (striped stars excepted), 40% two-shape scenes, with jitter."""
    rng = random.Random(seed)
    return [world.sample_scene(rng, styles=world.STYLES, p_two=0.4) for _ in range(n)]


def degrade(image, rng: random.Random):
    """Gaussian blur of radius 0.5-1 px and Gaussian noise of sigma 8/255 (seeded): soft edges and grain."""
    import numpy as np
    from PIL import Image, ImageFilter

    k = image.width / 32
    image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 1.0) * k))
    a = np.asarray(image, np.float32) + np.random.default_rng(rng.randrange(2**31)).normal(0, 8, (image.height, image.width, 3))
    return Image.fromarray(np.clip(a + 0.5, 0, 255).astype(np.uint8))


@torch.inference_mode()
def vae_roundtrip(model, images) -> list:
    """The pictures encoded and decoded by the model's VAE (posterior mode), as the model would draw them."""
    from sdknobs.images import to_tensor
    from sdknobs.pipelines import decode

    x = torch.cat([to_tensor(im) for im in images]).to(model.device, model.dtype)
    return decode(model, model.vae.encode(x).latent_dist.mode() * model.latent_scale)


def labelled(path=LABELS, split: str | None = None) -> tuple[list, list[world.Scene], list[dict]]:
    """The hand-labelled generated pictures: tiles of one PNG sheet; labels of None were not judged."""
    from pathlib import Path

    from PIL import Image

    path = Path(path)
    meta = json.loads(path.read_text())
    sheet, t, cols = Image.open(path.parent / meta["sheet"]).convert("RGB"), meta["tile"], meta["columns"]
    rows = [r for r in meta["pictures"] if split is None or r["split"] == split]
    ims = [sheet.crop(((r["tile"] % cols) * t, (r["tile"] // cols) * t, (r["tile"] % cols + 1) * t, (r["tile"] // cols + 1) * t))
           for r in rows]
    return ims, [world.Scene.from_dict(r["scene"]) for r in rows], rows


def accuracy(images, scenes) -> tuple[dict, list[int]]:
    """Per-attribute accuracy of the analyzers on pictures of known scenes, and the indices they got wrong."""
    hits, wrong = dict.fromkeys(TIER_ATTRS, 0), []
    for i, (im, sc) in enumerate(zip(images, scenes)):
        s = score(analyze(im), sc)
        for a in TIER_ATTRS:
            hits[a] += s[a]
        if not s["all"]:
            wrong.append(i)
    return {a: v / max(1, len(images)) for a, v in hits.items()}, wrong


def validate_analyzers(model=None, n: int = 400, seed: int = 123, labels=LABELS) -> dict:
    """{tier: (accuracy per attribute, number of pictures, pictures read wrong)}; the VAE tier needs a model,
    the generated tiers a labels file (each tier is skipped without its input)."""
    from pathlib import Path

    scenes = tier_scenes(n, seed)
    renders = [world.render(s) for s in scenes]
    rng = random.Random(seed)
    tiers = {"render": (renders, scenes), "blur/noise": ([degrade(im, rng) for im in renders], scenes)}
    if model is not None:
        tiers["vae"] = (vae_roundtrip(model, renders), scenes)
    if labels and Path(labels).exists():
        for split in ("tune", "report"):
            ims, truth, _ = labelled(labels, split)
            tiers[f"generated ({split})"] = (ims, truth)
    out = {}
    for name, (ims, truth) in tiers.items():
        acc, wrong = accuracy(ims, truth)
        out[name] = (acc, len(ims), [(ims[i], truth[i]) for i in wrong])
    return out


def tier_table(res: dict) -> list[str]:
    L = ["| tier | pictures | " + " | ".join(TIER_ATTRS) + " |", "| --- " * (len(TIER_ATTRS) + 2) + "|"]
    for name, (acc, n, _) in res.items():
        L.append(f"| {name} | {n} | " + " | ".join(f"{100 * acc[a]:.1f}%" for a in TIER_ATTRS) + " |")
    return L


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
    q.add_argument("--overwrite", action="store_true", help="replace an existing --grid file")
    q.set_defaults(func=_cmd_quality, config=None)
    a = bsub.add_parser("analyzers", help="the analyzers' own per-attribute accuracy: renders, blur/noise, VAE, generated")
    a.add_argument("--model", default="shapes", help="whose VAE makes the VAE tier")
    a.add_argument("--n", type=int, default=400, help="pictures per synthetic tier")
    a.add_argument("--seed", type=int, default=123)
    a.add_argument("--labels", default=LABELS, help="hand-labelled generated pictures")
    a.add_argument("--failures", default="", help="also write the VAE tier's misread pictures here (PNG)")
    a.add_argument("--overwrite", action="store_true", help="replace an existing --failures file")
    a.set_defaults(func=_cmd_analyzers, config=None)
    from sdknobs.shapes import outpaint_bench

    outpaint_bench.register(bsub)  # `bench outpaint`: seams, duplicated shapes, noise streaks (issue 12)


def _cmd_quality(args) -> None:
    from sdknobs.model import load_model

    from sdknobs.errors import SdknobsError

    if args.steps < 1:
        raise SdknobsError(f"--steps must be >= 1, got {args.steps}")
    if min(args.n_single, args.n_two, args.n_baseline) < 0 or args.n_single + args.n_two == 0:
        raise SdknobsError(f"--n-single and --n-two must be >= 0 and not both 0 (no prompts to score), --n-baseline "
                           f">= 0; got {args.n_single}, {args.n_two}, {args.n_baseline}")
    if args.guidance < 0:
        raise SdknobsError(f"--guidance must be >= 0, got {args.guidance}")
    if args.grid:
        from sdknobs.atomic import check_out_path

        check_out_path(args.grid, "--grid", overwrite=args.overwrite)
    model = load_model(args.model)
    from sdknobs.loop import check_steps

    check_steps(args.steps, model.scheduler_config)
    rep = quality(model, steps=args.steps, guidance=args.guidance, n_single=args.n_single, n_two=args.n_two,
                  n_baseline=args.n_baseline)
    print(f"model {args.model}, {args.steps} DDIM steps, guidance {args.guidance}")
    print("\n".join(rep.lines()))
    if args.grid:
        from sdknobs.images import grid, save_png

        pics = rep.images[:40]
        save_png(grid([pics[i : i + 8] for i in range(0, 40, 8)], scale=3), args.grid)
        print(args.grid)


def _cmd_analyzers(args) -> None:
    from sdknobs.errors import SdknobsError
    from sdknobs.model import load_model

    if args.n < 1:
        raise SdknobsError(f"--n must be >= 1, got {args.n}")
    if args.failures:
        from sdknobs.atomic import check_out_path

        if not args.failures.lower().endswith(".png"):
            raise SdknobsError(f"--failures {args.failures!r} must end in .png")
        check_out_path(args.failures, "--failures", overwrite=args.overwrite)
    res = validate_analyzers(load_model(args.model), n=args.n, seed=args.seed, labels=args.labels)
    print("\n".join(tier_table(res)))
    for name, (_, _, wrong) in res.items():
        for _, sc in wrong[:40]:
            print(f"  {name} misread: {_describe(sc)}")
    if args.failures and res["vae"][2]:
        from sdknobs.images import grid, save_png

        pics = [im for im, _ in res["vae"][2][:48]]
        save_png(grid([pics[i : i + 12] for i in range(0, len(pics), 12)], scale=3), args.failures)
        print(args.failures)


def _describe(scene) -> str:
    return f"{scene.background}: " + " + ".join(f"{s.size} {s.colour} {s.style} {s.kind} {s.position}" for s in scene.shapes)
