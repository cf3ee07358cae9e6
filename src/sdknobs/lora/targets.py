"""Which layers get a LoRA bypass: named presets and custom regexes over module names.

A LoRA on a layer y = W x (Linear, or Conv2d with kernel k x k) adds a rank-r bypass
    y = W x + (alpha / r) * B (A x),   A: [r, in(, k, k)], B: [out, r(, 1, 1)]
with r * (in * k * k + out) trainable numbers; W stays frozen.

Presets (regexes searched in module names of the U-Net, or of the text encoder for `text-encoder`):
    cross-attn    attn2 to_q/to_k/to_v/to_out.0 (where the text meets the picture; the default)
    attn          self- (attn1) and cross-attention (attn2) projections
    attn-ff       attn + feed-forward (ff.net.0.proj, ff.net.2) + proj_in/proj_out
    conv          ResNet convolutions only (conv1, conv2, conv_shortcut)
    text-encoder  CLIP self-attention q/k/v/out projections (combine with a U-Net preset)
    text-encoder-2  the same on SDXL's second text encoder (OpenCLIP bigG)
Anything else is a regex: `REGEX` or `unet:REGEX` for the U-Net, `te:REGEX` for the text encoder, `te2:REGEX` for
SDXL's second one. On SDXL the U-Net presets resolve on its own layers (attentions with several transformer
blocks, none in the first down block).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from sdknobs.errors import SdknobsError

_QKVO = r"attn{}\.(to_q|to_k|to_v|to_out\.0)$"
PRESETS: dict[str, tuple[str, str]] = {
    "cross-attn": ("unet", _QKVO.format("2")),
    "attn": ("unet", _QKVO.format("[12]")),
    "attn-ff": ("unet", rf"({_QKVO.format('[12]')}|\.ff\.net\.(0\.proj|2)$|attentions\.\d+\.(proj_in|proj_out)$)"),
    "conv": ("unet", r"resnets\.\d+\.(conv1|conv2|conv_shortcut)$"),
    "text-encoder": ("text_encoder", r"self_attn\.(q_proj|k_proj|v_proj|out_proj)$"),
    "text-encoder-2": ("text_encoder_2", r"self_attn\.(q_proj|k_proj|v_proj|out_proj)$"),
}
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
TEXT_ENCODER_CHOICES = ("both", "1", "2")  # which encoders --text-encoder adds on a two-encoder model


def presets_for(model) -> list[str]:
    """The presets that apply to `model`: those whose component it has (text-encoder-2 only on SDXL)."""
    return [name for name, (comp, _) in PRESETS.items() if getattr(model, comp, None) is not None]


@dataclass(frozen=True)
class Target:
    component: str  # "unet", "text_encoder" or "text_encoder_2"
    name: str  # module path inside the component, e.g. down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_q
    kind: str  # "linear" or "conv"
    in_features: int
    out_features: int
    kernel: tuple[int, int] = (1, 1)

    @property
    def key(self) -> str:
        return f"{self.component}.{self.name}"

    def params(self, rank: int) -> int:
        """r * (in * kh * kw + out): the numbers in A and B."""
        return rank * (self.in_features * self.kernel[0] * self.kernel[1] + self.out_features)

    def down_shape(self, rank: int) -> tuple[int, ...]:
        return (rank, self.in_features) if self.kind == "linear" else (rank, self.in_features, *self.kernel)

    def up_shape(self, rank: int) -> tuple[int, ...]:
        return (self.out_features, rank) if self.kind == "linear" else (self.out_features, rank, 1, 1)


def base_layers(module: torch.nn.Module):
    """(name, layer) for every Linear / Conv2d a LoRA can wrap; peft wrappers count as their base layer
    and peft's own lora_A/lora_B/base_layer children are skipped."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, mod in module.named_modules():
        if ".lora_" in name or name.endswith(".base_layer") or ".base_layer." in name:
            continue
        if isinstance(mod, BaseTunerLayer):
            mod = mod.get_base_layer()
        if isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)):
            yield name, mod


