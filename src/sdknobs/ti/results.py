"""`python -m sdknobs.ti.results`: textual inversion's figures on the shipped shapes model, written to
docs/textual_inversion.md (+ docs/ti_samples.png, docs/ti_results.json).

What is measured (every picture scored by the exact analyzers of `shapes/analyze.py`):
1. the unnamed shape (star; the base model only ever heard "shape" for stars and hearts), learned
   from <= 20 rendered pictures whose captions say the token where the star is: the rate of stars
   for prompts with varied colours, sizes, positions and backgrounds, against the base model's
   rate for the same prompts with "shape" (its only word for it) and with "star" (a word it never
   learned for it); 1 vector vs 4, init word vs random;
2. the unseen style (striped, never drawn in pretraining): the rate of striped shapes;
3. leakage: prompts without the token, with and without the embedding loaded (`ti.verify`);
4. the no-training alternative: img2img from one reference picture towards other colours, and
   inpainting around it towards other backgrounds;
5. a comparison of the knobs (LoRA figures read from the LoRA results when they exist).

Quick check (about a minute): `python -m sdknobs.ti.results --quick --out /tmp/ti.md`.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from sdknobs.shapes import world
from sdknobs.shapes.analyze import analyze, score

TOKEN, STYLE_TOKEN = "<star-shape>", "<stripe-style>"
GRID_ROWS = ("base 'shape'", "ti-1v-word", "ti-4v-word", "ti-1v-random", "ti-style")
ROOT = Path(__file__).resolve().parents[3]


@dataclass
class Settings:
    steps: int = 150
    learning_rate: float = 2e-2
    batch_size: int = 8
    min_snr_gamma: float = 0.1  # weights the loss towards high noise, where the kind of shape is decided
    images: int = 20  # training pictures per concept (the issue allows <= 20)
    n_eval: int = 96  # prompts per measured rate
    sample_steps: int = 30
    guidance: float = 3.0  # bench quality's setting
    seed: int = 0
    model: str = "shapes"
    work: str = "runs/ti-results"


@dataclass
class Rate:
    """Analyzer scores over the evaluation prompts."""

    n: int
    target: float  # rate of the asked-for kind (or style)
    colour: float
    position: float
    size: float
    found: dict = field(default_factory=dict)  # what the analyzer found, most common first


# --- data and prompts -----------------------------------------------------------------------------
def datasets(work: Path, n: int, seed: int) -> tuple[Path, Path]:
    """Star pictures captioned with the token where the star is; striped pictures of the named kinds
    captioned with "striped" (the trainer replaces it by the style token)."""
    stars = world.write_dataset(work / "data-star", n, seed=seed + 11, kinds=("star",), words={"star": TOKEN})
    stripes = world.write_dataset(work / "data-striped", n, seed=seed + 12, kinds=world.KINDS_NAMED,
                                  styles=("striped",), words={k: k for k in world.KINDS_NAMED})
    return stars, stripes


def eval_specs(n: int, seed: int = 0, kinds=("star",), style: str = "solid") -> list[world.Scene]:
    """Varied single-shape scenes: every colour, position, size and background, interleaved."""
    rng = random.Random(seed)
    cols, pos, bgs = list(world.COLOURS), list(world.POSITIONS), list(world.BACKGROUNDS)
    out = []
    for i in range(n):
        shape = world.Shape(kinds[i % len(kinds)], cols[i % len(cols)], world.SIZES[(i // 3) % 2],
                            pos[(i // 2) % len(pos)], style)
        out.append(world.Scene(bgs[rng.randrange(len(bgs))], (shape,)))
    return out


def prompt(scene: world.Scene, noun: str, style_word: str = "") -> str:
    s = scene.shapes[0]
    return f"a {s.size} {s.colour} {style_word + ' ' if style_word else ''}{noun} {world._POS_WORDS[s.position][0]}, " \
           f"{scene.background} background"


def rate(images, scenes, attr: str = "kind") -> Rate:
    found, sc = Counter(), []
    for im, scene in zip(images, scenes):
        rep = analyze(im)
        sc.append(score(rep, scene))
        found[getattr(rep.shapes[0], attr) if rep.shapes else "nothing"] += 1
    n = len(images)
    return Rate(n, sum(s[attr] for s in sc) / n, sum(s["colour"] for s in sc) / n, sum(s["position"] for s in sc) / n,
                sum(s["size"] for s in sc) / n, {k: v / n for k, v in found.most_common()})


# --- runs -----------------------------------------------------------------------------------------
def fresh_model(st: Settings, embedding: Path | None = None):
    from sdknobs.model import load_model
    from sdknobs.ti import load_embedding

    m = load_model(st.model)
    if embedding is not None:
        load_embedding(m, embedding)
    return m


def sample(model, prompts, st: Settings, seed: int = 100):
    from sdknobs.shapes.bench import sample as bench_sample

    return bench_sample(model, prompts, steps=st.sample_steps, guidance=st.guidance, seed=seed, progress=False)


def train_run(st: Settings, name: str, data: Path, **kw) -> dict:
    from sdknobs.ti.train import TITrainConfig, train_ti

    work = Path(st.work)
    shutil.rmtree(work / f"run-{name}", ignore_errors=True)
    cfg = TITrainConfig(data_dir=str(data), out=str(work / name / "learned_embeds.safetensors"),
                        run_dir=str(work / f"run-{name}"), model=st.model, template="captions", steps=st.steps,
                        learning_rate=st.learning_rate, batch_size=st.batch_size, seed=st.seed, cache_latents=True,
                        validate_every=0, checkpoint_every=0, progress=False, overwrite=True,  # this script's own files
                        **{"min_snr_gamma": st.min_snr_gamma, **kw})
    t = time.time()
    res, method = train_ti(cfg, log=lambda s: None)
    seconds = time.time() - t
    return {"name": name, "file": str(res.out), "file_bytes": Path(res.out).stat().st_size, "seconds": seconds,
            "vectors": cfg.vectors, "width": int(method.guard.weight.shape[1]),
            "effective_params": cfg.vectors * int(method.guard.weight.shape[1]), "optimizer_params": res.trainable_params,
            "init": cfg.init, "init_word": cfg.init_word, "min_snr_gamma": cfg.min_snr_gamma, "final_loss": float(np.mean([v for _, v in res.train_loss[-20:]]))}


def img2img_alternative(st: Settings, data: Path) -> dict:
    """No training: from the first training picture (one star), img2img towards each other colour, and
    inpainting of everything but the star towards each other background."""
    from PIL import Image

    from sdknobs.pipelines import img2img, inpaint

    model = fresh_model(st)
    truth = world.read_truth(data)[0]
    ref, scene = Image.open(data / truth["file"]).convert("RGB"), truth["scene"]
    s = scene.shapes[0]
    out = {"reference": truth["caption"], "img2img": {}, "inpaint": {}}
    for strength in (0.5, 0.75):
        ims, scenes = [], []
        for c in world.COLOURS:
            if c == s.colour:
                continue
            want = world.Scene(scene.background, (world.Shape("star", c, s.size, s.position),))
            for seed in (0, 1):
                ims += img2img(model, ref, prompt(want, "shape"), strength=strength, steps=st.sample_steps,
                               guidance=st.guidance, seed=seed, progress=False).images
                scenes.append(want)
        out["img2img"][strength] = asdict(rate(ims, scenes))
    # mask = every pixel that is pure background (white = repaint); the star's pixels, edges included, are kept
    fg = np.abs(np.asarray(ref, np.float32) - np.asarray(world.BACKGROUNDS[scene.background], np.float32)).max(-1) > 8
    mask = Image.fromarray(np.where(fg, 0, 255).astype(np.uint8))
    ims, scenes = [], []
    for bg in world.BACKGROUNDS:
        if bg == scene.background:
            continue
        want = world.Scene(bg, (s,))
        for seed in (0, 1):
            ims += inpaint(model, ref, mask, prompt(want, "shape"), steps=st.sample_steps, guidance=st.guidance,
                           seed=seed, mask_blur=0, progress=False).images
            scenes.append(want)
    r = rate(ims, scenes)
    out["inpaint"] = {**asdict(r), "background": sum(analyze(i).background == sc.background for i, sc in zip(ims, scenes)) / len(ims)}
    return out


def lora_figures(path: Path | None = None) -> dict | None:
    """The LoRA results' subject experiment (the same star concept), from `python -m sdknobs.lora.results`'s
    results.json, with the parameter count and size of its subject LoRA file when that file is there."""
    path = Path(path) if path else ROOT / "docs" / "lora" / "results.json"
    try:
        sub = json.loads(path.read_text()).get("subject")
    except (OSError, json.JSONDecodeError):
        return None
    if not sub:
        return None
    out = {"source": str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path), **sub}
    f = path.parent / "subject.safetensors"
    if f.exists() and "params" not in out:
        from sdknobs.lora.files import read_lora

        w = read_lora(f)
        out.update(params=w.num_params(), file_bytes=f.stat().st_size, rank=max(w.ranks()), layers=len(w.layers))
    return out


def run(st: Settings, out_md: Path, quick: bool = False, lora_results: str | None = None) -> dict:
    from sdknobs.images import grid, save_png
    from sdknobs.ti import read_embedding
    from sdknobs.ti.nearest import nearest
    from sdknobs.ti.tokens import vector_names
    from sdknobs.ti.verify import verify

    t0 = time.time()

    def say(msg):
        print(f"[ti results {(time.time() - t0) / 60:5.1f} min] {msg}", flush=True)

    torch.manual_seed(st.seed)
    work = Path(st.work)
    work.mkdir(parents=True, exist_ok=True)
    stars, stripes = datasets(work, st.images, st.seed)
    specs = eval_specs(st.n_eval, st.seed)
    res: dict = {"settings": asdict(st), "runs": {}, "rates": {}, "quick": quick}

    # base model: its only word for the star ("shape") and the English word it never learned for it
    base = fresh_model(st)
    samples = {}
    for word in ("shape", "star"):
        ims = sample(base, [prompt(sc, word) for sc in specs], st)
        res["rates"][f"base '{word}'"] = asdict(rate(ims, specs))
        samples[f"base '{word}'"] = ims
    # textual inversion: 1 vector and 4, init word and random
    runs = [("ti-1v-word", dict(vectors=1, init_word="shape")), ("ti-4v-word", dict(vectors=4, init_word="shape")),
            ("ti-1v-random", dict(vectors=1, init="random")),
            ("ti-1v-word-g1", dict(vectors=1, init_word="shape", min_snr_gamma=1.0)),
            ("ti-1v-word-plain", dict(vectors=1, init_word="shape", min_snr_gamma=0.0))]
    for name, kw in runs:
        r = train_run(st, name, stars, token=TOKEN, **kw)
        res["runs"][name] = r
        ims = sample(fresh_model(st, Path(r["file"])), [prompt(sc, TOKEN) for sc in specs], st)
        res["rates"][name] = asdict(rate(ims, specs))
        samples[name] = ims
        say(f"{name}: trained in {r['seconds']:.0f} s, star rate {_pct(res['rates'][name]['target'])}")
    # the unseen style: striped named shapes; the base model's word "striped" vs a learned token
    sspecs = eval_specs(st.n_eval, st.seed + 1, kinds=world.KINDS_NAMED, style="striped")
    ims = sample(base, [prompt(sc, sc.shapes[0].kind, "striped") for sc in sspecs], st)
    res["rates"]["base 'striped'"] = asdict(rate(ims, sspecs, "style"))
    r = train_run(st, "ti-style", stripes, token=STYLE_TOKEN, vectors=1, init_word="striped", caption_word="striped")
    res["runs"]["ti-style"] = r
    ims = sample(fresh_model(st, Path(r["file"])), [prompt(sc, sc.shapes[0].kind, STYLE_TOKEN) for sc in sspecs], st)
    res["rates"]["ti-style"] = asdict(rate(ims, sspecs, "style"))
    samples["ti-style"] = ims
    say(f"ti-style: striped rate {_pct(res['rates']['ti-style']['target'])}")
    # leakage: prompts without the token render bit-identically with the embedding loaded
    rep = verify(fresh_model(st), res["runs"]["ti-1v-word"]["file"], prompts=[prompt(sc, "shape") for sc in specs[:8]]
                 + [prompt(sc, sc.shapes[0].kind) for sc in sspecs[:4]] + [""], steps=st.sample_steps, guidance=st.guidance)
    res["leakage"] = {"prompts": len(rep.prompts), "identical": sum(rep.identical), "weights_changed": rep.weights_changed,
                      "tensors_hashed": rep.weights_checked}
    # where the learned vectors lie
    emb = read_embedding(res["runs"]["ti-1v-word"]["file"])
    nb = nearest(base, emb.vectors, vector_names(emb.token, emb.n_vectors), k=5, init_word="shape")[0]
    res["nearest"] = {"top": nb.top, "init_cosine": nb.init_cosine, "init_rank": nb.init_rank, "norm": nb.norm,
                      "vocab_median_norm": nb.extra["vocab_median_norm"]}
    say("leakage and nearest done")
    res["alternative"] = img2img_alternative(st, stars)
    say("img2img / inpainting alternative done")
    res["lora"] = lora_figures(lora_results)
    res["seconds_total"] = time.time() - t0
    res["machine"] = {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
                      "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d")}

    # outputs: a sample grid, the json, the markdown page
    out_md.parent.mkdir(parents=True, exist_ok=True)
    png = out_md.with_name("ti_samples.png")
    save_png(grid([samples[k][:12] for k in GRID_ROWS], scale=3, row_titles=GRID_ROWS), png)
    out_md.with_name("ti_results.json").write_text(json.dumps(res, indent=1, default=str))
    out_md.write_text(markdown(res, png.name, quick))
    return res


# --- the page -------------------------------------------------------------------------------------
def _pct(x) -> str:
    return f"{100 * x:.0f}%"


def _found(d: dict) -> str:
    return ", ".join(f"{k} {_pct(v)}" for k, v in list(d.items())[:4])


USAGE = """## How it works

