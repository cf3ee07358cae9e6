"""LoRA bypasses inside the model's layers (peft), several at once, each with a weight and a window.

peft replaces a target layer y = W x by a wrapper computing, for every active adapter i,
    y = W x + sum_i s_i * B_i (A_i x),      s_i = w_i * alpha_i / r_i      (peft's `scaling`)
where w_i is the user's weight (`set_scale`). Windows switch adapters on and off per sampler step
(`LoraSet.before_step`); only the U-Net's layers switch, since the prompt is encoded once per run.
"""
from __future__ import annotations

import re
import warnings
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from sdknobs.errors import SdknobsError
from sdknobs.lora.files import COMPONENTS, TE_PREFIX, LoraFactors, LoraWeights, read_lora
from sdknobs.lora.spec import LoraSpec, parse_spec
from sdknobs.lora.targets import Target, target_of


def component(model, name: str) -> torch.nn.Module:
    """The model's 'unet', 'text_encoder' or (SDXL) 'text_encoder_2'; an error for one the model lacks."""
    mod = getattr(model, name, None) if name in COMPONENTS else None
    if mod is None:
        raise SdknobsError(f"the model {getattr(model, 'source', '') or ''!r} (family {getattr(model, 'family', '?')}) "
                           f"has no {name}" + ("; only SDXL models have a second text encoder" if name ==
                                                "text_encoder_2" else ""))
    return mod


def model_components(model) -> tuple[str, ...]:
    """The LoRA-able components this model has: unet, text_encoder (and text_encoder_2 on SDXL)."""
    return tuple(c for c in COMPONENTS if getattr(model, c, None) is not None)


def resolve_module(model, layer: str) -> tuple[torch.nn.Module, str]:
    """'unet.<path>' / 'text_encoder.<path>' -> (component module, path inside it). CLIP's text_model.
    prefix is added or removed to fit the loaded transformers version (as diffusers does)."""
    comp, path = layer.split(".", 1)
    root = component(model, comp)
    if comp != "unet" and not hasattr(root, "text_model"):
        path = path.removeprefix(TE_PREFIX)
    elif comp != "unet" and not path.startswith(TE_PREFIX):
        path = TE_PREFIX + path
    return root, path


def layer_key(model, comp: str, path: str) -> str:
    """The in-memory key of a model layer (text-encoder paths always with text_model.)."""
    if comp != "unet" and not path.startswith(TE_PREFIX):
        path = TE_PREFIX + path
    return f"{comp}.{path}"


def lora_layers(module: torch.nn.Module):
    """(path, peft LoRA layer) pairs inside a module."""
    from peft.tuners.lora import LoraLayer

    return [(n, m) for n, m in module.named_modules() if isinstance(m, LoraLayer)]


def inject(model, targets: list[Target], rank: int, alpha: float, name: str, *, ranks: dict | None = None,
           alphas: dict | None = None, init: bool | str = True) -> None:
    """Add an adapter `name` on `targets` (peft's LoraConfig + inject_adapter_in_model, per component).

    ranks / alphas: per-layer exceptions keyed by Target.key. init=True: A Kaiming-uniform, B = 0, so the
    model's output is unchanged until training moves B (peft's default, as in the LoRA paper)."""
    from peft import LoraConfig, inject_adapter_in_model

    ranks, alphas = ranks or {}, alphas or {}
    for comp in COMPONENTS:
        mine = [t for t in targets if t.component == comp]
        if not mine:
            continue
        root = component(model, comp)
        paths = {t.key: resolve_module(model, t.key)[1] for t in mine}
        cfg = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=init, lora_dropout=0.0,
                         target_modules=[paths[t.key] for t in mine],
                         rank_pattern={re.escape(paths[k]): r for k, r in ranks.items() if k in paths},
                         alpha_pattern={re.escape(paths[k]): a for k, a in alphas.items() if k in paths})
        with warnings.catch_warnings():  # peft warns that a second adapter makes several adapters: intended
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            inject_adapter_in_model(cfg, root, adapter_name=name)