def target_of(component: str, name: str, layer: torch.nn.Module) -> Target:
    if isinstance(layer, torch.nn.Conv2d):
        return Target(component, name, "conv", layer.in_channels // layer.groups, layer.out_channels,
                      tuple(layer.kernel_size))
    return Target(component, name, "linear", layer.in_features, layer.out_features)


def _component(model, component: str) -> torch.nn.Module:
    from sdknobs.lora.layers import component as get

    return get(model, component)


def parse_target(item: str) -> tuple[str, str, str]:
    """'cross-attn' | 'te:REGEX' | 'unet:REGEX' | 'REGEX' -> (label, component, regex)."""
    if item in PRESETS:
        return (item, *PRESETS[item])
    component, regex = "unet", item
    for prefix, comp in (("te:", "text_encoder"), ("te2:", "text_encoder_2"), ("unet:", "unet")):
        if item.startswith(prefix):
            component, regex = comp, item[len(prefix):]
    try:
        re.compile(regex)
    except re.error as e:
        raise SdknobsError(f"--targets {item!r} is neither a preset ({', '.join(PRESETS)}) nor a valid regex: {e}") from e
    return item, component, regex


def text_encoder_presets(model, which: str = "both") -> list[str]:
    """The text-encoder presets `--text-encoder` adds: the one encoder of SD1.x/SD2.x; on SDXL `which` = both
    (kohya's default), 1 (CLIP-L) or 2 (OpenCLIP bigG)."""
    if which not in TEXT_ENCODER_CHOICES:
        raise SdknobsError(f"--text-encoders {which!r} is not known; choose one of {', '.join(TEXT_ENCODER_CHOICES)}")
    if getattr(model, "text_encoder_2", None) is None:
        if which == "2":
            raise SdknobsError(f"--text-encoders 2: the model (family {model.family}) has one text encoder; "
                               f"only SDXL has a second")
        return ["text-encoder"]
    return {"both": ["text-encoder", "text-encoder-2"], "1": ["text-encoder"], "2": ["text-encoder-2"]}[which]


def resolve_targets(model, targets: list[str] | str = ("cross-attn",), text_encoder: bool | str = False) -> list[Target]:
    """The layers that `targets` (presets / regexes) select, in model order, without duplicates.
    text_encoder: False, True (every encoder) or one of TEXT_ENCODER_CHOICES.

    A preset or regex that matches no layer is an error naming it."""
    items = [targets] if isinstance(targets, str) else list(targets)
    if text_encoder:
        for p in text_encoder_presets(model, "both" if text_encoder is True else text_encoder):
            if p not in items:
                items.append(p)
    if not items:
        raise SdknobsError("--targets is empty; give a preset (" + ", ".join(PRESETS) + ") or a regex")
    found: dict[str, Target] = {}
    for item in items:
        label, component, regex = parse_target(item)
        pat = re.compile(regex)
        hits = [target_of(component, n, m) for n, m in base_layers(_component(model, component)) if pat.search(n)]
        if not hits:
            examples = [n for n, _ in base_layers(_component(model, component))][:3]
            raise SdknobsError(f"--targets {label!r} (regex {regex!r}) matches no Linear or Conv2d layer of the "
                               f"{component}; layer names look like {', '.join(examples)}")
        for t in hits:
            found.setdefault(t.key, t)
    return list(found.values())


def count_params(targets: list[Target], rank: int) -> int:
    return sum(t.params(rank) for t in targets)


def rank_for_budget(targets: list[Target], budget: int) -> int:
    """The rank whose parameter count over `targets` is closest to `budget` (at least 1)."""
    per_rank = count_params(targets, 1)
    return max(1, round(budget / per_rank))


def describe(targets: list[Target], rank: int) -> list[str]:
    """One line per layer (component, name, kind, weight shape, LoRA params) and a total."""
    lines = []
    for t in targets:
        shape = (f"{t.out_features}x{t.in_features}" if t.kind == "linear"
                 else f"{t.out_features}x{t.in_features}x{t.kernel[0]}x{t.kernel[1]}")
        lines.append(f"{t.component:<12} {t.name:<70} {t.kind:<6} {shape:>14} {t.params(rank):>9,}")
    lines.append(f"{len(targets)} layers, rank {rank}: {count_params(targets, rank):,} LoRA parameters")
    return lines
