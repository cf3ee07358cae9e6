"""LoRA files: one in-memory form (`LoraWeights`), read from and written to the layouts people share.

In memory, a LoRA is a dict  "unet.<module path>" / "text_encoder.<module path>"  ->  (A, B, alpha),
where the layer's update is  delta W = (alpha / r) * B A  (A = down [r, in(, k, k)], B = up [out, r(, 1, 1)]).
Text-encoder paths keep CLIP's "text_model." prefix, as kohya, A1111 and older transformers name them.

On disk (.safetensors only; written to a temporary file and renamed, so never half-written):
- kohya / A1111 / ComfyUI (the default):  lora_unet_<path with _>.lora_down.weight / .lora_up.weight
  / .alpha,  and lora_te_<path>... for the text encoder; metadata in kohya's ss_* keys.
- diffusers (`save_lora_weights`):  unet.<path>.lora_A.weight / .lora_B.weight, text_encoder.<path>...,
  alpha in the `lora_adapter_metadata` JSON (LoraConfig fields per component).
- read only: peft (`<path>.lora_A.weight`, optional `base_model.model.` prefix and adapter_config.json
  beside the file) and diffusers' older `...processor.to_q_lora.down.weight` layout.
Key conversions are diffusers' own (`lora_conversion_utils`, `state_dict_utils`); a key they cannot
place, or one that is not a LoRA weight, is an error naming it: nothing is ever dropped silently.
"""
from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sdknobs.errors import SdknobsError

FORMATS = ("kohya", "diffusers")
TE_PREFIX = "text_model."


@dataclass
class LoraFactors:
    down: torch.Tensor  # A: [r, in] or [r, in, kh, kw]
    up: torch.Tensor  # B: [out, r] or [out, r, 1, 1]
    alpha: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def delta(self) -> torch.Tensor:
        """delta W = (alpha / r) * B A, in the layer's weight shape ([out, in] or [out, in, kh, kw])."""
        d = self.up.flatten(1).float() @ self.down.flatten(1).float()
        shape = (self.up.shape[0], *self.down.shape[1:])
        return (self.scale * d).reshape(shape)


@dataclass
class LoraWeights:
    layers: dict[str, LoraFactors]  # "unet.<path>" / "text_encoder.<path>" -> factors
    metadata: dict[str, str] = field(default_factory=dict)
    source_keys: dict[str, str] = field(default_factory=dict)  # layer -> its down key in the file (messages)
    path: str = ""
    format: str = ""

    def key_in_file(self, layer: str) -> str:
        return self.source_keys.get(layer, layer)

    def num_params(self) -> int:
        return sum(f.down.numel() + f.up.numel() for f in self.layers.values())

    def ranks(self) -> Counter:
        return Counter(f.rank for f in self.layers.values())

    def alphas(self) -> Counter:
        return Counter(f.alpha for f in self.layers.values())


def _fail(path, msg):
    raise SdknobsError(f"LoRA file {path}: {msg}")


# --- reading ---------------------------------------------------------------------------------------