def check_fits(model, w: LoraWeights) -> list[Target]:
    """Check every layer of `w` exists in the model with matching shapes; return the targets.
    Raises SdknobsError naming the first key that does not fit, with both shapes."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    targets = []
    for layer, f in w.layers.items():
        comp = layer.split(".", 1)[0]
        root, path = resolve_module(model, layer)
        try:
            mod = root.get_submodule(path)
        except AttributeError:
            mod = None
        if isinstance(mod, BaseTunerLayer):
            mod = mod.get_base_layer()
        key = w.key_in_file(layer)
        if not isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)):
            what = "has no such layer" if mod is None else f"has a {type(mod).__name__} there, not Linear/Conv2d"
            raise SdknobsError(f"LoRA file {w.path}: key {key!r} targets {comp} layer {path!r}, but the loaded "
                               f"model {what}")
        t = target_of(comp, path, mod)
        f.down, f.up = _fit_rank1x1(t, f)
        for part, got, want in (("lora_down", f.down.shape, t.down_shape(f.rank)),
                                ("lora_up", f.up.shape, t.up_shape(f.rank))):
            if tuple(got) != tuple(want):
                raise SdknobsError(f"LoRA file {w.path}: key {key!r} ({part}) has shape {tuple(got)}, but the "
                                   f"model's {comp} layer {path} ({t.kind} {t.in_features}->{t.out_features}) "
                                   f"needs {tuple(want)} at rank {f.rank}")
        targets.append(Target(comp, path, t.kind, t.in_features, t.out_features, t.kernel))
    return targets


def _fit_rank1x1(t: Target, f: LoraFactors):
    """A 1x1 convolution and a Linear are the same map: accept [r, in, 1, 1] for Linear layers and
    [r, in] for 1x1 convolutions (SD1's conv proj_in vs SD2's linear one)."""
    down, up = f.down, f.up
    if t.kind == "linear" and down.ndim == 4 and down.shape[2:] == (1, 1) and up.ndim == 4:
        return down.flatten(1), up.flatten(1)
    if t.kind == "conv" and t.kernel == (1, 1) and down.ndim == 2 and up.ndim == 2:
        return down[:, :, None, None], up[:, :, None, None]
    return down, up


@torch.no_grad()
def load_into(model, w: LoraWeights, name: str) -> None:
    """Inject adapter `name` with the factors of `w` (shapes checked first)."""
    targets = check_fits(model, w)
    keys = {t.key: layer for t, layer in zip(targets, w.layers)}
    r = Counter(f.rank for f in w.layers.values()).most_common(1)[0][0]
    a = Counter(f.alpha for f in w.layers.values()).most_common(1)[0][0]
    ranks = {t.key: w.layers[keys[t.key]].rank for t in targets if w.layers[keys[t.key]].rank != r}
    alphas = {t.key: w.layers[keys[t.key]].alpha for t in targets if w.layers[keys[t.key]].alpha != a}
    inject(model, targets, r, a, name, ranks=ranks, alphas=alphas, init=False)
    for t in targets:
        f = w.layers[keys[t.key]]
        mod = component(model, t.component).get_submodule(t.name)
        mod.lora_A[name].weight.copy_(f.down)
        mod.lora_B[name].weight.copy_(f.up)


def extract(model, name: str) -> LoraWeights:
    """The factors of adapter `name` as LoraWeights (detached copies on the CPU, float32)."""
    from sdknobs.lora.keys import UnetLayout, model_architecture

    out = LoraWeights({}, architecture=model_architecture(model).name, unet_layout=UnetLayout.of(model.unet.config))
    for comp in model_components(model):
        for path, mod in lora_layers(component(model, comp)):
            if name in mod.lora_A:
                out.layers[layer_key(model, comp, path)] = LoraFactors(
                    mod.lora_A[name].weight.detach().float().cpu().clone(),
                    mod.lora_B[name].weight.detach().float().cpu().clone(), float(mod.lora_alpha[name]))
    if not out.layers:
        raise SdknobsError(f"the model has no LoRA adapter named {name!r}")
    return out


def set_active(model, names: list[str], *, components=COMPONENTS, trainable: bool = False) -> None:
    for comp in (c for c in components if getattr(model, c, None) is not None):
        for _, mod in lora_layers(component(model, comp)):
            mod.set_adapter(list(names), inference_mode=not trainable)


def remove(model, name: str) -> None:
    """Delete adapter `name`; once no adapter is left, put the plain layers back."""
    from diffusers.utils.peft_utils import recurse_remove_peft_layers

    for comp in model_components(model):
        root = component(model, comp)
        for _, mod in lora_layers(root):
            if name in mod.lora_A:
                mod.delete_adapter(name)
        if not any(mod.lora_A for _, mod in lora_layers(root)):
            recurse_remove_peft_layers(root)


@dataclass
class Applied:
    name: str
    spec: LoraSpec
    sha256: str = ""  # of the file, filled in when a picture's parameters ask for it


class LoraSet:
    """The LoRAs applied to one model, kept in `model.extra["lora"]`; the pipelines ask it which
    adapters are on at each step (`before_step`) and switch everything back on afterwards (`reset`)."""

    def __init__(self, model):
        self.model = model
        self.entries: dict[str, Applied] = {}
        self._on: tuple | None = None

    def add(self, spec: LoraSpec | str, weights: LoraWeights | None = None) -> str:
        spec = parse_spec(spec)
        w = weights if weights is not None else read_lora(spec.path, model=self.model)
        if spec.window is not None and any(k.startswith("text_encoder") for k in w.layers):
            raise SdknobsError(f"--lora {spec}: the file has text-encoder layers, and a window can only switch "
                               f"U-Net layers (the prompt is encoded once per run); drop the window")
        name = _adapter_name(spec.path, self.entries)
        load_into(self.model, w, name)
        for comp in model_components(self.model):
            for _, mod in lora_layers(component(self.model, comp)):
                mod.set_scale(name, spec.weight)  # s = w * alpha / r
        self.entries[name] = Applied(name, spec)
        self.reset()
        return name

    def remove(self, name: str) -> None:
        remove(self.model, name)
        del self.entries[name]
        self.reset()

    @property
    def has_windows(self) -> bool:
        return any(e.spec.window is not None for e in self.entries.values())

    def active_at(self, i: int, steps: int, t) -> tuple[str, ...]:
        return tuple(n for n, e in self.entries.items() if e.spec.window is None or e.spec.window.active(i, steps, t))

    def before_step(self, i: int, t, steps: int) -> None:
        on = self.active_at(i, steps, t)
        if on != self._on:  # switch only when the set changes
            set_active(self.model, on, components=("unet",))
            self._on = on

    def reset(self) -> None:
        set_active(self.model, list(self.entries))
        self._on = None

    def a1111_hashes(self) -> str:
        """'name: <first 12 hex digits of the file's sha256>' per LoRA, as A1111 writes 'Lora hashes'."""
        from sdknobs.lora.files import file_sha256

        for e in self.entries.values():
            if not e.sha256 and e.spec.path and Path(e.spec.path).is_file():
                e.sha256 = file_sha256(e.spec.path)
        return ", ".join(f"{n}: {e.sha256[:12]}" for n, e in self.entries.items() if e.sha256)

    def describe(self) -> str:
        return ", ".join(str(e.spec) for e in self.entries.values())


