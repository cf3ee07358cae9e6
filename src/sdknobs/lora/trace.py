"""`sdknobs lora trace-step`: one LoRA training step, printed with the tensor shapes at every stage.

It runs the trainer's own step (`trainer.trace_step`, nothing written) with a LoraMethod whose first
target layer records the shapes flowing through its bypass, then checks that no base weight got a gradient.
"""
from __future__ import annotations

import torch

from sdknobs.lora.train import LoraMethod, LoraTrainConfig


def trace(model, cfg: LoraTrainConfig) -> list[str]:
    from sdknobs.training.trainer import trace_step

    method = LoraMethod(cfg)
    method.trace_shapes = []
    tr, extra = trace_step(model, method, cfg)
    base_grads = [n for c in (model.unet, model.text_encoder) for n, p in c.named_parameters()
                  if ".lora_" not in n and p.grad is not None]
    return format_trace(model, cfg, method, tr, extra, base_grads)


def _s(t) -> str:
    return str(list(t.shape) if isinstance(t, torch.Tensor) else list(t))


def format_trace(model, cfg, method, tr, extra, base_grads) -> list[str]:
    t0 = method.trace_target
    r, a = cfg.rank, cfg.effective_alpha
    abar = model_abar(model, tr.timesteps)
    rows = [
        f"one LoRA training step on {cfg.model} ({model.family}): rank {r}, alpha {a:g} (scale alpha/r = {a / r:g}), "
        f"targets {' '.join(cfg.targets)}{' + text-encoder' if cfg.text_encoder else ''}: {len(method.targets)} layers, "
        f"{extra['trainable_params']:,} trainable parameters",
        f"images       {len(extra['paths'])} x {list(extra['image_shape'])} in [-1, 1]  ({', '.join(extra['paths'][:2])}"
        f"{' ...' if len(extra['paths']) > 2 else ''})",
        "captions     " + " | ".join(repr(c) for c in extra["captions"]),
        ("VAE encode (frozen): x0 = scaling_factor * z, z ~ q(z|image)", tr.latents),
        ("eps ~ N(0, I)", tr.noise),
        (f"t ~ U{{0..T-1}}: {tr.timesteps.tolist()}", tr.timesteps),
        (f"x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps  (abar_t = {', '.join(f'{v:.3f}' for v in abar)})",
         tr.noisy_latents),
        ("c = text encoder(tokens of the caption)", tr.encoder_hidden_states),
        f"inside {t0.component} layer {t0.name} ({t0.kind} {t0.in_features}->{t0.out_features}):",
    ]
    seen = set()
    for label, shp_in, shp_out in method.trace_shapes or []:
        part = label.split(": ", 1)[1]
        if part in seen:
            continue
        seen.add(part)
        note = {"W x": "frozen W", "A x": f"A: {list(t0.down_shape(r))}", "B (A x)": f"B: {list(t0.up_shape(r))}, "
                f"then * alpha/r = {a / r:g} and added to W x"}[part]
        rows.append(f"    {part:<10} {_s(shp_in)} -> {_s(shp_out)}   ({note})")
    rows += [
        ("U-Net(x_t, t, c): predicted " + ("v" if model.prediction_type == "v_prediction" else "noise"), tr.model_pred),
        ("target = " + ("v = sqrt(abar) eps - sqrt(1-abar) x0" if model.prediction_type == "v_prediction" else "eps"),
         tr.target),
        (f"per-sample MSE x weights {[round(float(w), 3) for w in tr.weights]}", tr.per_sample_loss),
        f"loss         {extra['loss']:.6f}",
    ]
    norms = extra["grad_norms"]
    a_norm = sum(v for k, v in norms.items() if ".lora_A." in k)
    b_norm = sum(v for k, v in norms.items() if ".lora_B." in k)
    rows += [
        f"backward     {sum(1 for v in norms.values() if v > 0)} of {len(norms)} LoRA tensors got a gradient "
        f"(sum of norms: A {a_norm:.3g}, B {b_norm:.3g}; A's is 0 at step 1 because B starts at 0: "
        f"dL/dA = (alpha/r) B^T dL/dy x^T)",
        f"             base weights with a gradient: {len(base_grads)}" + (f" (e.g. {base_grads[0]})" if base_grads else ""),
        f"AdamW step   lr {extra['lr']:.3g}; {sum(1 for v in extra['changed_rows'].values() if v)} LoRA tensors changed",
    ]
    out = []
    for row in rows:
        if isinstance(row, tuple):
            label, t = row
            out.append(f"{label:<78} {_s(t)}")
        else:
            out.append(row)
    return out


def model_abar(model, timesteps) -> list[float]:
    from sdknobs.training.step import make_noise_scheduler

    s = make_noise_scheduler(model.scheduler_config)
    return [float(s.alphas_cumprod[int(t)]) for t in timesteps.cpu()]
