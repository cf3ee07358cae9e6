"""`sdknobs grid`: AUTOMATIC1111's X/Y/Z plot. Up to three axes, across (X), down (Y) and one sheet per
value (Z), each one of: prompt S/R, seed, strength, guidance, steps, scheduler, LoRA weight, mask blur.

Axis strings are A1111's: `NAME=V1,V2,...` (values split as CSV, so a value with a comma is quoted:
`prompt="red, round",blue`), and for number axes each value may be a range:

    1-5          every integer (int axes) or every whole step of 1 (float axes) from 1 to 5, ends included
    10-30 (+10)  10, 20, 30: a step in parentheses (A1111 wants the sign; here it is optional)
    30-10 (-10)  30, 20, 10: counting down (the end is included, also for int axes, where A1111 stops one short)
    0.2-1 [5]    5 values spread evenly from 0.2 to 1 (numpy.linspace; int axes truncate, as A1111 does)

Float steps are taken as whole multiples of the step up to the end within 1e-9 of a step (A1111's
numpy.arange can add a value past the end from rounding), and every float is rounded to 12 significant
digits, so 0-1 (+0.1) is 0, 0.1, ..., 1 exactly as typed.

Every cell is one call of the pipeline the flags pick (generate; img2img with --image; inpaint with --image
and --mask), with the flags' settings and the cell's axis values: its picture and its `parameters` text are
the ones that single command writes, so a cell re-renders alone (`sdknobs generate --from-png CELL.png`).
A base --seed -1 is drawn once for the whole grid; a seed axis value -1 is drawn once per value.
Everything is checked before the first cell is sampled."""
from __future__ import annotations

import copy
import csv
import dataclasses
import io
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw

from sdknobs.config import MASK_BLUR_DEFAULT, SampleConfig, _f
from sdknobs.errors import SdknobsError
from sdknobs.loop import SCHEDULERS, check_seed, check_steps, resolve_seed

MAX_CELLS = 1024  # pictures in one grid (each is a sampling run)
MAX_SHEET_PIXELS = 2 * Image.MAX_IMAGE_PIXELS  # what sdknobs itself reads back (images.MAX_PIXELS)
FLOAT_DIGITS = 12


@dataclass(frozen=True)
class Kind:
    name: str
    type: type
    label: str  # the axis title on the sheet, A1111's 'Seed: 0' (empty: the value alone)
    aliases: tuple = ()


KINDS = {k.name: k for k in [
    Kind("prompt", str, "", ("sr", "prompt-sr", "prompt-s/r")),
    Kind("seed", int, "seed"),
    Kind("strength", float, "strength", ("denoise", "denoising", "denoising-strength")),
    Kind("guidance", float, "guidance", ("cfg", "cfg-scale")),
    Kind("steps", int, "steps"),
    Kind("scheduler", str, "", ("sampler",)),
    Kind("lora", float, "lora"),
    Kind("mask-blur", float, "mask blur", ("blur",)),
]}
_ALIASES = {a: k.name for k in KINDS.values() for a in (k.name, *k.aliases)}
_SAMPLER_NAMES = {v[2].lower(): k for k, v in SCHEDULERS.items()}  # A1111's names too: 'Euler a', 'DPM++ 2M Karras'

_NUM_I = r"[+-]?\s*\d+"
_NUM_F = r"[+-]?\s*(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?"


def _range_re(num: str) -> re.Pattern:
    return re.compile(rf"\s*({num})\s*-\s*({num})\s*(?:\(\s*({num})\s*\)|\[\s*(\d+)\s*\])?\s*")


_RANGE = {int: _range_re(_NUM_I), float: _range_re(_NUM_F)}


def _num(text: str, typ, what: str):
    t = text.replace(" ", "")
    try:
        v = typ(t)
    except ValueError:
        raise SdknobsError(f"{what}: {text.strip()!r} is not {'an integer' if typ is int else 'a number'}") from None
    if typ is float:
        if not math.isfinite(v):
            raise SdknobsError(f"{what}: {text.strip()!r} is not a finite number")
        v = float(f"{v:.{FLOAT_DIGITS}g}") + 0.0  # + 0.0: no -0.0
    return v


