"""What is in a LoRA file, and whether two LoRAs pull the same layers in opposite directions.

- inspect: format, targets (by preset), ranks, alphas, parameters, file size, metadata, and the size
  of the update per block, ||delta W||_F with delta W = (alpha/r) B A (relative to ||W||_F with a model);
- conflict: for every layer both LoRAs touch, cos(delta W_a, delta W_b) = <a, b> / (|a| |b|), and a
  conflict score = sum_l <a_l, b_l> / sum_l |a_l| |b_l|  (the norm-weighted mean cosine, in [-1, 1]):
  about 0 = independent directions (they compose), negative = they pull against each other.
"""
from __future__ import annotations

import math
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from sdknobs.lora.files import LoraWeights
from sdknobs.lora.targets import PRESETS

CONFLICT_COS = -0.2  # a layer whose cosine is below this is reported as pulling against the other LoRA


def block_of(layer: str) -> str:
    """'unet.down_blocks.0.attentions.1...' -> 'unet.down_blocks.0'; text encoders -> 'text_encoder.layers.N'
    ('text_encoder_2.layers.N' for SDXL's second)."""
    comp, path = layer.split(".", 1)
    m = re.match(r"(down_blocks\.\d+|up_blocks\.\d+|mid_block|conv_in|conv_out|time_embedding)", path)
    if comp == "unet":
        return f"unet.{m[1]}" if m else "unet.other"
    m = re.search(r"layers\.(\d+)", path)
    return f"{comp}.layers.{m[1]}" if m else f"{comp}.other"


def presets_of(w: LoraWeights) -> dict[str, int]:
    """How many of the file's layers each preset covers (a layer may fit several)."""
    out = {}
    for name, (comp, regex) in PRESETS.items():
        n = sum(1 for k in w.layers if k.startswith(comp + ".") and re.search(regex, k.split(".", 1)[1]))
        if n:
            out[name] = n
    return out


def inspect_lines(w: LoraWeights, model=None) -> list[str]:
    from sdknobs.lora.layers import check_fits, resolve_module

    if model is not None:
        check_fits(model, w)  # every layer exists in the model with fitting shapes, or an error naming the key
    size = Path(w.path).stat().st_size if w.path and Path(w.path).is_file() else 0
    comps = defaultdict(int)
    for k in w.layers:
        comps[k.split(".", 1)[0]] += 1
    from sdknobs.lora.files import architecture_of

    out = [f"file:        {w.path} ({size / 1024:.1f} KiB, {w.format} layout, {architecture_of(w)})",
           f"layers:      {len(w.layers)} (" + ", ".join(f"{c} {n}" for c, n in comps.items()) + ")",
           "targets:     " + (", ".join(f"{p} ({n} layers)" for p, n in presets_of(w).items()) or "custom"),
           "rank:        " + ", ".join(f"{r} ({n} layers)" for r, n in sorted(w.ranks().items())),
           "alpha:       " + ", ".join(f"{a:g} ({n} layers)" for a, n in sorted(w.alphas().items())),
           f"parameters:  {w.num_params():,}"]
    keep = ("ss_sd_model_name", "ss_new_sd_model_hash", "ss_network_dim", "ss_network_alpha", "ss_resolution",
            "ss_max_train_steps", "modelspec.trigger_phrase", "sdknobs.targets", "sdknobs.merged_from")
    out += [f"  {k}: {w.metadata[k]}" for k in keep if k in w.metadata]
    sq, base_sq = defaultdict(float), defaultdict(float)
    for layer, f in w.layers.items():
        sq[block_of(layer)] += float(f.delta().pow(2).sum())
        if model is not None:
            root, path = resolve_module(model, layer)
            base_sq[block_of(layer)] += float(root.get_submodule(path).weight.float().pow(2).sum())
    out.append("||delta W||_F per block" + (" (and relative to ||W||_F)" if model is not None else "") + ":")
    for b in sorted(sq):
        rel = f"  {math.sqrt(sq[b] / base_sq[b]):.4f}" if model is not None and base_sq[b] else ""
        out.append(f"  {b:<26} {math.sqrt(sq[b]):10.4f}{rel}")
    return out


@dataclass
class Conflict:
    cosines: dict[str, float]  # per shared layer
    score: float  # norm-weighted mean cosine over shared layers
    only_a: int
    only_b: int

    def against(self) -> list[str]:
        return [k for k, c in self.cosines.items() if c < CONFLICT_COS]

    def lines(self) -> list[str]:
        out = [f"{c:+.3f}  {k}" for k, c in sorted(self.cosines.items(), key=lambda kv: kv[1])]
        out.append(f"shared layers {len(self.cosines)}, only in A {self.only_a}, only in B {self.only_b}")
        out.append(f"conflict score (norm-weighted mean cosine): {self.score:+.3f}")
        bad = self.against()
        if bad:
            out.append(f"warning: {len(bad)} of {len(self.cosines)} shared layers pull against each other "
                       f"(cosine < {CONFLICT_COS}); stacking these LoRAs may cancel part of both")
        elif self.cosines:
            out.append(f"no layer pulls against the other (every cosine >= {CONFLICT_COS})")
        else:
            out.append("the two LoRAs share no layer, so they cannot pull against each other")
        return out  # the last 3 lines are the summary


def conflict(a: LoraWeights, b: LoraWeights) -> Conflict:
    from sdknobs.errors import SdknobsError
    from sdknobs.lora.files import architecture_of

    if architecture_of(a) != architecture_of(b):
        raise SdknobsError(f"lora conflict: {a.path} is for {architecture_of(a)} but {b.path} for {architecture_of(b)}; "
                           f"LoRAs of different architectures share no layer")
    cos, dot_sum, norm_sum = {}, 0.0, 0.0
    shared = [k for k in a.layers if k in b.layers]
    for k in shared:
        da, db = a.layers[k].delta().flatten(), b.layers[k].delta().flatten()
        if da.shape != db.shape:
            from sdknobs.errors import SdknobsError

            raise SdknobsError(f"lora conflict: layer {k} has delta W of {tuple(a.layers[k].delta().shape)} in "
                               f"{a.path} but {tuple(b.layers[k].delta().shape)} in {b.path}")
        dot, na, nb = float(da @ db), float(da.norm()), float(db.norm())
        cos[k] = dot / max(na * nb, 1e-30)
        dot_sum, norm_sum = dot_sum + dot, norm_sum + na * nb
    score = dot_sum / norm_sum if norm_sum else 0.0
    return Conflict(cos, score, len(set(a.layers) - set(b.layers)), len(set(b.layers) - set(a.layers)))