A new word `<t>` gets N new rows of the text encoder's token-embedding matrix (`--vectors N`, 1-8; `<t>`,
`<t>_1`, ... in the tokenizer, and every prompt that says `<t>` is expanded to all N before tokenizing).
Training optimizes the whole matrix, as diffusers' `textual_inversion.py` does, with the shared diffusion
loss through the frozen text encoder and U-Net; after every optimizer step every other row is copied back
from a copy taken at the start, because autograd gives a gradient to every row used by the captions (their
words, BOS, EOS and padding) and AdamW's weight decay touches all rows (`sdknobs ti trace-step` prints
them). At the end every model weight is bit-identical to the base model's (a test hashes all of them).

```sh
sdknobs dataset subject --kind star --out data/stars   # the 20 star pictures below, captions saying "shape"
sdknobs train-ti data/stars --token "<my-shape>" --init-word shape --vectors 1 --steps 150 --batch-size 8 \\
    --learning-rate 2e-2 --min-snr-gamma 0.1 --cache-latents --template captions --caption-word shape
sdknobs generate --prompt "a small red <my-shape> on the left, white background" \\
    --embedding out/ti-my-shape/my-shape.safetensors --out out/my-shape.png
sdknobs ti verify out/ti-my-shape/my-shape.safetensors    # prompts without the token: bit-identical images; no weight changed
sdknobs ti nearest out/ti-my-shape/my-shape.safetensors   # top-k vocabulary words by cosine per vector, and the init word's similarity
sdknobs ti trace-step       # one step on shapes pictures: tensor shapes, rows with non-zero gradient
```