def expand_value(text: str, typ, what: str) -> list:
    """One CSV item of a number axis: a number, or a range (see the module docstring)."""
    m = _RANGE[typ].fullmatch(text)
    if m is None:
        return [_num(text, typ, what)]
    a, b = _num(m[1], typ, what), _num(m[2], typ, what)
    if m[4] is not None:  # [N]: N values, evenly spaced
        n = int(m[4])
        if not 1 <= n <= MAX_CELLS:
            raise SdknobsError(f"{what}: {text.strip()!r} asks for {n} values; give 1..{MAX_CELLS} in [N]")
        vals = [a + (b - a) * i / (n - 1) for i in range(n)] if n > 1 else [a]
        return [int(v) for v in vals] if typ is int else [_num(repr(v), float, what) for v in vals]
    step = _num(m[3], typ, what) if m[3] is not None else (1 if b >= a else -1)
    if step == 0 or (b - a) * step < 0:
        raise SdknobsError(f"{what}: {text.strip()!r}: the step {step:g} does not go from {a:g} to {b:g}")
    n = math.floor((b - a) / step + 1e-9) + 1
    if n > MAX_CELLS:
        raise SdknobsError(f"{what}: {text.strip()!r} gives {n} values, more than the {MAX_CELLS} cells a grid may have")
    return [a + i * step for i in range(n)] if typ is int else [_num(repr(a + i * step), float, what) for i in range(n)]


def split_values(text: str) -> list[str]:
    """A1111's `csv_string_to_list_strip`: CSV items (quotes keep commas), each stripped."""
    return [v.strip() for row in csv.reader(io.StringIO(text), skipinitialspace=True) for v in row]


def _csv(values) -> str:
    out = io.StringIO()
    csv.writer(out, lineterminator="").writerow([_show(v) for v in values])
    return out.getvalue()


def _show(v) -> str:
    return f"{v:g}" if isinstance(v, float) and abs(v) < 1e15 else str(v)


@dataclass
class Axis:
    kind: str  # a KINDS name
    values: list
    target: str = ""  # prompt S/R: the searched term (the first value); lora: the LoRA's name ("" = the only one)
    text: str = ""  # as given, e.g. 'seed=0-3'
    flag: str = "--x"
    pos: int = 0  # 0 across (X), 1 down (Y), 2 one sheet per value (Z)

    @property
    def key(self) -> tuple:
        return (self.kind, self.target)

    @property
    def type_name(self) -> str:
        return self.kind + (f":{self.target}" if self.kind == "lora" and self.target else "")

    def title(self, v) -> str:
        """The column/row title of value v, A1111's 'Label: value' (prompt S/R and schedulers: the value)."""
        label = KINDS[self.kind].label
        if self.kind == "lora" and self.target:
            label = f"lora {self.target}"
        if not label:
            return str(v) if v != "" else "(empty)"
        return f"{label}: {_show(v)}"


def parse_axis(text: str, flag: str = "--x") -> Axis:
    """`NAME=VALUES` -> an Axis with its values expanded and each checked on its own (`check_value`)."""
    name, eq, vals = text.partition("=")
    key = re.sub(r"[\s_]+", "-", name.strip().lower())  # A1111's labels too: 'CFG Scale', 'Prompt S/R'
    target = ""
    if key.startswith("lora:"):
        key, target = "lora", name.strip()[5:].strip()
        if not target:
            raise SdknobsError(f"{flag} {text!r}: lora: needs a name, as in lora:style=0,0.5,1")
    kinds = ", ".join(KINDS)
    if not eq or not key:
        raise SdknobsError(f"{flag} {text!r}: expected NAME=VALUES, e.g. {flag} \"seed=0,1,2\"; NAME is one of {kinds}")
    if key not in _ALIASES:
        raise SdknobsError(f"{flag} {text!r}: unknown axis {name.strip()!r}; choose one of {kinds} (or lora:NAME)")
    kind = KINDS[_ALIASES[key]]
    items = split_values(vals)
    what = f"{flag} {kind.name}"
    if not items or items == [""]:
        raise SdknobsError(f"{flag} {text!r}: no values after '='")
    values = []
    for item in items:
        if item == "" and kind.name != "prompt":
            raise SdknobsError(f"{what}: an empty value in {vals.strip()!r}")
        values += expand_value(item, kind.type, what) if kind.type in (int, float) else [item]
    if kind.name == "prompt":
        if not values[0]:
            raise SdknobsError(f"{what}: the first value is the text to search for in the prompt; it is empty")
        target = values[0]
    if len(values) > MAX_CELLS:
        raise SdknobsError(f"{what}: {len(values)} values, more than the {MAX_CELLS} cells a grid may have")
    axis = Axis(kind.name, values, target, text, flag, "xyz".index(flag[-1]) if flag[-1] in "xyz" else 0)
    axis.values = [check_value(axis, v) for v in values]
    return axis


