"""The LoRA results on the shapes world: trains the LoRAs, scores generated pictures with the exact
analyzers, writes PNGs and the table into docs/lora.md (between its `results` markers).

    python -m sdknobs.lora.results [--model shapes] [--out out/lora-results] [--docs docs] [--threads 1]

Experiments (fixed seeds; every rate is over N prompts with varied colour, size, position, background):
  subject     heart LoRA from 16 pictures captioned "... sks shape ...": heart rate for "sks shape" prompts
              against the base model; leakage = heart rate for plain "shape" prompts; the same with prior
              preservation (class pictures = the base model's own "shape" samples)
  style       outline LoRA from 100 outlined pictures (all five kinds): outline rate on prompts saying
              "outlined"; leakage = outline rate on the same prompts without the word; and the same LoRA
              on ResNet convolutions only, at the cross-attention LoRA's parameter budget
  compose     style + subject LoRAs together on "outlined sks shape" prompts: both present; conflict score
              (for the cross-attention style LoRA and for the conv-only one)
  window      the style LoRA only on the early half of the steps vs only on the late half
  overfit     a long run on 6 pictures with 6 held out: validation loss and sample diversity over steps
Each experiment's figures are saved in OUT/results.json as soon as it finishes; a rerun skips finished
ones (--fresh redoes them), so an interrupted run resumes.
"""
from __future__ import annotations

from sdknobs.atomic import write_text  # noqa: E402

import argparse
import itertools
import json
import random
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from sdknobs.shapes import world

START, END = "<!-- lora-results:start -->", "<!-- lora-results:end -->"
SUBJECT, STYLE = "heart", "outline"  # (a star's thin points make an outlined star hard to draw at 32 px)


def prompt_scenes(n: int, seed: int, kinds, style: str = "solid") -> list[world.Scene]:
    """n single-shape scenes cycling colours x positions x sizes x backgrounds (shuffled by seed)."""
    rng = random.Random(seed)
    combos = list(itertools.product(world.COLOURS, world.POSITIONS, world.SIZES, world.BACKGROUNDS))
    rng.shuffle(combos)
    return [world.Scene(bg, (world.Shape(kinds[i % len(kinds)], c, s, p, style),))
            for i, (c, p, s, bg) in enumerate(combos[:n])]


def captions(scenes, words=None, name_style=True) -> list[str]:
    rng = random.Random(0)
    return [world.caption(s, rng, words=words, name_style=name_style) for s in scenes]


def score_all(images, scenes) -> list[dict]:
    """Per picture: the analyzer's reading of the shape nearest to where the prompt put it."""
    from sdknobs.shapes.analyze import analyze, score

    out = []
    for im, sc in zip(images, scenes):
        rep = analyze(im)
        s = score(rep, sc)
        first = rep.shapes[0] if rep.shapes else None
        out.append({**s, "found_kind": first.kind if first else "", "found_style": first.style if first else "",
                    "found": (first.colour, first.size, first.position, rep.background) if first else None})
    return out


def rate(scores, fn) -> float:
    return sum(1 for s in scores if fn(s)) / max(1, len(scores))