def _adapter_name(path: str, taken) -> str:
    base = re.sub(r"\W", "_", Path(path).stem) or "lora"
    if hasattr(torch.nn.ModuleDict(), base):  # peft keeps adapters in ModuleDicts: 'train', 'eval' ... are taken
        base += "_lora"
    name, i = base, 1
    while name in taken:
        i += 1
        name = f"{base}_{i}"
    return name


def apply_loras(model, specs) -> LoraSet:
    """Apply LoRAs (specs: 'FILE[:WEIGHT][@WINDOW]' strings or LoraSpec) to the model, on top of any
    already applied; they stay until `remove_loras`."""
    s = model.extra.get("lora")
    if s is None:
        s = model.extra["lora"] = LoraSet(model)
    try:
        for spec in specs:
            s.add(spec)
    finally:
        if not s.entries:
            model.extra.pop("lora", None)
    return s


def remove_loras(model, names: list[str] | None = None) -> None:
    s = model.extra.get("lora")
    if s is None:
        return
    for n in list(s.entries) if names is None else names:
        s.remove(n)
    if not s.entries:
        del model.extra["lora"]


@contextmanager
def applied(model, specs):
    """Apply LoRAs for the duration of a `with` block (the pipelines' `lora=` argument)."""
    specs = [parse_spec(s) for s in (specs or [])]
    s = model.extra.get("lora")
    before = set(s.entries) if s is not None else set()
    try:
        apply_loras(model, specs)
        yield model.extra.get("lora")
    finally:
        s = model.extra.get("lora")
        if s is not None:
            remove_loras(model, [n for n in s.entries if n not in before])