def check_value(axis: Axis, v):
    """A value the pipelines take, or SdknobsError naming the axis and the value (checks needing no model)."""
    what = f"{axis.flag} {axis.type_name} value {_show(v)!r}"
    k = axis.kind
    if k == "seed":
        check_seed(v, what)
        return resolve_seed(v)  # -1: drawn now, once, so the cell records and re-renders it
    if k == "steps" and v < 1:
        raise SdknobsError(f"{what}: steps must be >= 1")
    if k == "strength" and not 0.0 <= v <= 1.0:
        raise SdknobsError(f"{what}: strength must be in [0, 1]")
    if k in ("guidance", "mask-blur") and v < 0:
        raise SdknobsError(f"{what}: must be >= 0")
    if k == "scheduler":
        name = v if v in SCHEDULERS else _SAMPLER_NAMES.get(v.lower())
        if name is None:
            raise SdknobsError(f"{what}: unknown scheduler; choose one of {', '.join(SCHEDULERS)} "
                               f"(or A1111's names: {', '.join(s[2] for s in SCHEDULERS.values())})")
        return name
    return v


# ---------------------------------------------------------------- LoRA axes

_TAG = re.compile(r"<lora:(?P<name>[^:<>]+)(?P<rest>(?::[^:<>]*)?(?::[^<>]*)?)>")


def _tag_names(text: str) -> list[str]:
    return [m["name"].strip() for m in _TAG.finditer(text)]


def _set_tag_weight(text: str, name: str, weight: float) -> str:
    """`<lora:NAME:W[:WINDOW]>` with W replaced (added where the tag has none)."""

    def sub(m):
        if m["name"].strip() != name:
            return m.group(0)
        parts = m["rest"].split(":")  # ['', W, WINDOW?]
        window = f":{parts[2]}" if len(parts) > 2 else ""
        return f"<lora:{m['name']}:{_show(weight)}{window}>"

    return _TAG.sub(sub, text)


def _lora_target(axis: Axis, specs: list, prompt: str, negative: str):
    """('flag', index into --lora) or ('tag', NAME): which LoRA a lora axis varies."""
    from sdknobs.lora.spec import parse_spec

    specs = [parse_spec(s) for s in specs]
    tags = list(dict.fromkeys(_tag_names(prompt + " " + negative)))
    name = axis.target
    flags = [i for i, s in enumerate(specs) if not name or name in (s.path, Path(s.path).stem, Path(s.path).name)]
    hits = [("flag", i) for i in flags] + [("tag", t) for t in tags if not name or t == name or Path(t).name == name]
    if len(hits) == 1:
        return hits[0]
    what = f"{axis.flag} {axis.type_name}"
    have = [f"--lora {specs[i].path}" for i in range(len(specs))] + [f"<lora:{t}>" for t in tags]
    if not hits:
        there = f"; there are: {', '.join(have)}" if have else "; give --lora FILE or put <lora:NAME:W> in --prompt"
        raise SdknobsError(f"{what}: no LoRA {'named ' + repr(name) + ' ' if name else ''}to vary{there}")
    raise SdknobsError(f"{what}: {len(hits)} LoRAs could be meant ({', '.join(have)}); name one: lora:NAME=...")


# ---------------------------------------------------------------- the config and the plan