`--embedding` is repeatable (`--embedding other.pt=<other>` renames a file's token) and combines with `--lora`.

`--init-word` must be one token (otherwise the error shows how it splits and suggests single-token
words) or `--init random`; a token already in the vocabulary is an error. `--template object` / `style`
caption every picture from diffusers' templates ("a photo of a {}", "a painting in the style of {}");
`captions` uses the dataset's captions with `--caption-word` replaced by the token. The shared training
options (learning-rate schedule, `--grad-accum`, `--checkpoint-every` + `--resume`, validation grids,
the loss-curve PNG, Accelerate) work as for `train-lora`.

Files: diffusers' `{token: [N, D]}` by default; `--format kohya` writes `emb_params` (kohya, AUTOMATIC1111,
ComfyUI) and `--format a1111` an A1111 `.pt` (`string_to_param`), re-packed so that it holds only the
records A1111's safe-unpickle check (`modules/safe.py`) accepts (torch 2.13 adds `.format_version`,
`.storage_alignment`, `byteorder`, `.data/serialization_id`, which it rejects), under a folder named after
the file. Every format's default name is the token without brackets, `<my-shape>` -> `my-shape.safetensors`
(`.pt`), because A1111, ComfyUI and kohya take the trigger word from the file name:

| tool | how a prompt triggers `my-shape.*` | formats read (`tests/interop`) | vectors |
| --- | --- | --- | --- |
| sdknobs | `<my-shape>` (the token in the file; `--embedding FILE=<other>` renames it) | all three | exact |
| diffusers `load_textual_inversion` (run) | `<my-shape>`; the kohya format needs `token="<my-shape>"` (its key is `emb_params`) | all three | exact |
| AUTOMATIC1111 (encoded: `textual_inversion.py`, `safe.py`) | `my-shape` (file name) | all three; the `.pt` passes `check_pt` | exact |
| ComfyUI (encoded: `comfy/sd1_clip.py` `load_embed`) | `embedding:my-shape` | all three | exact |
| kohya `gen_img.py` (encoded) | `my-shape` (file name; extra vectors `my-shape1`, ...) | all three | exact |