def read_lora(path: str | Path) -> LoraWeights:
    """Read a kohya, diffusers or peft LoRA .safetensors file (format detected from its keys)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise SdknobsError(f"--lora {str(path)!r}: no such file")
    if path.suffix != ".safetensors":
        _fail(path, "only .safetensors LoRA files are read (pickled .pt/.bin files can run code)")
    try:
        sd = load_file(str(path))
        with safe_open(str(path), "pt") as f:
            meta = dict(f.metadata() or {})
    except Exception as e:  # noqa: BLE001 - safetensors raises several types for a broken file
        _fail(path, f"not a readable safetensors file ({str(e).splitlines()[0]})")
    if not sd:
        _fail(path, "holds no tensors")
    keys = list(sd)
    if all(k.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")) for k in keys):
        w = _read_kohya(path, sd)
    elif any(".lora_A." in k or ".lora_B." in k or ".lora.down." in k or "_lora.down." in k
             or ".lora_linear_layer." in k for k in keys):
        w = _read_peft(path, sd, meta)
    else:
        bad = next(k for k in keys if not k.startswith(("lora_unet_", "lora_te")))
        _fail(path, f"key {bad!r} is neither kohya (lora_unet_/lora_te_...) nor diffusers/peft (...lora_A/lora_B)")
    w.metadata, w.path = meta, str(path)
    return w


def _read_kohya(path, sd) -> LoraWeights:
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_lora_to_diffusers

    groups: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in sd.items():
        name, _, suffix = k.partition(".")
        if suffix not in ("lora_down.weight", "lora_up.weight", "alpha"):
            _fail(path, f"key {k!r} is not a LoRA down/up/alpha weight (LyCORIS LoHa/LoKr, DoRA and bias "
                        f"keys are not supported)")
        if name.startswith("lora_te2_"):
            _fail(path, f"key {k!r} is for SDXL's second text encoder, which SD1/SD2 models do not have")
        groups.setdefault(name, {})[suffix] = v
    pairs, origin = {}, {}
    for name, g in groups.items():
        for part in ("lora_down.weight", "lora_up.weight"):
            if part not in g:
                _fail(path, f"{name}.{part} is missing (the file has {', '.join(name + '.' + s for s in g)})")
            pairs[f"{name}.{part}"] = g[part]
            origin[id(g[part])] = name
    # diffusers' converter renames kohya keys; the tensors keep their identity, which maps them back
    try:
        converted, _ = _convert_non_diffusers_lora_to_diffusers(dict(pairs))
    except (ValueError, KeyError) as e:
        _fail(path, f"diffusers cannot place these kohya keys: {str(e).strip()[:300]}")
    by_component = {c: {k[len(c) + 1:]: v for k, v in converted.items() if k.startswith(c + ".")}
                    for c in ("unet", "text_encoder")}
    out = LoraWeights({}, format="kohya")
    for component, part in by_component.items():
        for k, v in _to_peft(component, part).items():
            module, ab = _split_peft_key(path, k)
            name = origin[id(v)]
            layer = f"{component}.{module}"
            first = out.source_keys.setdefault(layer, f"{name}.lora_down.weight")
            if first.split(".")[0] != name:  # two kohya names for one layer: refuse rather than keep one
                _fail(path, f"keys {first!r} and {name + '.lora_down.weight'!r} both map to layer {layer}")
            f = out.layers.get(layer) or LoraFactors(None, None, 0.0)
            if ab == "A":
                f.down = v
            else:
                f.up = v
            g = groups[name]
            f.alpha = float(g["alpha"].item()) if "alpha" in g else float(g["lora_down.weight"].shape[0])
            out.layers[layer] = f
    return out


def _to_peft(component: str, sd: dict) -> dict:
    """diffusers' own conversion of older diffusers key layouts to peft's lora_A / lora_B."""
    from diffusers.utils.state_dict_utils import (convert_state_dict_to_diffusers, convert_state_dict_to_peft,
                                                  convert_unet_state_dict_to_peft)

    if not sd or all(".lora_A." in k or ".lora_B." in k for k in sd):
        return sd
    if component == "unet":
        return convert_unet_state_dict_to_peft(sd)
    return convert_state_dict_to_peft(convert_state_dict_to_diffusers(sd))


def _split_peft_key(path, key: str) -> tuple[str, str]:
    """'<module>.lora_A.weight' (optionally '.lora_A.<adapter>.weight') -> (module, 'A' or 'B')."""
    for ab in ("A", "B"):
        marker = f".lora_{ab}."
        if marker in key and key.endswith(".weight"):
            return key.split(marker)[0], ab
    _fail(path, f"key {key!r} is not a lora_A/lora_B weight (bias and DoRA keys are not supported)")


def _read_peft(path, sd, meta) -> LoraWeights:
    from peft.utils.other import get_pattern_key

    alphas_in_file, tensors = {}, {}
    for k, v in sd.items():
        k2 = k.removeprefix("base_model.model.")
        if k2.endswith(".alpha"):
            alphas_in_file[k2[: -len(".alpha")]] = float(v.item())
        else:
            tensors[k2] = v
    config = json.loads(meta.get("lora_adapter_metadata") or "{}")
    side = path.parent / "adapter_config.json"  # peft's save_pretrained writes it next to the weights
    if not config and side.is_file():
        config = json.loads(side.read_text())
    out = LoraWeights({}, format="diffusers" if "lora_adapter_metadata" in meta else "peft")
    configs = {}
    for component in ("unet", "text_encoder"):
        part = {k[len(component) + 1:]: v for k, v in tensors.items() if k.startswith(component + ".")}
        # peft files have no component prefix: CLIP's modules start with text_model., the rest is the U-Net
        bare = {k: v for k, v in tensors.items() if not k.startswith(("unet.", "text_encoder."))}
        part.update({k: v for k, v in bare.items() if k.startswith(TE_PREFIX) == (component == "text_encoder")})
        configs[component] = {k[len(component) + 1:]: v for k, v in config.items()
                              if k.startswith(component + ".")} or config
        original = {id(v): k for k, v in part.items()}
        for k, v in _to_peft(component, part).items():
            module, ab = _split_peft_key(path, k)
            if component == "text_encoder" and not module.startswith(TE_PREFIX):
                module = TE_PREFIX + module
            layer = f"{component}.{module}"
            f = out.layers.setdefault(layer, LoraFactors(None, None, 0.0))
            if ab == "A":
                f.down = v
                out.source_keys[layer] = original.get(id(v), k)
            else:
                f.up = v
    for layer, f in out.layers.items():
        if f.down is None or f.up is None:
            _fail(path, f"{out.key_in_file(layer)}: its lora_{'B' if f.up is None else 'A'} half is missing")
        component, module = layer.split(".", 1)
        cfg = configs[component]
        pattern = cfg.get("alpha_pattern") or {}
        hit = get_pattern_key(list(pattern), module) if pattern else None
        if layer in alphas_in_file or module in alphas_in_file:
            f.alpha = alphas_in_file.get(layer, alphas_in_file.get(module))
        elif hit in pattern:
            f.alpha = float(pattern[hit])
        elif "lora_alpha" in cfg:
            f.alpha = float(cfg["lora_alpha"])
        else:  # peft / diffusers convention without a config: alpha = r (scale 1)
            f.alpha = float(f.rank)
    return out


# --- writing ---------------------------------------------------------------------------------------

def _peft_state_dict(w: LoraWeights) -> dict[str, torch.Tensor]:
    sd = {}
    for layer, f in w.layers.items():
        sd[f"{layer}.lora_A.weight"] = f.down.detach().to("cpu").contiguous()
        sd[f"{layer}.lora_B.weight"] = f.up.detach().to("cpu").contiguous()
    return sd


def to_kohya(w: LoraWeights) -> dict[str, torch.Tensor]:
    """kohya/A1111 keys via diffusers' PEFT -> kohya converter; SD1/SD2 text encoders are lora_te_."""
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya

    peft_sd = _peft_state_dict(w)
    layer_of = {id(v): k.rsplit(".lora_", 1)[0] for k, v in peft_sd.items()}
    out = {}
    for k, v in convert_state_dict_to_kohya(peft_sd).items():
        k = k.replace("lora_te1_", "lora_te_", 1)
        if k.endswith(".alpha"):  # the converter writes alpha = r; the true alpha is set below
            continue
        out[k] = v
        if k.endswith(".lora_down.weight"):
            out[k.split(".")[0] + ".alpha"] = torch.tensor(float(w.layers[layer_of[id(v)]].alpha))
    return out