@dataclass
class GridConfig(SampleConfig):
    """`sdknobs grid`: the sampling flags, plus the axes."""

    x: str = _f("", "the axis across, NAME=VALUES: prompt=SEARCH,REPLACE1,... (A1111's Prompt S/R), seed=, strength=, "
                    "guidance=, steps=, scheduler=, lora= (the weight of the one --lora or <lora:NAME:W> tag; "
                    "lora:NAME= picks one), mask-blur=; values are CSV, number ranges as in A1111: 1-5, 10-30 (+10), "
                    "0.2-1 [5]; e.g. \"seed=0-3\" (required)", required=True)
    y: str = _f("", "the axis down, as --x (empty: one row)")
    z: str = _f("", "one sheet per value of this axis, as --x (empty: one sheet); sheets are NAME-z0.png, NAME-z1.png ...")
    image: str = _f("", "input image: cells run img2img (with --mask: inpaint); needed for a strength axis")
    mask: str = _f("", "mask image, white = repaint: cells run inpaint (needs --image); needed for a mask-blur axis")
    strength: float | None = _f(None, "denoising strength of every cell (a strength axis overrides it)", type=float,
                                shown="0.75 with --image, 1.0 with --mask")
    mask_blur: float | None = _f(None, "Gaussian radius in px of the inpaint paste-back (a mask-blur axis overrides it)",
                                 type=float, shown=MASK_BLUR_DEFAULT)
    only_masked: bool = _f(False, "inpaint cells: only the mask's bounding box (+ --padding) at full resolution, pasted back")
    padding: int = _f(32, "padding in px around the mask for --only-masked")
    resize_mask: bool = _f(False, "resize a mask whose size differs from the image instead of failing")
    cell_labels: str = _f("none", "text under each cell: none, values (its axis values) or start (strength, start step "
                                  "and alpha_bar, as sweep-strength; needs --image)")
    save_cells: bool = _f(False, "also write every cell as NAME-x<i>-y<j>[-z<k>].png with its own parameters (each "
                                 "re-renders alone with --from-png)")
    scale: int = _f(0, "upscale each cell this many times (nearest) on the sheet; 0: enough for 128 px cells")
    out: str = _f("out/grid.png", "the sheet PNG (with --z: NAME-z0.png, NAME-z1.png ...); an existing file is an "
                                  "error unless --overwrite")

    def __post_init__(self):
        super().__post_init__()
        if self.batch != 1 or self.batch_count != 1:
            raise SdknobsError(f"--batch {self.batch} / --batch-count {self.batch_count}: a grid draws one picture per "
                               f"cell; vary the seed on an axis instead, e.g. --y \"seed=0-3\"")
        if not self.grid:
            raise SdknobsError("--no-grid: the sheet is what sdknobs grid writes (--save-cells adds every cell)")
        if self.strength is not None and not 0.0 <= self.strength <= 1.0:
            raise SdknobsError(f"--strength must be in [0, 1], got {self.strength}")
        if self.mask_blur is not None and self.mask_blur < 0:
            raise SdknobsError(f"--mask-blur must be >= 0, got {self.mask_blur}")
        if self.mask and not self.image:
            raise SdknobsError("--mask needs --image (the picture to inpaint)")
        if self.strength is not None and not self.image:
            raise SdknobsError(f"--strength {self.strength:g} needs --image (img2img or inpaint)")
        if self.mask_blur is not None and not self.mask:
            raise SdknobsError(f"--mask-blur {self.mask_blur:g} needs --mask (inpaint)")
        for flag, given in (("--only-masked", self.only_masked), ("--padding", self.padding != 32),
                            ("--resize-mask", self.resize_mask)):
            if given and not self.mask:
                raise SdknobsError(f"{flag} is for inpainting cells: it needs --mask (and --image)")
        if self.padding < 0:
            raise SdknobsError(f"--padding must be >= 0, got {self.padding}")
        if self.cell_labels not in ("none", "values", "start"):
            raise SdknobsError(f"--cell-labels {self.cell_labels!r} is not known; choose none, values or start")
        if self.cell_labels == "start" and not self.image:
            raise SdknobsError("--cell-labels start shows img2img's start step: it needs --image")
        if not 0 <= self.scale <= 64:
            raise SdknobsError(f"--scale must be in 0..64, got {self.scale}")
        self.plan()  # every axis value, before the model is loaded

    def axes(self) -> list[Axis]:
        """The given axes, each parsed and checked, X first; empty Y/Z are left out."""
        axes = [parse_axis(t, f) for f, t in (("--x", self.x), ("--y", self.y), ("--z", self.z)) if t.strip()]
        if not axes:
            raise SdknobsError("--x is empty; give an axis, e.g. --x \"seed=0,1,2\"")
        seen = {}
        for a in axes:
            if a.key in seen:
                raise SdknobsError(f"{a.flag} {a.text!r}: the {a.type_name} axis is already {seen[a.key]}; "
                                   f"each axis varies one setting")
            seen[a.key] = a.flag
            if a.kind == "strength" and not self.image:
                raise SdknobsError(f"{a.flag} {a.text!r}: a strength axis needs --image (img2img or inpaint)")
            if a.kind == "mask-blur" and not self.mask:
                raise SdknobsError(f"{a.flag} {a.text!r}: a mask-blur axis needs --mask (inpaint)")
        return axes

    def plan(self) -> "Plan":
        axes = self.axes()
        plan = Plan(axes, self.prompt, self.negative_prompt, self.sample_kwargs(), list(self.lora),
                    mode="inpaint" if self.mask else "img2img" if self.image else "generate")
        if self.strength is not None:
            plan.base["strength"] = self.strength
        if self.mask_blur is not None:
            plan.base["mask_blur"] = self.mask_blur
        if self.mask:
            plan.base.update(only_masked=self.only_masked, padding=self.padding, resize_mask=self.resize_mask)
        plan.check()
        return plan