Read as well: diffusers' `.bin`, A1111's older `.pt` with an `nn.ParameterDict` under `string_to_param`
(allowed by name for `torch.load(weights_only=True)`), and A1111's PNG embeddings (the `sd-ti-embedding`
text chunk, or the data hidden in the picture's edges, `ti/pngs.py`: JSON, never unpickled). Pickled files
needing anything more (code objects, classes) are refused. Refused by name, in `generate --embedding`,
`ti verify` and `ti nearest`: NaN/inf or integer vectors, no vectors, a width that is not the text
encoder's (naming both: 768 SD1.x, 1024 SD2.x, 1280 SDXL's second encoder, the embedded model's own), SDXL
`clip_l`/`clip_g` files, training checkpoints, truncated files. Python: `sdknobs.ti.load_embedding(model,
FILE)`, or `embeddings=[FILE]` on `generate`/`img2img`/`inpaint`/`outpaint`; a test loads our file with
diffusers' `pipe.load_textual_inversion` and gets the same latents as ours.
"""


def _rest(r: dict) -> str:
    other = [(k, v) for k, v in r["found"].items() if k != "star"]
    if not other:
        return ""
    k, v = other[0]
    return (f"Of the best run's pictures that are not stars, most are {k}s ({_pct(v)} of all): the base model learned "
            f"stars and hearts under one word (\"shape\"), and a new input vector to the frozen U-Net shifts that "
            f"choice rather than removing the other shape.")


def markdown(res: dict, png: str, quick: bool) -> str:
    st, R = res["settings"], res["rates"]
    ti = [k for k in R if k.startswith("ti-") and k != "ti-style"]
    best = max(ti, key=lambda k: R[k]["target"])
    label = {"base 'shape'": "base model, \"shape\"", "base 'star'": "base model, \"star\"",
             "ti-1v-word": f"`{TOKEN}`, 1 vector, init \"shape\"", "ti-4v-word": f"`{TOKEN}`, 4 vectors, init \"shape\"",
             "ti-1v-random": f"`{TOKEN}`, 1 vector, random init",
             "ti-1v-word-g1": f"`{TOKEN}`, 1 vector, init \"shape\", Min-SNR gamma 1",
             "ti-1v-word-plain": f"`{TOKEN}`, 1 vector, init \"shape\", plain loss (no Min-SNR)"}
    lines = [
        "# Textual inversion on the shapes world",
        "",
        f"Produced by `python -m sdknobs.ti.results` on the shipped `{st['model']}` model "
        f"({res['machine']['date']}, {res['machine']['platform']}, {res['machine']['cpu_count']} CPUs, torch "
        f"{res['machine']['torch']}, {res['machine']['threads']} torch thread(s)); whole run {res['seconds_total'] / 60:.1f} min."
        + (" **QUICK MODE: tiny settings, figures meaningless.**" if quick else ""),
        "Every picture is scored by the exact analyzers (`sdknobs/shapes/analyze.py`). Rerun it to check.",
        "",
        f"Training: {st['images']} rendered pictures per concept (`shapes/world.write_dataset`), the dataset's own "
        f"captions with the token in place of the concept's word (`--template captions`), {st['steps']} steps of batch "
        f"{st['batch_size']}, AdamW lr {st['learning_rate']}, Min-SNR gamma {st['min_snr_gamma']}, latents cached. Evaluation: {st['n_eval']} prompts cycling "
        f"through every colour, size, position and background, {st['sample_steps']} DDIM steps, guidance {st['guidance']}.",
        "",
        USAGE,
        "## The unnamed shape (star)",
        "",
        f"Target: the star in >= 60% of pictures for varied prompts. Best: {label[best]}, {_pct(R[best]['target'])} "
        f"({'met' if R[best]['target'] >= 0.6 else '**not met**'}).",
        "",
        "| prompt word | star rate | colour right | position right | size right | what the analyzer found |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for k in label:
        r = R[k]
        lines.append(f"| {label[k]} | {_pct(r['target'])} | {_pct(r['colour'])} | {_pct(r['position'])} | "
                     f"{_pct(r['size'])} | {_found(r['found'])} |")
    nb, bs = res["nearest"], R["base 'striped'"]
    lines += [
        "",
        f"Min-SNR weighting, w(t) = min(SNR(t), gamma) / SNR(t) with gamma {st['min_snr_gamma']}, gives the "
        f"high-noise timesteps (SNR < gamma), where the layout and so the kind of shape is decided, full weight "
        f"and scales the cleaner ones down; the same 1-vector run reaches {_pct(R['ti-1v-word']['target'])}, "
        f"{_pct(R['ti-1v-word-g1']['target'])} with gamma 1 and {_pct(R['ti-1v-word-plain']['target'])} with the "
        "plain loss. " + _rest(R[best]),
        "",
        "`ti nearest` on the 1-vector token: nearest vocabulary rows by cosine "
        + ", ".join(f"{w} {c:+.3f}" for w, _, c in nb["top"])
        + f"; the init word \"shape\" now {nb['init_cosine']:+.3f} (rank {nb['init_rank']}); |v| = {nb['norm']:.2f} "
        f"against a median vocabulary row of {nb['vocab_median_norm']:.2f}: a new point, not an existing word.",
        "",
        "## The unseen style (striped)",
        "",
        "| prompt | striped rate | what the analyzer found (style) |",
        "| --- | --- | --- |",
        f"| base model, \"striped circle/square/triangle\" | {_pct(bs['target'])} | {_found(bs['found'])} |",
        f"| `{STYLE_TOKEN}` (1 vector, init \"striped\") | {_pct(R['ti-style']['target'])} | {_found(R['ti-style']['found'])} |",
        "",
        (f"A learned token leaves the striped rate at {_pct(bs['target'])} " if _pct(bs['target']) == _pct(R['ti-style']['target'])
         else f"A learned token moves the striped rate from {_pct(bs['target'])} to {_pct(R['ti-style']['target'])} ") +
        f"(the analyzer reads {_found(R['ti-style']['found'])}) and costs the rest of the prompt: colour right "
        f"{_pct(R['ti-style']['colour'])}, position right {_pct(R['ti-style']['position'])}. As the issue "
        "predicts, a new input vector can only point the frozen U-Net at what it already draws, and it never drew "
        "stripes; LoRA changes the weights and can (docs/lora.md).",
        "",
        "## Leakage",
        "",
        f"`ti verify`: {res['leakage']['identical']} of {res['leakage']['prompts']} prompts without the token render "
        f"bit-identically with the embedding loaded; {res['leakage']['tensors_hashed']} weight tensors hashed, "
        + ("none changed." if not res["leakage"]["weights_changed"] else f"CHANGED: {res['leakage']['weights_changed']}"),
        "",
        "## The no-training alternative: img2img and inpainting from one picture",
        "",
        f"Reference: the first training picture (\"{res['alternative']['reference']}\"), star word replaced by \"shape\".",
        "",
        "| method | star kept | asked-for colour | asked-for background | position |",
        "| --- | --- | --- | --- | --- |",
    ]
    for s, r in res["alternative"]["img2img"].items():
        lines.append(f"| img2img strength {s}, other colours | {_pct(r['target'])} | {_pct(r['colour'])} | - | {_pct(r['position'])} |")
    ip = res["alternative"]["inpaint"]
    lines.append(f"| inpaint all but the star, other backgrounds | {_pct(ip['target'])} | {_pct(ip['colour'])} | "
                 f"{_pct(ip['background'])} | {_pct(ip['position'])} |")
    lines += ["", "They keep the one reference (its place, its size) and change what the prompt may change; they "
              "cannot put the star somewhere else or into a new composition. A learned token can. (Inpainting keeps "
              "the star's own pixels; its anti-aliased edge pixels still carry the old background's colour, which "
              "is the likely reason the analyzer does not always read a star there.)", ""]
    lines += comparison(res)
    lines += ["", "## Samples", "", "The first 12 evaluation pictures of each run, rows top to bottom: "
              + "; ".join(label.get(k, f"`{STYLE_TOKEN}` on the striped prompts") for k in GRID_ROWS) + ".", "",
              f"![samples]({png})", ""]
    return "\n".join(lines)


def comparison(res: dict) -> list[str]:
    runs, R, alt = res["runs"], res["rates"], res["alternative"]
    base_shape = _pct(R["base 'shape'"]["target"])
    lines = ["## Three knobs on an unnamed shape", "",
             "Textual inversion and img2img learn or keep the star; the LoRA row is the LoRA page's subject "
             "experiment, whose concept is the heart (outlined stars drew poorly in its composition test), so "
             "compare its rate with its own base rate.", "",
             "| knob | trainable parameters | file | training time | fidelity (star rate, varied prompts) | "
             "leakage (prompts without the trigger) |", "| --- | --- | --- | --- | --- | --- |"]
    for k in ("ti-1v-word", "ti-4v-word"):
        r = runs[k]
        lines.append(f"| textual inversion, {r['vectors']} vector(s) | {r['effective_params']:,} ({r['vectors']} x "
                     f"{r['width']}; the optimizer holds the whole {r['optimizer_params']:,}-value matrix, other rows "
                     f"restored) | {r['file_bytes']:,} B | {r['seconds']:.0f} s ({res['settings']['steps']} steps) | "
                     f"{_pct(R[k]['target'])} (base \"shape\" {base_shape}) | none: plain "
                     f"prompts bit-identical ({res['leakage']['identical']}/{res['leakage']['prompts']}) |")
    lo = res.get("lora")
    if lo:
        size = f"{lo['file_bytes']:,} B" if "file_bytes" in lo else "?"
        params = f"{lo['params']:,} (rank {lo['rank']} on {lo['layers']} layers)" if "params" in lo else "?"
        lines.append(f"| LoRA subject, `sks shape` (its concept: the {lo.get('kind', 'star')}, {lo['images']} pictures; "
                     f"from `{lo['source']}`) | {params} | {size} | "
                     f"{lo['train_s']:.0f} s ({lo['steps']} steps) | {_pct(lo['lora_sks'])} on the LoRA results' own prompts "
                     f"(base \"sks shape\" {_pct(lo['base_sks'])}) | plain \"shape\" prompts: {lo.get('kind', 'star')} rate "
                     f"{_pct(lo['base_plain'])} -> {_pct(lo['lora_plain'])} |")
    else:
        lines.append("| LoRA | *not measured here: the LoRA results (out/lora-results/results.json, written by "
                     "`python -m sdknobs.lora.results`) were not present when this page was made; see docs/lora.md* "
                     "| | | | |")
    best = max(alt["img2img"].items(), key=lambda kv: kv[1]["target"] * kv[1]["colour"])
    lines.append(f"| img2img from one picture (strength {best[0]}) | 0 | none | 0 s | {_pct(best[1]['target'])} star kept, "
                 f"{_pct(best[1]['colour'])} colour followed (one place and size only) | n/a (no model change) |")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / "docs" / "textual_inversion.md"))
    p.add_argument("--quick", action="store_true", help="tiny settings to check the script runs (about a minute)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1: on a shared 2-core machine, 2 threads run up to 30x slower when another process is busy)")
    p.add_argument("--lora-results", default="", help="the LoRA results.json (default: docs/lora/results.json)")
    p.add_argument("--from-json", default="", help="only rewrite the page from a ti_results.json (re-reads the LoRA figures)")
    for f in Settings.__dataclass_fields__.values():
        p.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=None)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    st = Settings(steps=6, images=6, n_eval=6, sample_steps=6, work="runs/ti-results-quick") if a.quick else Settings()
    for f in Settings.__dataclass_fields__:
        if getattr(a, f) is not None:
            setattr(st, f, getattr(a, f))
    if a.from_json:
        res = json.loads(Path(a.from_json).read_text())
        res["lora"] = lora_figures(a.lora_results or None)
        Path(a.out).write_text(markdown(res, "ti_samples.png", res.get("quick", False)))
        print(f"wrote {a.out}")
        return 0
    from sdknobs.cli import _quiet_libraries

    _quiet_libraries()
    res = run(st, Path(a.out), a.quick, a.lora_results or None)
    print(f"wrote {a.out} in {res['seconds_total'] / 60:.1f} min")
    for k, r in res["rates"].items():
        print(f"  {k:<16} target {_pct(r['target'])}  colour {_pct(r['colour'])}  position {_pct(r['position'])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
