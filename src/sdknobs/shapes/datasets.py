"""`sdknobs dataset SET --out FOLDER`: the training folders the docs use, made from the shapes world.

Every folder is kohya's layout, the one `training/data.py::read_folder` reads: `00000.png` + `00000.txt`
(its caption), ... plus `truth.jsonl` (each picture's scene, for the analyzers; `prompts.jsonl` for
`class`, whose pictures are the model's own). Sets, with the defaults the measured results in
docs/lora.md and docs/textual_inversion.md were made with (`lora/results.py`, `ti/results.py`: the same
generator calls, so the same pictures and captions):

  style    --style outline: 100 pictures of all five kinds, seed 1, captions name the style
           ("a large red outlined circle ...")                                 (LoRA style results)
           --style striped: 20 pictures of circle/square/triangle, seed 12     (textual-inversion style results)
  subject  --kind heart: 16 one-heart pictures, seed 1                         (LoRA subject results)
           --kind star: 20 star pictures (30% two-shape scenes), seed 11       (textual-inversion star results)
           captions say "shape" where the subject is; --token "sks shape" (or "<star-shape>") writes that
           instead (the trainers can also put it in: train-lora --instance-token/--class-word,
           train-ti --template captions --caption-word shape)
  class    prior-preservation (DreamBooth class) pictures: the base model's own samples for "shape"
           prompts of the subject's scenes (24, scene seed 99, sampler seed 100: --kind heart)
  shapes   the pretraining distribution: all kinds, solid, 30% two-shape scenes (100 pictures, seed 0)

Validated before anything is written; the folder is written under a temporary name and renamed. A
non-empty --out is refused unless --overwrite, and even then only a folder this command wrote (only
NNNNN.png/.txt and its .jsonl) is replaced."""
from __future__ import annotations

import json
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

from sdknobs.errors import SdknobsError
from sdknobs.shapes import world

SETS = ("style", "subject", "class", "shapes")
MAX_COUNT = 100_000
# (set, style or kind) -> the generator arguments of the docs' results; count/seed/two_shapes flags override
PRESETS: dict[tuple[str, str], dict] = {
    ("style", "outline"): dict(count=100, seed=1, kinds=world.KINDS, two_shapes=0.3),  # lora/results.py style_data
    ("style", "striped"): dict(count=20, seed=12, kinds=world.KINDS_NAMED, two_shapes=0.3,  # ti/results.py datasets
                               words={k: k for k in world.KINDS_NAMED}),
    ("subject", "heart"): dict(count=16, seed=1, two_shapes=0.0),  # lora/results.py run_subject
    ("subject", "star"): dict(count=20, seed=11, two_shapes=0.3),  # ti/results.py datasets
    ("class", "heart"): dict(count=24, seed=99, sample_seed=100),  # lora/results.py class_images
    ("shapes", ""): dict(count=100, seed=0, kinds=world.KINDS, two_shapes=0.3),
}
DEFAULTS = {("style", ""): dict(count=100, seed=1, kinds=world.KINDS, two_shapes=0.3),
            ("subject", ""): dict(count=16, seed=1, two_shapes=0.0), ("class", ""): dict(count=24, seed=99, sample_seed=100)}
_OURS = re.compile(r"^\d{5}\.(png|txt)$|^(truth|prompts)\.jsonl$")


