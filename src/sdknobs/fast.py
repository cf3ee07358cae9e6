"""Faster U-Net calls without changing the model: TorchScript graphs recorded from the diffusers U-Net.

Two uses, two contracts:

- `FrozenUNet` (sampling, opt-in): traced and frozen, weights folded in; ~1e-6 from eager.
- `TracedUNet` (training, on by default): traced, not frozen; bit-identical to eager, gradients too.

Sampling (`FrozenUNet`): `torch.jit.trace` records the U-Net's forward for one input shape as a graph, `torch.jit.freeze`
turns the weights into constants, and `optimize_for_inference` lets oneDNN fuse convolution + bias
+ activation and drop Python's per-module overhead. On the shapes model that makes a U-Net call
~20% faster on a 2-core CPU; outputs differ from the eager U-Net by float rounding (~1e-6).

The price is a one-off trace of a few seconds per input shape, so it pays off for many images in
one process (sweeps, benchmarks, `bench quality`), not for a single 30-step picture. Hence opt-in:
`load_model(..., jit=True)` or `--jit` on the sampling commands.

A frozen graph no longer sees its weights, so the wrapper keeps one graph per (input shapes, dtypes,
weight versions) and falls back to the eager U-Net whenever the U-Net carries adapter layers (peft
LoRA, whose per-step scales a frozen graph would bake in) or hooks.

Training: `TracedUNet` records the same forward once per input shape but keeps the weights as the
module's own tensors (nothing folded, so the optimizer's in-place updates are seen) and runs the graph
with the graph executor's optimizations off: the recorded ATen ops run one after another, each with
its ordinary autograd formula. Outputs and gradients are therefore bit-identical to the eager U-Net
(tests check both); what goes away is diffusers' and peft's Python per module, which on the shapes
model is ~40% of a forward pass and most of what a small-batch CPU step costs. Tracing takes ~1 s.
A trace bakes in Python-level state: LoRA scales, active adapters, train/eval mode. That state is
fixed for a training run, and the graph is keyed by the module's mode and the input shapes and dtypes.
"""
from __future__ import annotations

import warnings

import torch


class _Forward(torch.nn.Module):
    """Positional forward (sample, timestep, context) -> noise prediction, as the loop calls it."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, context):
        return self.unet(sample, timestep, encoder_hidden_states=context, return_dict=False)[0]


def _timestep(timestep, sample) -> torch.Tensor:
    return timestep if torch.is_tensor(timestep) else torch.tensor(timestep, device=sample.device)


def _inputs_key(x, t, c) -> tuple:
    """What a recorded graph is specific to: its inputs' shapes, dtypes and device."""
    return (tuple(x.shape), x.dtype, x.device, tuple(t.shape), t.dtype, tuple(c.shape), c.dtype)


def _record(unet, x, t, c) -> torch.jit.ScriptModule:
    """The U-Net's positional forward traced for these inputs (TorchScript, not frozen)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about Python branches on fixed shapes
        return torch.jit.trace(_Forward(unet), (x.detach(), t, c.detach()), check_trace=False)


def _dynamic(unet) -> bool:
    """True when a frozen graph could go stale between calls: adapter layers or hooks."""
    for mod in unet.modules():
        if hasattr(mod, "lora_A") or mod._forward_hooks or mod._forward_pre_hooks:
            return True
    return False


class FrozenUNet:
    """Callable like the U-Net in the denoising loop: `unet(x, t, encoder_hidden_states=c, return_dict=False)`."""

    def __init__(self, unet):
        self.unet = unet
        self.config = unet.config
        self.graphs: dict[tuple, torch.jit.ScriptModule] = {}

    def __call__(self, sample, timestep, encoder_hidden_states, return_dict=False):
        t = _timestep(timestep, sample)
        if _dynamic(self.unet):
            return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, return_dict=False)
        # tensor._version counts in-place writes, so a merged LoRA or any weight edit forces a new graph
        weights = hash(tuple(p._version for p in self.unet.parameters()))
        key = (*_inputs_key(sample, t, encoder_hidden_states), weights)
        graph = self.graphs.get(key)
        if graph is None:
            self.graphs.clear()  # one live graph: stale weights or shapes are dropped
            with torch.no_grad(), warnings.catch_warnings():
                traced = _record(self.unet.eval(), sample, t, encoder_hidden_states)
                warnings.simplefilter("ignore")  # freeze/optimize_for_inference announce their deprecation
                graph = torch.jit.optimize_for_inference(torch.jit.freeze(traced.eval()))
            self.graphs[key] = graph
        return (graph(sample, t, encoder_hidden_states),)


def sampling_unet(model):
    """The U-Net the loop should call: the frozen wrapper when the model was loaded with jit=True."""
    if not model.extra.get("jit"):
        return model.unet
    wrapper = model.extra.get("_frozen_unet")
    if wrapper is None or wrapper.unet is not model.unet:
        wrapper = model.extra["_frozen_unet"] = FrozenUNet(model.unet)
    return wrapper


class TracedUNet:
    """Training-time U-Net: `unet(x, t, encoder_hidden_states=c, return_dict=False)`, autograd intact.

    Holds one graph per (input shapes, dtypes, device, train/eval mode); a different shape (a last,
    smaller batch) records another. If any module has hooks when it is built, every call goes to the eager
    U-Net (a trace would skip them). Build it once per training run, after the adapters and hooks are in
    place: adapter scales, adapters or hooks changed afterwards are not seen."""

    def __init__(self, unet):
        self.unet = unet
        self.config = unet.config
        self.graphs: dict[tuple, torch.jit.ScriptModule] = {}
        self.hooked = any(m._forward_hooks or m._forward_pre_hooks for m in unet.modules())

    def __call__(self, sample, timestep, encoder_hidden_states, return_dict=False):
        if self.hooked:
            return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, return_dict=False)
        t, c = _timestep(timestep, sample), encoder_hidden_states
        key = (*_inputs_key(sample, t, c), self.unet.training, torch.is_autocast_enabled(sample.device.type))
        graph = self.graphs.get(key)
        if graph is None:
            graph = self.graphs[key] = _record(self.unet, sample, t, c)
        # optimizations off: no differentiable subgraphs with TorchScript's own gradient formulas, so the
        # backward pass is eager autograd over the recorded ops (same bits as the eager U-Net)
        with torch.jit.optimized_execution(False):
            return (graph(sample, t, c),)


def training_unet(unet, enabled: bool = True):
    """The U-Net a training step should call: the traced wrapper, or the U-Net itself when disabled."""
    return TracedUNet(unet) if enabled else unet