@dataclass
class Cell:
    index: tuple  # (ix, iy, iz)
    values: tuple  # one per axis
    prompt: str
    kwargs: dict  # for the pipeline: everything but the model, image(s) and prompt


@dataclass
class Plan:
    """What each cell runs: the axes applied on top of the base settings, in A1111's order (X, then Y, then Z)."""

    axes: list
    prompt: str
    negative_prompt: str
    base: dict  # pipeline keyword arguments shared by every cell
    lora: list = field(default_factory=list)  # the --lora specs
    mode: str = "generate"

    def __post_init__(self):
        from sdknobs.lora.spec import parse_spec

        self.base = {k: v for k, v in self.base.items() if k != "batch"}
        self.base["seed"] = resolve_seed(self.base.get("seed", 0))  # -1: one draw for the whole grid
        self.lora = [parse_spec(s) for s in self.lora]
        self.targets = {a.key: _lora_target(a, self.lora, self.prompt, self.negative_prompt)
                        for a in self.axes if a.kind == "lora"}
        if self.varies_flag_lora:  # applied per cell: a missing file would only show at the first cell
            for spec in self.lora:
                if not Path(spec.path).is_file():
                    raise SdknobsError(f"--lora {str(spec)!r}: no such file {spec.path!r}")
        for a in self.axes:
            if a.kind == "prompt" and a.target not in self.prompt and a.target not in self.negative_prompt:
                raise SdknobsError(f"{a.flag} prompt: {a.target!r} (the first value, the text to replace) is not in "
                                   f"--prompt or --negative-prompt")

    @property
    def shape(self) -> tuple[int, int, int]:
        n = [1, 1, 1]
        for a in self.axes:
            n[a.pos] = len(a.values)
        return n[0], n[1], n[2]

    def slot(self, pos: int):
        """The axis across (0), down (1) or per sheet (2), or None."""
        return next((a for a in self.axes if a.pos == pos), None)

    @property
    def varies_flag_lora(self) -> bool:
        """A lora axis changes a --lora weight: the LoRAs are applied per cell (`lora=`), not once on the model."""
        return any(t[0] == "flag" for t in self.targets.values())

    def cell(self, ix: int, iy: int, iz: int) -> Cell:
        values = tuple(a.values[(ix, iy, iz)[a.pos]] for a in self.axes)
        prompt, neg, kw = self.prompt, self.negative_prompt, dict(self.base)
        specs = list(self.lora)
        for a, v in sorted(zip(self.axes, values), key=lambda av: av[0].kind != "prompt"):  # S/R before tag weights
            if a.kind == "prompt":
                prompt, neg = prompt.replace(a.target, v), neg.replace(a.target, v)
            elif a.kind == "lora":
                where, which = self.targets[a.key]
                if where == "flag":
                    specs[which] = dataclasses.replace(specs[which], weight=float(v))
                else:
                    prompt, neg = _set_tag_weight(prompt, which, v), _set_tag_weight(neg, which, v)
            else:
                kw[a.kind.replace("-", "_")] = v
        if self.varies_flag_lora:
            kw["lora"] = [str(s) for s in specs]
        kw["negative_prompt"] = neg
        return Cell((ix, iy, iz), values, prompt, kw)

    def cells(self):
        nx, ny, nz = self.shape
        return [self.cell(ix, iy, iz) for iz in range(nz) for iy in range(ny) for ix in range(nx)]

    def check(self) -> None:
        """The checks that need no model: the cell count, and every cell's prompt (its tags and weights)."""
        from sdknobs.prompt import check_prompt

        nx, ny, nz = self.shape
        if nx * ny * nz > MAX_CELLS:
            raise SdknobsError(f"--x/--y/--z: {nx} x {ny} x {nz} = {nx * ny * nz} cells, more than the {MAX_CELLS} a "
                               f"grid may have; use fewer values")
        lora_dir, emb_dir = self.base.get("lora_dir"), self.base.get("embedding_dir")
        checked = set()
        for a in self.axes:
            if a.kind not in ("prompt", "lora") or a.key in self.targets and self.targets[a.key][0] == "flag":
                continue
            for i in range(len(a.values)):
                c = self.cell(*[i if p == a.pos else 0 for p in range(3)])
                for text, flag in ((c.prompt, "--prompt"), (c.kwargs["negative_prompt"], "--negative-prompt")):
                    if text not in checked:
                        checked.add(text)
                        check_prompt(text, lora_dir, emb_dir, f"{a.flag} {a.type_name} value {_show(a.values[i])!r}: "
                                                              f"{flag}")

    def check_model(self, model, width: int, height: int, scale: int, labels: str) -> None:
        """The checks that need the model, before any sampling: steps against its scheduler, memory of one cell,
        and the size of a sheet."""
        from sdknobs.model import available_memory
        from sdknobs.pipelines import check_memory

        s = model.sampling(guidance=self.base.get("guidance"), steps=self.base.get("steps"),
                           scheduler=self.base.get("scheduler"))
        axes = {a.kind: a for a in self.axes}
        for v in axes["steps"].values if "steps" in axes else [s["steps"]]:
            check_steps(v, model.scheduler_config, f"{axes['steps'].flag} steps value {v}" if "steps" in axes else "--steps")
        guidance = axes["guidance"].values if "guidance" in axes else [s["guidance"]]
        check_memory(model, width, height, 1, cfg=max(guidance) > 1)
        nx, ny, _ = self.shape
        sw, sh = sheet_size(self, width * scale, height * scale, labels)
        if sw * sh > MAX_SHEET_PIXELS:
            raise SdknobsError(f"--x/--y: a sheet of {nx} x {ny} cells of {width * scale}x{height * scale} px is {sw}x{sh} "
                               f"px, past the {MAX_SHEET_PIXELS // 10**6} megapixels sdknobs reads back; use fewer "
                               f"values or a smaller --scale")
        need, have = 3 * (nx * ny * width * height + 2 * sw * sh), available_memory("cpu")
        if have is not None and need > have:
            raise SdknobsError(f"--x/--y: a sheet of {nx} x {ny} cells needs {need / 2**30:.1f} GiB of memory, "
                               f"{have / 2**30:.1f} GiB is free; use fewer values or a smaller --scale")

    def parameters(self, first_cell_params: str, iz: int) -> str:
        """A sheet's `parameters` text: its first cell's, plus A1111's script fields naming the axes."""
        fields = {"Script": "X/Y/Z plot"}
        for a in sorted(self.axes, key=lambda a: a.pos):
            fields[f"{'XYZ'[a.pos]} Type"] = a.type_name
            fields[f"{'XYZ'[a.pos]} Values"] = _csv(a.values)
        if self.slot(2):
            fields["Z Value"] = _csv([self.slot(2).values[iz]])
        extra = ", ".join(f"{k}: {_quote(v)}" for k, v in fields.items())
        return f"{first_cell_params}, {extra}"


