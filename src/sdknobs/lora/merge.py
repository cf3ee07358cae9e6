"""Folding LoRAs into weights, and several LoRAs into one.

Into the base model:   W' = W + sum_i w_i * (alpha_i / r_i) * B_i A_i        (then the bypass is gone)
Several into one file:
- concatenation (exact): stack the factors,  A = [A_1; A_2; ...],  B = [w_1 s_1 B_1, w_2 s_2 B_2, ...],
  alpha = r = sum r_i (scale 1), so B A = sum_i w_i s_i B_i A_i;
- SVD to rank k (approximate, smaller): delta W = sum_i w_i s_i B_i A_i = U S V^T (per layer, conv kernels
  flattened), keep the top k singular values:  B = U_k sqrt(S_k),  A = sqrt(S_k) V_k^T,  alpha = k.
  The relative error ||delta W - B A||_F / ||delta W||_F per layer is reported.
"""
from __future__ import annotations

from pathlib import Path

import torch

from sdknobs.errors import SdknobsError
from sdknobs.lora.files import LoraFactors, LoraWeights
from sdknobs.lora.layers import check_fits, resolve_module

METHODS = ("concat", "svd")


@torch.no_grad()
def merge_into(model, w: LoraWeights, weight: float = 1.0) -> int:
    """W <- W + weight * delta W for every layer of `w` (shapes checked first); returns layers changed.
    The model must not carry peft wrappers for these layers (merge into a plain loaded model)."""
    check_fits(model, w)
    for layer, f in w.layers.items():
        root, path = resolve_module(model, layer)
        mod = root.get_submodule(path)
        if not isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)):
            raise SdknobsError(f"merge: {layer} is wrapped by a LoRA adapter; merge into a model without "
                               f"applied LoRAs")
        mod.weight += (weight * f.delta()).to(mod.weight.dtype).reshape(mod.weight.shape)
    return len(w.layers)


def combine(loras: list[tuple[LoraWeights, float]], method: str = "concat", rank: int | None = None
            ) -> tuple[LoraWeights, dict[str, float]]:
    """One LoRA equal (concat) or close (svd, to `rank`) to sum_i w_i * LoRA_i; returns it and the
    per-layer relative error (zeros for concat)."""
    if method not in METHODS:
        raise SdknobsError(f"--method {method!r} is not known; choose one of {', '.join(METHODS)}")
    if method == "svd" and (rank is None or rank < 1):
        raise SdknobsError(f"--rank must be >= 1 for --method svd, got {rank}")
    if not loras:
        raise SdknobsError("merge: no LoRA files given")
    from sdknobs.lora.files import architecture_of

    archs = {architecture_of(w): w for w, _ in loras}
    if len(archs) > 1:
        (a1, w1), (a2, w2) = list(archs.items())[:2]
        raise SdknobsError(f"merge: {w1.path or 'a LoRA'} is for {a1} but {w2.path or 'another'} for {a2}; LoRAs of "
                           f"different architectures cannot be combined")
    layers = list(dict.fromkeys(k for w, _ in loras for k in w.layers))
    out, errors = LoraWeights({}, architecture=next(iter(archs)), unet_layout=loras[0][0].unet_layout), {}
    for layer in layers:
        parts = [(w.layers[layer], wt) for w, wt in loras if layer in w.layers]
        shapes = {tuple(f.down.shape[1:]) for f, _ in parts} | {(f.up.shape[0], *f.up.shape[2:]) for f, _ in parts}
        if len({tuple(f.down.shape[1:]) for f, _ in parts}) > 1 or len({f.up.shape[0] for f, _ in parts}) > 1:
            raise SdknobsError(f"merge: the LoRAs disagree on the shape of layer {layer}: {sorted(shapes)}")
        if method == "concat":
            down = torch.cat([f.down.float() for f, _ in parts], 0)
            up = torch.cat([wt * f.scale * f.up.float() for f, wt in parts], 1)
            out.layers[layer] = LoraFactors(down, up, float(down.shape[0]))
            errors[layer] = 0.0
        else:
            out.layers[layer], errors[layer] = _svd(parts, rank)
    names = [Path(w.path).name if w.path else "?" for w, _ in loras]  # file names: a shared file names no home folder
    out.metadata = {"sdknobs.merged_from": ", ".join(f"{n}:{wt:g}" for n, (_, wt) in zip(names, loras)),
                    "sdknobs.merge_method": method if method == "concat" else f"svd rank {rank}"}
    return out, errors


def _svd(parts, rank: int) -> tuple[LoraFactors, float]:
    f0 = parts[0][0]
    delta = sum(wt * f.delta() for f, wt in parts)  # [out, in(, kh, kw)]
    mat = delta.flatten(1)
    u, s, vh = torch.linalg.svd(mat, full_matrices=False)
    k = min(rank, s.numel())
    root = s[:k].sqrt()
    up = u[:, :k] * root  # B = U_k sqrt(S_k)
    down = root[:, None] * vh[:k]  # A = sqrt(S_k) V_k^T
    err = float((mat - up @ down).norm() / mat.norm().clamp_min(1e-12))
    down = down.reshape(k, *f0.down.shape[1:])
    up = up.reshape(up.shape[0], k, *([1] * (f0.up.ndim - 2)))
    return LoraFactors(down.contiguous(), up.contiguous(), float(k)), err


@torch.no_grad()
def merge_check(model, specs, out) -> str:
    """Fold the LoRAs (specs with weights) into `model`, write it as a diffusers folder at `out`, and report
    how far the merged model's text encoding and U-Net output are from the unmerged (peft bypass) ones on
    a fixed probe (prompt, seeded latent, t = T/2)."""
    from sdknobs.lora.files import read_lora
    from sdknobs.lora.layers import applied
    from sdknobs.model import save_model
    from sdknobs.text import embed_text_pooled

    g = torch.Generator("cpu").manual_seed(0)
    side = model.unet.config.sample_size
    x = torch.randn((1, model.unet.config.in_channels, side, side), generator=g).to(model.device, model.dtype)
    t = torch.tensor([model.scheduler_config.get("num_train_timesteps", 1000) // 2], device=model.device)

    def probe():  # (SDXL: both encoders' hidden states, and the pooled output with the size ids for the U-Net)
        c, pooled, _ = embed_text_pooled(model, ["a large red circle in the centre, white background"], warn=False)
        added = model.spec.added_cond(pooled, model.default_size, model.default_size)
        return c, model.unet(x, t, c, added_cond_kwargs=added).sample

    with applied(model, specs):
        c0, y0 = probe()
    n = sum(merge_into(model, read_lora(s.path), s.weight) for s in specs)
    c1, y1 = probe()
    save_model(model, out)
    dc, dy = float((c1 - c0).abs().max()), float((y1 - y0).abs().max())
    return (f"folded {n} LoRA layers into the weights; merged vs unmerged on a probe: text encoding max |diff| "
            f"{dc:.2e}, U-Net output max |diff| {dy:.2e} (of max |y| {float(y0.abs().max()):.2f})")