class Runner:
    def __init__(self, args):
        self.args, self.out, self.docs = args, Path(args.out), Path(args.docs)
        self.out.mkdir(parents=True, exist_ok=True)
        (self.docs / "lora").mkdir(parents=True, exist_ok=True)
        self.file = self.out / "results.json"
        self.results = json.loads(self.file.read_text()) if self.file.exists() else {}  # --fresh redoes --only
        self.steps: dict[str, int] = {}

    def model(self):
        from sdknobs.model import load_model

        return load_model(self.args.model, device="cpu", dtype="fp32")

    def sample(self, model, prompts, seed=0, lora=()):
        """As shapes.bench.sample (50 prompts per batch, generator seed + batch index, DDIM), with LoRAs
        applied for the call and their windows switched per step as the pipelines do."""
        from sdknobs.lora.layers import applied
        from sdknobs.loop import denoise, make_scheduler
        from sdknobs.pipelines import decode
        from sdknobs.text import encode_prompt

        out = []
        with applied(model, list(lora)) as s, torch.inference_mode():
            hook = s.before_step if s is not None and s.has_windows else None
            for j in range(0, len(prompts), 50):
                chunk = prompts[j:j + 50]
                emb = encode_prompt(model, chunk, None, self.args.guidance)
                side = model.default_size // model.vae_scale_factor
                x, _ = denoise(model.unet, make_scheduler("ddim", model.scheduler_config), emb.cond, emb.uncond,
                               steps=self.args.steps, guidance=self.args.guidance,
                               shape=(len(chunk), model.unet.config.in_channels, side, side),
                               generator=torch.Generator().manual_seed(seed + j // 50), progress=False, before_step=hook)
                if hook is not None:
                    s.reset()
                out += decode(model, x)
        return out

    def train(self, name, data, cached=True, **kw) -> tuple[Path, float]:
        """Train (or reuse a finished run of) LoRA `name`; returns its file and training seconds (the step
        count is kept in self.steps[name])."""
        from sdknobs.lora.train import LoraTrainConfig, train_lora

        path = self.out / f"{name}.safetensors"
        run = self.out / f"{name}-run"
        if cached and not self.args.fresh and path.exists() and (run / "history.json").exists():
            hist = json.loads((run / "history.json").read_text())
            self.steps[name] = hist["config"]["steps"]
            return path, hist["seconds_this_session"]
        if not kw.get("resume"):
            shutil.rmtree(run, ignore_errors=True)
        kw["steps"] = self.steps[name] = max(2, round(kw["steps"] * self.args.scale))  # --scale: smoke tests
        base = dict(data_dir=str(data), out=str(path), run_dir=str(run), model=self.args.model, batch_size=4,
                    rank=8, learning_rate=2e-3, min_snr_gamma=5.0, cache_latents=True, validate_every=0,
                    checkpoint_every=0, progress=False, seed=0, overwrite=True)  # this script's own files
        cfg = LoraTrainConfig(**{**base, **kw})
        res, _ = train_lora(cfg, log=lambda m: print("   ", m))
        return path, res.seconds

    def grid(self, name, rows, titles):
        from sdknobs.images import grid, save_png

        save_png(grid(rows, scale=3, row_titles=titles), self.docs / "lora" / f"{name}.png")

    def done(self, key, value):
        self.results[key] = value
        self.file.write_text(json.dumps(self.results, indent=1))
        print(f"== {key}: {json.dumps(value)}")


def run_subject(r: Runner):
    data = world.write_dataset(r.out / "data-subject", 16, seed=1, kinds=(SUBJECT,), p_two=0)
    scenes = prompt_scenes(r.args.n, 11, (SUBJECT,))
    sks, plain = captions(scenes, words={SUBJECT: "sks shape"}), captions(scenes)
    m = r.model()
    base_sks = score_all(imgs := r.sample(m, sks), scenes)
    base_plain = score_all(r.sample(m, plain), scenes)
    out = {"kind": SUBJECT, "images": 16, "base_sks": rate(base_sks, lambda s: s["kind"]),
           "base_plain": rate(base_plain, lambda s: s["kind"])}
    rows, titles = [imgs[:10]], ["base, sks"]
    for tag, extra in (("", {}), ("_prior", {"class_data_dir": str(class_images(r, m))})):
        path, secs = r.train(f"subject{tag}", data, steps=600, instance_token="sks", class_word="shape", **extra)
        s_sks = score_all(imgs := r.sample(m, sks, lora=[str(path)]), scenes)
        s_plain = score_all(r.sample(m, plain, lora=[str(path)]), scenes)
        out.update({f"lora{tag}_sks": rate(s_sks, lambda s: s["kind"]), f"lora{tag}_plain": rate(s_plain, lambda s: s["kind"]),
                    f"lora{tag}_colour": rate(s_sks, lambda s: s["colour"]), f"lora{tag}_position": rate(s_sks, lambda s: s["position"]),
                    f"train{tag}_s": secs, f"steps{tag}": r.steps[f"subject{tag}"]})
        rows.append(imgs[:10])
        titles.append(f"LoRA{tag.replace('_', ' ')}, sks")
    r.grid("subject", rows, titles)
    r.done("subject", out)


def class_images(r: Runner, model) -> Path:
    """DreamBooth's prior preservation: the base model's own pictures for the class prompt ("shape")."""
    folder = r.out / "data-subject-class"
    if r.args.fresh or not folder.exists():
        shutil.rmtree(folder, ignore_errors=True)
        scenes = prompt_scenes(24, 99, (SUBJECT,))
        caps = captions(scenes)
        folder.mkdir()
        for i, (im, cap) in enumerate(zip(r.sample(model, caps, seed=100), caps)):
            im.save(folder / f"{i:03d}.png")
            (folder / f"{i:03d}.txt").write_text(cap + "\n")
    return folder


def style_data(r: Runner) -> Path:
    return world.write_dataset(r.out / "data-style", 100, seed=1, styles=(STYLE,))  # all kinds ("outlined shape" too)


def style_eval(r, m, lora, tag):
    scenes = prompt_scenes(r.args.n, 12, world.KINDS_NAMED, STYLE)
    named, unnamed = captions(scenes), captions(scenes, name_style=False)
    s_named = score_all(imgs := r.sample(m, named, lora=lora), scenes)
    s_plain = score_all(imgs2 := r.sample(m, unnamed, lora=lora), scenes)
    return ({f"{tag}_named": rate(s_named, lambda s: s["style"]), f"{tag}_leak": rate(s_plain, lambda s: s["found_style"] == STYLE),
             f"{tag}_kind": rate(s_named, lambda s: s["kind"]), f"{tag}_colour": rate(s_named, lambda s: s["colour"])},
            imgs, imgs2)


def run_style(r: Runner):
    from sdknobs.lora.targets import count_params, rank_for_budget, resolve_targets

    data, m = style_data(r), r.model()
    out, rows, titles = {"images": 100}, [], []
    base, imgs, _ = style_eval(r, m, [], "base")
    out.update(base)
    rows.append(imgs[:10])
    titles.append("base, outlined")
    budget = count_params(resolve_targets(m, ["cross-attn"]), 8)
    conv_rank = rank_for_budget(resolve_targets(m, ["conv"]), budget)
    for tag, targets, rank in (("xattn", ["cross-attn"], 8), ("conv", ["conv"], conv_rank)):
        path, secs = r.train(f"style_{tag}", data, steps=500, batch_size=8, targets=targets, rank=rank, caption_dropout=0.1)
        res, imgs, imgs2 = style_eval(r, m, [str(path)], tag)
        out.update(res)
        out.update({f"{tag}_rank": rank, f"{tag}_params": count_params(resolve_targets(m, targets), rank), f"{tag}_train_s": secs,
                    f"{tag}_steps": r.steps[f"style_{tag}"]})
        rows += [imgs[:10], imgs2[:10]]
        titles += [f"{tag}, outlined", f"{tag}, no word"]
    r.grid("style", rows, titles)
    r.done("style", out)


def run_compose(r: Runner):
    from sdknobs.lora.files import read_lora
    from sdknobs.lora.inspect import conflict

    subject = r.out / "subject.safetensors"
    styles = {"xattn": r.out / "style_xattn.safetensors", "conv": r.out / "style_conv.safetensors"}
    for name, path in (("style", styles["xattn"]), ("subject", subject)):
        if not path.exists():
            EXPERIMENTS[name](r)
    scenes = prompt_scenes(r.args.n, 13, (SUBJECT,), STYLE)
    caps = captions(scenes, words={SUBJECT: "sks shape"})
    m, out, rows, titles = r.model(), {}, [], []
    runs = [(f"{tag}_both", [str(p), str(subject)]) for tag, p in styles.items()]
    runs += [("xattn_only", [str(styles["xattn"])]), ("subject_only", [str(subject)])]
    for tag, lora in runs:
        s = score_all(imgs := r.sample(m, caps, lora=lora), scenes)
        out.update({f"{tag}": rate(s, lambda x: x["kind"] and x["style"]), f"{tag}_kind": rate(s, lambda x: x["kind"]),
                    f"{tag}_style": rate(s, lambda x: x["style"])})
        rows.append(imgs[:10])
        titles.append(tag.replace("_", " "))
    for tag, p in styles.items():
        c = conflict(read_lora(p), read_lora(subject))
        out.update({f"{tag}_conflict": c.score, f"{tag}_shared": len(c.cosines), f"{tag}_against": len(c.against())})
    r.grid("compose", rows, titles)
    r.done("compose", out)


def run_window(r: Runner):
    style = r.out / "style_xattn.safetensors"
    if not style.exists():
        run_style(r)
    m, out, rows, titles = r.model(), {}, [], []
    for tag, spec in (("early", f"{style}@0-0.5"), ("late", f"{style}@0.5-1")):
        res, imgs, _ = style_eval(r, m, [spec], tag)
        out.update({k: v for k, v in res.items() if not k.endswith("_leak")})
        rows.append(imgs[:10])
        titles.append(f"{tag} steps")
    r.grid("window", rows, titles)
    r.done("window", out)


def diversity(images, train_images=()) -> tuple[int, float, float]:
    """Distinct (colour, size, position, background) readings, mean pairwise pixel distance (0..1), and mean
    RMS pixel distance from each image to its nearest training picture (memorisation: falls to 0 for copies)."""
    from sdknobs.shapes.analyze import analyze

    def flat(ims):
        return np.stack([np.asarray(im, np.float32) / 255 for im in ims]).reshape(len(ims), -1)

    reps = [analyze(im) for im in images]
    found = {(x.shapes[0].colour, x.shapes[0].size, x.shapes[0].position, x.background) for x in reps if x.shapes}
    x = flat(images)
    d = np.sqrt(((x[:, None] - x[None]) ** 2).mean(-1))
    near = float("nan")
    if len(train_images):
        y = flat(train_images)
        near = float(np.sqrt(((x[:, None] - y[None]) ** 2).mean(-1)).min(1).mean())
    return len(found), float(d[np.triu_indices(len(images), 1)].mean()), near


def run_overfit(r: Runner):
    from PIL import Image

    from sdknobs.training.data import split_validation

    data = world.write_dataset(r.out / "data-overfit", 12, seed=3, kinds=(SUBJECT,), p_two=0)
    for txt in data.glob("*.txt"):  # DreamBooth's setting: every picture has the one instance prompt "a sks shape"
        txt.unlink()
    pngs = sorted(data.glob("*.png"))
    held = {e.path for e in split_validation([SimpleNamespace(path=str(p)) for p in pngs], 6, seed=0)[1]}
    train_pics = [Image.open(p).convert("RGB") for p in pngs if str(p) not in held]  # the trainer's split (seed 0)
    m = r.model()
    generic = ["a sks shape"] * 24
    stops = tuple(max(i, round(x * r.args.scale)) for i, x in enumerate((0, 150, 600, 3000)))
    out = {"steps": [], "val_loss": [], "distinct": [], "pairwise": [], "nearest_train": []}
    rows, titles = [], []
    for stop in stops:
        lora = []
        if stop:
            path, _ = r.train("overfit", data, cached=False, steps=stop / r.args.scale, resume=stop != stops[1], validation_split=6, rank=16,
                              learning_rate=5e-3, min_snr_gamma=0.0, validate_every=max(1, round(50 * r.args.scale)),
                              checkpoint_every=max(1, round(50 * r.args.scale)),
                              keep_checkpoints=1, instance_token="sks", class_word="shape")
            shutil.copy(path, r.out / f"overfit-{stop}.safetensors")
            lora = [str(r.out / f"overfit-{stop}.safetensors")]
        imgs = r.sample(m, generic, seed=7, lora=lora)
        n, pair, near = diversity(imgs, train_pics)
        out["steps"].append(stop)
        out["distinct"].append(n)
        out["pairwise"].append(pair)
        out["nearest_train"].append(near)
        rows.append(imgs[:10])
        titles.append(f"step {stop}")
    hist = json.loads((r.out / "overfit-run" / "history.json").read_text())
    out["val_loss"] = hist["val_loss"]
    out["seeds"] = len(generic)
    shutil.copy(r.out / "overfit-run" / "loss_curve.png", r.docs / "lora" / "overfit_loss.png")
    r.grid("overfit", rows, titles)
    r.done("overfit", out)


EXPERIMENTS = {"subject": run_subject, "style": run_style, "compose": run_compose, "window": run_window,
               "overfit": run_overfit}


def pct(v) -> str:
    return f"{100 * v:.0f}%"


def table(res: dict, args) -> list[str]:
    """The markdown table for docs/lora.md."""
    L = [f"Model `{args.model}`, {args.n} prompts per row, {args.steps} DDIM steps, guidance {args.guidance}, "
         f"seeds fixed; every rate is read by `shapes/analyze.py`. Measured {time.strftime('%Y-%m-%d')}.", "",
         "| experiment | measure | base model | with LoRA | target |", "| --- | --- | --- | --- | --- |"]
    if "subject" in res:
        s = res["subject"]
        k = s["kind"]
        L += [f"| subject: {k} from {s['images']} pictures, cross-attn r8, {s['steps']} steps ({s['train_s']:.0f} s) | "
              f"{k} rate, \"a ... sks shape ...\" prompts | {pct(s['base_sks'])} | **{pct(s['lora_sks'])}** | >= 80% |",
              f"| | leakage: {k} rate, the same prompts with plain \"shape\" | {pct(s['base_plain'])} | {pct(s['lora_plain'])} | reported |",
              f"| | colour / position right (sks prompts) | | {pct(s['lora_colour'])} / {pct(s['lora_position'])} | |",
              f"| same + prior preservation (24 base-model \"shape\" pictures) | {k} rate sks / leakage | | "
              f"{pct(s['lora_prior_sks'])} / {pct(s['lora_prior_plain'])} | |"]
    if "style" in res:
        s = res["style"]
        L += [f"| style: outline from {s['images']} pictures, cross-attn r{s['xattn_rank']} ({s['xattn_params']:,} params), "
              f"{s['xattn_steps']} steps ({s['xattn_train_s']:.0f} s) | outline rate, prompts saying \"outlined\" | "
              f"{pct(s['base_named'])} | **{pct(s['xattn_named'])}** | >= 80% |",
              f"| | leakage: outline rate, the same prompts without the word | {pct(s['base_leak'])} | {pct(s['xattn_leak'])} | reported |",
              f"| | kind / colour right (outlined prompts) | {pct(s['base_kind'])} / {pct(s['base_colour'])} | "
              f"{pct(s['xattn_kind'])} / {pct(s['xattn_colour'])} | |",
              f"| conv-only at the same budget: r{s['conv_rank']} ({s['conv_params']:,} params) | outline rate named / leakage "
              f"| | {pct(s['conv_named'])} / {pct(s['conv_leak'])} | finding |",
              f"| | kind / colour right | | {pct(s['conv_kind'])} / {pct(s['conv_colour'])} | |"]
    if "compose" in res:
        s = res["compose"]
        L += [f"| compose: cross-attn style + subject, \"outlined sks shape\" prompts | both present (heart and outline) | | "
              f"**{pct(s['xattn_both'])}** | >= 60% |",
              f"| | conflict score (norm-weighted cosine of delta W, {s['xattn_shared']} shared layers) | | "
              f"{s['xattn_conflict']:+.3f} ({s['xattn_against']} layers < -0.2) | reported |",
              f"| compose: conv-only style + subject | both present | | **{pct(s['conv_both'])}** | >= 60% |",
              f"| | conflict score | | {s['conv_conflict']:+.3f} ({s['conv_shared']} shared layers) | reported |",
              f"| | style LoRA alone / subject LoRA alone: both present | | {pct(s['xattn_only'])} / "
              f"{pct(s['subject_only'])} | |"]
    if "window" in res:
        s, all_steps = res["window"], res.get("style", {}).get("xattn_named", float("nan"))
        L += [f"| window: cross-attn style LoRA on part of the {args.steps} steps | outline rate: early half (@0-0.5) / "
              f"late half (@0.5-1) / all steps | | {pct(s['early_named'])} / {pct(s['late_named'])} / {pct(all_steps)} | finding |"]
    if "overfit" in res:
        s = res["overfit"]
        v = s["val_loss"]
        best = min(v, key=lambda x: x[1])
        n_seeds = s.get("seeds", 24)
        L += [f"| overfit: 6 {SUBJECT} pictures (6 held out), all captioned \"a sks shape\", r16, lr 5e-3, "
              f"{s['steps'][-1]} steps | validation loss: start / "
              f"lowest / end | {v[0][1]:.4f} | {best[1]:.4f} (step {best[0]}) / {v[-1][1]:.4f} | rises |",
              f"| | \"a sks shape\", {n_seeds} seeds: distinct scenes / mean pixel distance between samples, at steps "
              + ", ".join(map(str, s["steps"])) + " | " + f"{s['distinct'][0]} / {s['pairwise'][0]:.3f} | "
              + ", ".join(f"{n} / {p:.3f}" for n, p in zip(s["distinct"][1:], s["pairwise"][1:])) + " | falls |",
              "| | the same samples: mean pixel distance to the nearest training picture (copies: 0) | "
              + f"{s['nearest_train'][0]:.3f} | " + ", ".join(f"{d:.3f}" for d in s["nearest_train"][1:]) + " | falls |"]
    return L


def write_docs(res: dict, args) -> Path:
    page = Path(args.docs) / "lora.md"
    text = page.read_text() if page.exists() else f"# LoRA\n\n{START}\n{END}\n"
    if START not in text:
        text += f"\n{START}\n{END}\n"
    head, rest = text.split(START, 1)
    tail = rest.split(END, 1)[1] if END in rest else ""
    page.write_text(head + START + "\n" + "\n".join(table(res, args)) + "\n" + END + tail)
    # the figures beside the pictures (tracked), with the subject file's size, for other pages (TI's knob table)
    keep = dict(res)
    f = Path(args.out) / "subject.safetensors"
    if f.exists() and "subject" in keep:
        from sdknobs.lora.files import read_lora

        w = read_lora(f)
        keep["subject"] = {**keep["subject"], "params": w.num_params(), "file_bytes": f.stat().st_size,
                           "rank": max(w.ranks()), "layers": len(w.layers)}
    write_text(Path(args.docs) / "lora" / "results.json", json.dumps(keep, indent=1, sort_keys=True, default=str))
    return page


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="shapes")
    ap.add_argument("--out", default="out/lora-results", help="LoRA files, datasets, runs, results.json")
    ap.add_argument("--docs", default="docs", help="docs folder: lora.md gets the table, lora/ the pictures")
    ap.add_argument("--only", nargs="+", default=list(EXPERIMENTS), choices=list(EXPERIMENTS))
    ap.add_argument("--n", type=int, default=40, help="prompts per measured row")
    ap.add_argument("--steps", type=int, default=30, help="sampler steps")
    ap.add_argument("--guidance", type=float, default=3.0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--fresh", action="store_true", help="rerun experiments already in results.json")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every training run's steps (e.g. 0.01 for a smoke test)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from sdknobs.cli import _quiet_libraries

    _quiet_libraries()
    r = Runner(args)
    t0 = time.time()
    for name in args.only:
        if name in r.results and not args.fresh:
            print(f"== {name}: done already (results.json)")
            continue
        t = time.time()
        EXPERIMENTS[name](r)
        r.results[name]["seconds"] = round(time.time() - t, 1)
        r.file.write_text(json.dumps(r.results, indent=1))
    print("\n".join(table(r.results, args)))
    print(f"{write_docs(r.results, args)} updated; {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