def write_lora(w: LoraWeights, path: str | Path, fmt: str = "kohya", metadata: dict | None = None) -> Path:
    """Write `w` as .safetensors in `fmt` ("kohya" or "diffusers"), atomically."""
    from sdknobs.atomic import save_safetensors

    path = Path(path)
    if fmt not in FORMATS:
        raise SdknobsError(f"--format {fmt!r} is not known; choose one of {', '.join(FORMATS)}")
    if path.suffix != ".safetensors":
        raise SdknobsError(f"--out {str(path)!r} must end in .safetensors")
    if not w.layers:
        raise SdknobsError(f"nothing to write to {path}: the LoRA has no layers")
    meta = {k: str(v) for k, v in {**w.metadata, **(metadata or {})}.items()}
    if fmt == "kohya":
        sd = to_kohya(w)
    else:
        sd = _peft_state_dict(w)
        meta["lora_adapter_metadata"] = json.dumps(_diffusers_config(w), indent=2, sort_keys=True)
    meta.setdefault("format", "pt")
    return save_safetensors(sd, path, meta)  # temporary name + rename: never half a file


def _diffusers_config(w: LoraWeights) -> dict:
    """LoraConfig fields per component, prefixed as diffusers' `_pack_dict_with_prefix` does."""
    from diffusers.loaders.lora_base import _pack_dict_with_prefix

    out = {}
    for component in ("unet", "text_encoder"):
        # module names without CLIP's text_model. prefix match with or without it (peft matches suffixes)
        layers = {k[len(component) + 1:].removeprefix(TE_PREFIX): f for k, f in w.layers.items()
                  if k.startswith(component + ".")}
        if not layers:
            continue
        r = Counter(f.rank for f in layers.values()).most_common(1)[0][0]
        a = Counter(f.alpha for f in layers.values()).most_common(1)[0][0]
        cfg = {"r": r, "lora_alpha": a, "target_modules": sorted(layers), "use_dora": False, "lora_bias": False,
               "rank_pattern": {m: f.rank for m, f in layers.items() if f.rank != r},
               "alpha_pattern": {m: f.alpha for m, f in layers.items() if f.alpha != a}}
        out.update(_pack_dict_with_prefix(cfg, component))
    return out


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