def _quote(v: str) -> str:
    return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"' if ("," in v or '"' in v or ":" in v) else v


# ---------------------------------------------------------------- drawing

_TITLE_H = 14  # px of a title line (images.grid's column titles)
_CHAR_W = 6  # PIL's default bitmap font


def _fit(text: str, px: int) -> str:
    n = max(3, px // _CHAR_W)
    return text if len(text) <= n else text[: n - 2] + ".."


def start_label(strength: float, result, steps: int) -> str:
    """sweep-strength's cell label: strength, start step of the run, and alpha_bar there."""
    st = result.start
    if st is None:  # inpaint with nothing to repaint
        return f"s={strength:.2f}\nunchanged"
    return f"s={strength:.2f}\nstart {st.index}/{steps}\nabar={st.alpha_bar:.3f}"


def _titles(plan: Plan, cw: int):
    nx, ny, _ = plan.shape
    x, y = plan.slot(0), plan.slot(1)
    cols = [_fit(x.title(v), cw + 4) for v in x.values]
    rows = [_fit(y.title(v), _CHAR_W * 40) for v in y.values] if y else None  # 40 characters at most
    return cols, rows


def sheet_size(plan: Plan, cw: int, ch: int, labels: str) -> tuple[int, int]:
    """The sheet's size in px, as `images.grid` draws it (plus a title band with a Z axis)."""
    nx, ny, _ = plan.shape
    cols, rows = _titles(plan, cw)
    lines = {"none": 0, "values": len(plan.axes), "start": 3}[labels]
    left = 8 * max(len(t) for t in rows) if rows else 0
    return left + nx * (cw + 4) + 4, (_TITLE_H if plan.slot(2) else 0) + _TITLE_H + ny * (ch + 12 * lines + 4) + 4


def draw_sheet(plan: Plan, cells: list[list[Image.Image]], labels: list[list[str]] | None, scale: int,
               iz: int) -> Image.Image:
    """One sheet: `images.grid` with the X values as column titles and Y values as row titles, and for a Z axis a
    title band on top."""
    from sdknobs import images as im

    cols, rows = _titles(plan, cells[0][0].width * scale)
    g = im.grid(cells, labels, scale=scale, col_titles=cols, row_titles=rows)
    z = plan.slot(2)
    if z is None:
        return g
    out = Image.new("RGB", (g.width, g.height + _TITLE_H), "white")
    out.paste(g, (0, _TITLE_H))
    ImageDraw.Draw(out).text((4, 1), _fit(z.title(z.values[iz]), g.width - 8), fill="black")
    return out


# ---------------------------------------------------------------- running


def _pipeline(mode: str):
    from sdknobs import pipelines

    return {"generate": pipelines.generate, "img2img": pipelines.img2img, "inpaint": pipelines.inpaint}[mode]


def sample_cells(model, plan: Plan, image=None, mask=None, on_cell=None, progress=True):
    """Every cell through its pipeline, X fastest, then Y, then Z (one tqdm bar over cells); `on_cell(cell, result)`
    after each. Returns {(ix, iy, iz): Result}, kept only without `on_cell` (which then decides what stays in memory)."""
    from tqdm.auto import tqdm

    fn = _pipeline(plan.mode)
    args = {"generate": (), "img2img": (image,), "inpaint": (image, mask)}[plan.mode]
    out = {}
    cells = plan.cells()
    for c in tqdm(cells, desc="grid cells", unit="cell", disable=not progress or len(cells) < 2):
        r = fn(model, *args, c.prompt, progress=False, **c.kwargs)
        if on_cell is not None:
            on_cell(c, r)
        else:
            out[c.index] = r
    return out


def run(model, plan: Plan, image=None, mask=None, scale: int = 0, cell_labels: str = "none", on_cell=None,
        on_sheet=None, progress=True) -> list[tuple[Image.Image, str]]:
    """The whole grid: checks (`Plan.check_model`), every cell, then one (sheet, parameters) per Z value, passed
    to `on_sheet(iz, sheet, parameters)` as soon as its last cell is done (and then not kept: the list is empty)."""
    from sdknobs.pipelines import _prepare_image

    if image is not None:
        image, width, height = _prepare_image(model, image, plan.base.get("width"), plan.base.get("height"))
        if mask is not None:
            mask = mask.convert("L")
            if mask.size != image.size and not plan.base.get("resize_mask"):
                raise SdknobsError(f"--mask is {mask.width}x{mask.height} but the image is {image.width}x{image.height}; "
                                   f"pass --resize-mask to resize it")
    else:
        width, height = plan.base.get("width") or model.default_size, plan.base.get("height") or model.default_size
    scale = scale or max(1, 128 // min(width, height))
    plan.check_model(model, width, height, scale, cell_labels)
    steps_default = model.sampling(steps=plan.base.get("steps"))["steps"]
    nx, ny, nz = plan.shape
    sheets, done = [], {}

    def label(c: Cell, r) -> str:
        if cell_labels == "values":
            return "\n".join(_fit(a.title(v), width * scale + 4) for a, v in zip(plan.axes, c.values))
        return start_label(c.kwargs.get("strength", 0.75 if plan.mode == "img2img" else 1.0), r,
                           c.kwargs.get("steps") or steps_default)

    def cell_done(c: Cell, r):
        done[c.index] = (r, label(c, r) if cell_labels != "none" else None)
        if on_cell is not None:
            on_cell(c, r)
        ix, iy, iz = c.index
        if ix == nx - 1 and iy == ny - 1:  # the sheet's last cell
            pics = [[done[(i, j, iz)][0].images[0] for i in range(nx)] for j in range(ny)]
            labs = [[done[(i, j, iz)][1] for i in range(nx)] for j in range(ny)] if cell_labels != "none" else None
            g = draw_sheet(plan, pics, labs, scale, iz)
            params = plan.parameters(done[(0, 0, iz)][0].parameters[0], iz)
            for key in [k for k in done if k[2] == iz]:
                del done[key]  # one sheet's pictures in memory at a time
            if on_sheet is not None:
                on_sheet(iz, g, params)
            else:
                sheets.append((g, params))

    sample_cells(model, plan, image, mask, cell_done, progress)
    return sheets


def sheet_paths(out: str, nz: int) -> list[Path]:
    p = Path(out)
    return [p] if nz == 1 else [p.with_name(f"{p.stem}-z{k}{p.suffix}") for k in range(nz)]


def cell_path(out: str, plan: Plan, index: tuple) -> Path:
    """NAME-x<i>[-y<j>][-z<k>].png: the cell's index on each axis given."""
    p = Path(out)
    return p.with_name(p.stem + "".join(f"-{'xyz'[a.pos]}{index[a.pos]}" for a in sorted(plan.axes, key=lambda a: a.pos))
                       + p.suffix)


def run_command(cfg: GridConfig) -> None:
    """`sdknobs grid`: check everything, then sample, writing each cell (--save-cells) and each sheet when done."""
    from sdknobs.atomic import check_out_path
    from sdknobs.cli import _model
    from sdknobs.images import load_image, save_png

    plan = cfg.plan()
    if Path(cfg.out).suffix.lower() != ".png":
        raise SdknobsError(f"--out {cfg.out!r} must end in .png")
    nx, ny, nz = plan.shape
    sheets = sheet_paths(cfg.out, nz)
    cells = [cell_path(cfg.out, plan, c.index) for c in plan.cells()] if cfg.save_cells else []
    for p in sheets + cells:
        check_out_path(p, "--out", cfg.overwrite)
    image = load_image(cfg.image, "--image") if cfg.image else None
    mask = load_image(cfg.mask, "--mask", mode="L") if cfg.mask else None
    if plan.varies_flag_lora:  # the --lora files are applied per cell, with the axis's weight (`Plan.cell`)
        cfg = copy.copy(cfg)
        cfg.lora = []
    model = _model(cfg)

    def on_cell(c: Cell, r):
        if cfg.save_cells:
            save_png(r.images[0], cell_path(cfg.out, plan, c.index), r.parameters[0])

    def on_sheet(iz: int, g: Image.Image, params: str):
        print(save_png(g, sheets[iz], params))

    run(model, plan, image, mask, scale=cfg.scale, cell_labels=cfg.cell_labels, on_cell=on_cell, on_sheet=on_sheet)
    if cfg.save_cells:
        print(f"{len(cells)} cells: {cells[0]} ... {cells[-1]}" if len(cells) > 1 else cells[0])


def sweep_strength(model, image, prompt, *, strengths=(0.0, 0.25, 0.5, 0.75, 1.0), seeds=(0, 1), steps=None, scale=4,
                   progress=True, **kwargs):
    """`sdknobs sweep-strength`: the grid of img2img strengths (X) and seeds (Y), each cell labelled with its strength,
    start step and alpha_bar (`start_label`), seed titles down the side. Returns (sheet, StartInfo per row and column)."""
    from sdknobs import images as im

    steps = model.sampling(steps=steps)["steps"]
    neg = kwargs.pop("negative_prompt", "") or ""
    plan = Plan([Axis("strength", list(strengths), flag="--strengths", pos=0),
                 Axis("seed", list(seeds), flag="--seeds", pos=1)],
                prompt, neg, {**kwargs, "steps": steps}, mode="img2img")
    res = sample_cells(model, plan, image, progress=progress)
    rows = [[res[(i, j, 0)] for i in range(len(strengths))] for j in range(len(seeds))]
    labels = [[start_label(s, r, steps) for s, r in zip(strengths, row)] for row in rows]
    g = im.grid([[r.images[0] for r in row] for row in rows], labels, scale=scale,
                row_titles=[f"seed {s}" for s in seeds])
    return g, [[r.start for r in row] for row in rows]
