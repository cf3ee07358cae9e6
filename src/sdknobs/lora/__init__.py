"""LoRA: low-rank bypasses W + (alpha/r) B A on the U-Net's (and optionally the text encoder's) layers.

Rooms: `spec` (--lora FILE[:WEIGHT][@WINDOW]), `targets` (presets, regexes), `layers` (peft injection,
several adapters, windows), `files` (kohya / diffusers / peft files), `merge` (fold, concat, SVD),
`inspect` (inspect, conflict), `train` (LoraMethod for the shared trainer), `trace` (trace-step),
`results` (the shapes-world result table). Importing this package is cheap: peft loads on first use.
"""
from importlib import import_module

_EXPORTS = {
    "LoraSpec": "spec", "parse_spec": "spec", "Window": "spec",
    "PRESETS": "targets", "presets_for": "targets", "resolve_targets": "targets",
    "LoraWeights": "files", "LoraFactors": "files", "read_lora": "files", "write_lora": "files",
    "apply_loras": "layers", "remove_loras": "layers", "applied": "layers", "LoraSet": "layers",
    "merge_into": "merge", "combine": "merge",
    "conflict": "inspect", "inspect_lines": "inspect",
    "LoraTrainConfig": "train", "LoraMethod": "train", "train_lora": "train",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(import_module(f"sdknobs.lora.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'sdknobs.lora' has no attribute {name!r}")