def _f(default, help, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class DatasetFlags:
    """`sdknobs dataset`'s flags (SET is the positional argument)."""

    out: str = _f("", "the folder to write (required); a non-empty one is an error unless --overwrite", required=True)
    style: str = _f("outline", "style set: outline (docs/lora.md's style LoRA) or striped (docs/textual_inversion.md)")
    kind: str = _f("heart", "subject and class sets: the subject's kind, heart (docs/lora.md) or star "
                            "(docs/textual_inversion.md); circle, square, triangle work too")
    count: int | None = _f(None, "pictures to write", type=int,
                           shown="the set's: style outline 100, striped 20; subject heart 16, star 20; class 24; shapes 100")
    seed: int | None = _f(None, "scene seed: the same seed and flags write the same folder", type=int,
                          shown="the set's: style outline 1, striped 12; subject heart 1, star 11; class 99; shapes 0")
    two_shapes: float | None = _f(None, "fraction of scenes with two shapes (style, subject, shapes sets)", type=float,
                                  shown="0 for subject heart, else 0.3")
    token: str = _f("", "subject set: write this where the subject's word 'shape' goes (e.g. "
                        "'sks shape', '<star-shape>'); empty: captions say 'shape' and the trainer adds the token")
    name_style: bool = _f(True, "style set: captions name the style ('outlined', 'striped'); --no-name-style leaves "
                                "the word out")
    size: int | None = _f(None, "picture size in px (square), a multiple of 8 (not for class: the model's own size)",
                          type=int, shown="32")
    model: str = _f("shapes", "class set: the model whose own samples are the class pictures")
    sample_seed: int | None = _f(None, "class set: the sampler's seed", type=int, shown="100")
    steps: int | None = _f(None, "class set: sampler steps", type=int, shown="the model's: 30 for shapes")
    device: str = _f("", "class set: where to sample (default: cpu, in fp32, as the docs' results)")
    overwrite: bool = _f(False, "replace a folder this command wrote before")
    progress: bool = _f(True, "show a progress bar")


@dataclass
class DatasetConfig(DatasetFlags):
    set: str = _f("shapes", f"which set: {', '.join(SETS)}")

    def __post_init__(self):
        from sdknobs.config import check_numbers
        from sdknobs.images import check_multiple
        from sdknobs.loop import check_seed

        check_numbers(self)
        if self.set not in SETS:
            raise SdknobsError(f"dataset SET {self.set!r} is not known; choose one of {', '.join(SETS)}")
        if not str(self.out).strip():
            raise SdknobsError("--out is required: the folder to write the pictures and captions into")
        if self.set == "style" and self.style not in ("outline", "striped"):
            raise SdknobsError(f"--style {self.style!r} is not known; choose outline or striped")
        if self.set in ("subject", "class") and self.kind not in world.KINDS:
            raise SdknobsError(f"--kind {self.kind!r} is not known; choose one of {', '.join(world.KINDS)}")
        if self.count is not None and not 1 <= self.count <= MAX_COUNT:
            raise SdknobsError(f"--count must be in 1..{MAX_COUNT} pictures, got {self.count}")
        for flag in ("seed", "sample_seed"):
            v = getattr(self, flag)
            if v is not None:
                check_seed(v, "--" + flag.replace("_", "-"))
                if v == -1:
                    raise SdknobsError(f"--{flag.replace('_', '-')} must be an integer >= 0 (a dataset is made to be "
                                       f"remade), got -1")
        if self.steps is not None and self.steps < 1:
            raise SdknobsError(f"--steps must be >= 1, got {self.steps}")
        given = [f for f, ok in (("--steps", self.steps is None), ("--sample-seed", self.sample_seed is None),
                                 ("--device", not self.device), ("--model", self.model == "shapes")) if not ok]
        if self.set == "class":
            given = [f for f, ok in (("--size", self.size is None), ("--two-shapes", self.two_shapes is None)) if not ok]
            if given:
                raise SdknobsError(f"{given[0]} does not apply to the class set: its pictures are the model's own "
                                   f"samples at the model's size, one subject each")
        elif given:
            raise SdknobsError(f"{given[0]} applies to the class set only (it samples a model); the {self.set} set is "
                               f"rendered")
        if self.token and self.set != "subject":
            raise SdknobsError(f"--token applies to the subject set only; got it for the {self.set} set")
        if self.two_shapes is not None and not 0.0 <= self.two_shapes <= 1.0:
            raise SdknobsError(f"--two-shapes must be a fraction in [0, 1], got {self.two_shapes}")
        if any(c in self.token for c in "\r\n"):
            raise SdknobsError(f"--token must be one line of text, got {self.token!r}")
        if self.size is None:
            self.size = 32 if self.set != "class" else None
        if self.size is not None:
            check_multiple("--size", self.size, 8)
        if self.size is not None and self.size > 2048:
            raise SdknobsError(f"--size must be at most 2048 px, got {self.size}")
        if self.device:
            from sdknobs.model import resolve_device_dtype

            resolve_device_dtype(self.device, None)

    def settings(self) -> dict:
        """The generator arguments: the preset of (set, style/kind), then the flags given."""
        which = {"style": self.style, "subject": self.kind, "class": self.kind}.get(self.set, "")
        s = dict(PRESETS.get((self.set, which)) or DEFAULTS[(self.set, "")])
        if self.set in ("subject", "class"):
            s["kinds"] = (self.kind,)
        for k in ("count", "seed", "two_shapes", "sample_seed"):
            if getattr(self, k) is not None:
                s[k] = getattr(self, k)
        return s


def check_out_folder(out: str | Path, overwrite: bool) -> Path:
    """Refuse, before any work, a --out that must not be written: a file, a non-empty folder without
    --overwrite, or (even with it) a folder holding anything this command does not write."""
    from sdknobs.atomic import check_out_path

    p = Path(out)
    if p.is_dir() and not p.is_symlink():
        entries = sorted(q.name for q in p.iterdir())
        if entries and not overwrite:
            raise SdknobsError(f"--out {str(out)!r} is a folder that is not empty ({len(entries)} entries); choose a new "
                               f"folder, or pass --overwrite to replace a dataset this command wrote there")
        if entries:
            foreign = [n for n in entries if not _OURS.match(n)]
            if foreign:
                raise SdknobsError(f"--out {str(out)!r} holds files sdknobs dataset did not write (e.g. {foreign[0]!r}); "
                                   f"it will not replace them even with --overwrite: choose a new folder")
            parent = p.absolute().parent  # the new folder is written beside it, then renamed over it
            if not os.access(parent, os.W_OK | os.X_OK) or not os.access(p, os.W_OK | os.X_OK):
                raise SdknobsError(f"--out {str(out)!r}: the folder {str(parent)!r} or {str(out)!r} is not writable")
            return p
    return check_out_path(p, "--out", overwrite=False, folder=True)


def _bar(total: int, progress: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="picture", disable=not progress)


def _write_world(tmp: Path, cfg: DatasetConfig, s: dict) -> None:
    """world.write_dataset's loop (the same generator calls in the same order), with a progress bar."""
    words = dict(s.get("words") or {})
    if cfg.token and cfg.set == "subject":
        words[cfg.kind] = cfg.token
    rng = random.Random(s["seed"])
    kw = dict(kinds=s["kinds"], p_two=s["two_shapes"])
    if cfg.set == "style":
        kw["styles"] = (cfg.style,)
    with open(tmp / "truth.jsonl", "w") as truth, _bar(s["count"], cfg.progress, f"dataset {cfg.set}") as bar:
        for i in range(s["count"]):
            scene = world.sample_scene(rng, **kw)
            cap = world.caption(scene, rng, words=words or None, name_style=cfg.name_style)
            world.render(scene, cfg.size).save(tmp / f"{i:05d}.png")
            (tmp / f"{i:05d}.txt").write_text(cap + "\n")
            truth.write(json.dumps({"file": f"{i:05d}.png", "caption": cap, "scene": scene.to_dict()}) + "\n")
            bar.update()


def _write_class(tmp: Path, cfg: DatasetConfig, s: dict, model) -> None:
    """DreamBooth's prior preservation as lora/results.py::class_images makes it: the model's own pictures for
    "shape" prompts (the subject's scenes, captions without the token), sampled in batches of 50."""
    from sdknobs.lora.results import captions, prompt_scenes
    from sdknobs.shapes.bench import sample

    scenes = prompt_scenes(s["count"], s["seed"], s["kinds"])
    caps = captions(scenes)
    sampling = model.sampling(steps=cfg.steps)
    images = sample(model, caps, steps=sampling["steps"], guidance=sampling["guidance"], seed=s["sample_seed"],
                    scheduler=sampling["scheduler"], progress=cfg.progress)
    with open(tmp / "prompts.jsonl", "w") as rows:
        for i, (im, cap, sc) in enumerate(zip(images, caps, scenes)):
            im.save(tmp / f"{i:05d}.png")
            (tmp / f"{i:05d}.txt").write_text(cap + "\n")
            rows.write(json.dumps({"file": f"{i:05d}.png", "caption": cap, "prompted_scene": sc.to_dict(),
                                   "model": str(cfg.model), "seed": s["sample_seed"], **sampling}) + "\n")


def make_dataset(cfg: DatasetConfig) -> dict:
    """Write the set into cfg.out (atomically); returns a summary (folder, images, captions)."""
    from sdknobs.atomic import atomic_folder

    s = cfg.settings()
    out = check_out_folder(cfg.out, cfg.overwrite)
    if cfg.set == "class":
        from sdknobs.lora.results import prompt_scenes

        most = len(prompt_scenes(MAX_COUNT, 0, s["kinds"]))
        if s["count"] > most:
            raise SdknobsError(f"--count {s['count']}: the class set has at most {most} distinct prompts "
                               f"(colour x position x size x background)")
        from sdknobs.model import load_model

        model = load_model(cfg.model, device=cfg.device or "cpu", dtype=None if cfg.device else "fp32")
        atomic_folder(out, lambda tmp: _write_class(Path(tmp), cfg, s, model))
    else:
        atomic_folder(out, lambda tmp: _write_world(Path(tmp), cfg, s))
    n = s["count"]
    return {"folder": str(out), "images": n, "captions": n, "set": cfg.set, "seed": s["seed"]}


def cmd_dataset(args) -> None:
    from dataclasses import fields

    cfg = DatasetConfig(set=args.set, **{f.name: getattr(args, f.name) for f in fields(DatasetFlags)})
    r = make_dataset(cfg)
    side = "the model's size" if cfg.set == "class" else f"{cfg.size}x{cfg.size} px"
    print(f"wrote {r['images']} images ({side}) and {r['captions']} captions (.txt beside each) to {r['folder']}")


def register_cli(sub) -> None:
    from sdknobs.flags import add_config_args

    help = "write a training folder from the shapes world (style, subject, class, shapes), as the docs use"
    sp = sub.add_parser("dataset", help=help, description=help + "; the defaults are those of the docs' measured results")
    sp.add_argument("set", metavar="SET", choices=SETS, help=f"which set: {', '.join(SETS)}")
    add_config_args(sp, DatasetFlags)
    sp.set_defaults(func=cmd_dataset, config=None)
