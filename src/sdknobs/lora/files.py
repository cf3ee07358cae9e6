"""LoRA files: one in-memory form (`LoraWeights`), read from and written to the layouts people share.

In memory, a LoRA is a dict  "unet.<module path>" / "text_encoder.<module path>" (SDXL: also
"text_encoder_2.<module path>", its second, OpenCLIP-bigG encoder)  ->  (A, B, alpha),
where the layer's update is  delta W = (alpha / r) * B A  (A = down [r, in(, k, k)], B = up [out, r(, 1, 1)]).
Text-encoder paths keep CLIP's "text_model." prefix, as kohya, A1111 and transformers 4.x name them.

On disk (.safetensors only; written to a temporary file and renamed, so never half-written):
- kohya / A1111 / ComfyUI (the default):  lora_unet_<path with _>.lora_down.weight / .lora_up.weight
  / .alpha,  and lora_te_<path>... for the text encoder; metadata in kohya's ss_* keys. SDXL (as kohya's
  sdxl_train_network.py writes it): lora_unet_<the ORIGINAL SGM module path>, e.g.
  lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q (`keys.sgm_name`), lora_te1_ and lora_te2_;
- diffusers (`save_lora_weights`):  unet.<path>.lora_A.weight / .lora_B.weight, text_encoder.<path>...
  (and text_encoder_2.<path>... on SDXL),
  alpha in the `lora_adapter_metadata` JSON (LoraConfig fields per component).
- read only: peft (`<path>.lora_A.weight`, optional `base_model.model.` prefix and adapter_config.json
  beside the file; CLIP paths with or without text_model.) and diffusers' older
  `...processor.to_q_lora.down.weight` layout.
Written factors are `portable`: one alpha per kohya file, scale 1 in diffusers files, so every peer scales
every layer alike (tests/interop checks kohya, ComfyUI, A1111, diffusers, peft and LyCORIS).
Key conversions are diffusers' own (`lora_conversion_utils`, `state_dict_utils`), guarded by the layer
grammar of `keys.py`; a file for another architecture (SDXL, DiT), a key nobody can place or that is not a
LoRA weight, and a tensor no peer could use (NaN/inf, integer, rank 0, up/down disagreeing) are errors
naming the file and key: nothing is ever dropped silently.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sdknobs.errors import SdknobsError

FORMATS = ("kohya", "diffusers")
TE_PREFIX = "text_model."
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
TEXT_COMPONENTS = COMPONENTS[1:]


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
    architecture: str = ""  # keys.Family name ("SDXL", "SD1.x/SD2.x"); "" = from the layer names
    unet_layout: object = None  # keys.UnetLayout for kohya's SGM names (None: SDXL's)

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


def _list(keys, n: int = 4) -> str:
    keys = sorted(keys)
    return ", ".join(map(repr, keys[:n])) + (f" and {len(keys) - n} more" if len(keys) > n else "")


def model_file_name(source) -> str:
    """What a shared file says about its base model: the embedded name, or the file/folder name only
    (kohya stores the file name; a full path would publish the trainer's home folder)."""
    s = str(source or "")
    return s if "/" not in s and "\\" not in s else Path(s.rstrip("/\\")).name


# --- reading ---------------------------------------------------------------------------------------

def _open(path: Path) -> tuple[dict, dict]:
    """Tensors and metadata of a .safetensors LoRA, or an SdknobsError saying what the path is instead."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from sdknobs.training.checkpoint import STATE, WEIGHTS

    if path.is_dir():
        if (path / WEIGHTS).is_file() and (path / STATE).is_file():
            _fail(path, f"is a training checkpoint folder ({WEIGHTS} + {STATE}, for --resume), not a LoRA file; "
                        f"the LoRA is the .safetensors file the run wrote at --out")
        _fail(path, "is a folder; expected a LoRA .safetensors file")
    if not path.is_file():
        raise SdknobsError(f"--lora {str(path)!r}: no such file")
    if path.suffix != ".safetensors":
        what = "a training checkpoint's state (optimizer, RNG), not a LoRA" if path.name == STATE else \
            "pickled .pt/.bin/.ckpt LoRA files can run code when loaded, so they are not read"
        _fail(path, f"expected a .safetensors file; {what}")
    try:
        sd = load_file(str(path))
        with safe_open(str(path), "pt") as f:
            meta = dict(f.metadata() or {})
    except Exception as e:  # noqa: BLE001 - safetensors raises several types for a broken file
        _fail(path, f"not a readable safetensors file, truncated or of another kind ({str(e).splitlines()[0]})")
    if not sd:
        _fail(path, "holds no tensors")
    slashed = [k for k in sd if "/" in k]
    if slashed:
        _fail(path, f"keys like {slashed[0]!r} ('<module>/<parameter>') are a training checkpoint's weights "
                    f"({WEIGHTS}), not a LoRA file; the LoRA is the .safetensors file the run wrote at --out")
    return sd, meta


def read_lora(path: str | Path, model=None) -> LoraWeights:
    """Read a kohya, diffusers or peft LoRA .safetensors file (format detected from its keys), check its
    architecture and every tensor (float, finite, rank >= 1, up/down shapes that agree). `model` only
    makes messages name the model the file was meant for."""
    from sdknobs.lora.keys import SUPPORTED, UnetLayout, check_architecture, detect_architecture

    path = Path(path)
    sd, meta = _open(path)
    family, evidence = detect_architecture(list(sd), meta)
    if not family.supported:
        mine = f"the model {model.source!r} is an {SUPPORTED}-architecture model (family {model.family})" \
            if model is not None else f"sdknobs loads {SUPPORTED}-architecture models"
        _fail(path, f"is a LoRA for {family.name} ({evidence}); {mine}, whose layers have other names and "
                    f"shapes; use it with an {family.name} model in a tool that supports it")
    if model is not None:
        check_architecture(f"LoRA file {path}", family, evidence, model)
    layout = UnetLayout.of(model.unet.config) if model is not None else \
        UnetLayout(int(meta.get("sdknobs.unet_layers_per_block", 2) or 2))
    keys = list(sd)
    if all(k.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")) for k in keys):
        w = _read_kohya(path, sd, family.name == "SDXL", layout)
    elif any(".lora_A." in k or ".lora_B." in k or ".lora.down." in k or "_lora.down." in k
             or ".lora_linear_layer." in k for k in keys):
        w = _read_peft(path, sd, meta, family.name == "SDXL")
    else:
        bad = next(k for k in keys if not k.startswith(("lora_unet_", "lora_te")))
        _fail(path, f"key {bad!r} is neither kohya (lora_unet_/lora_te_...) nor diffusers/peft (...lora_A/lora_B)")
    for layer, f in w.layers.items():
        _check_factors(path, w.key_in_file(layer), f)
    w.metadata, w.path, w.architecture, w.unet_layout = meta, str(path), family.name, layout
    return w


def _check_factors(path, key: str, f: LoraFactors) -> None:
    """What every peer needs: float finite factors, A [r, in(, k, k)] and B [out, r(, 1, 1)] with one r >= 1."""
    for part, t in (("lora_down (A)", f.down), ("lora_up (B)", f.up)):
        if not t.is_floating_point():
            _fail(path, f"{key}: {part} holds {t.dtype} values; LoRA factors must be floating point "
                        f"(float32, float16 or bfloat16)")
        if t.ndim not in (2, 4):
            _fail(path, f"{key}: {part} has shape {tuple(t.shape)}; expected 2 dimensions (Linear) or 4 (Conv2d)")
        bad = int((~torch.isfinite(t)).sum())
        if bad:
            _fail(path, f"{key}: {part} has {bad} NaN/inf value(s) of {t.numel()}; expected finite numbers")
    r = f.down.shape[0]
    if r < 1:
        _fail(path, f"{key}: rank 0 (lora_down has shape {tuple(f.down.shape)}); expected rank >= 1")
    want = f"[out, {r}]" if f.down.ndim == 2 else f"[out, {r}, 1, 1]"
    if f.up.ndim != f.down.ndim or f.up.shape[1] != r or (f.up.ndim == 4 and tuple(f.up.shape[2:]) != (1, 1)):
        _fail(path, f"{key}: lora_up has shape {tuple(f.up.shape)} but lora_down {tuple(f.down.shape)} "
                    f"(rank {r}); expected lora_up {want}")
    if not math.isfinite(f.alpha) or f.alpha == 0:
        _fail(path, f"{key}: alpha is {f.alpha}; expected a finite non-zero number (kohya reads alpha 0 as "
                    f"the rank, ComfyUI and A1111 as scale 0)")


def _alpha(path, name: str, t) -> float:
    if t.numel() != 1:
        _fail(path, f"{name}.alpha has shape {tuple(t.shape)}; expected one number")
    return float(t.item())


def _read_kohya(path, sd, xl: bool = False, layout=None) -> LoraWeights:
    from diffusers.loaders.lora_conversion_utils import (_convert_non_diffusers_lora_to_diffusers,
                                                         _maybe_map_sgm_blocks_to_diffusers)

    from sdknobs.lora.keys import KOHYA_TE, KOHYA_UNET_SGM, UNET_MODULE, UNET_MODULE_XL, sgm_name

    groups: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in sd.items():
        name, _, suffix = k.partition(".")
        if suffix not in ("lora_down.weight", "lora_up.weight", "alpha"):
            _fail(path, f"key {k!r} is not a LoRA down/up/alpha weight (LyCORIS LoHa/LoKr, DoRA and bias "
                        f"keys are not supported)")
        groups.setdefault(name, {})[suffix] = v
    unet_grammar = UNET_MODULE_XL if xl else UNET_MODULE
    diffusers_named = re.compile("^lora_unet_" + unet_grammar.pattern[1:].replace(r"\.", "_"))
    sgm = [n for n in groups if KOHYA_UNET_SGM.match(n)] if xl else []
    unknown = [n for n in groups if not (diffusers_named.match(n) or KOHYA_TE.match(n) or n in sgm)]
    if unknown:
        what, example = ("an SDXL", "lora_unet_<SGM module path with _>, e.g. lora_unet_input_blocks_4_1_"
                         "transformer_blocks_0_attn2_to_k, lora_unet_<diffusers path with _>, or lora_te1_/lora_te2_"
                         "text_model_encoder_layers_N_") if xl else \
            ("an SD1.x/SD2.x", "lora_unet_<diffusers module path with _>, e.g. lora_unet_mid_block_attentions_0_"
             "proj_in, or lora_te_text_model_encoder_layers_N_")
        _fail(path, f"{len(unknown)} layer name(s) {_list(unknown)} are no LoRA-able layer of {what} U-Net or "
                    f"CLIP text encoder (expected {example}self_attn_q_proj/k/v/out_proj or _mlp_fc1/fc2)")
    mixed = [n for n in groups if n.startswith("lora_unet_") and n not in sgm and re.match(
        r"lora_unet_(down_blocks|mid_block|up_blocks)_", n)]
    if sgm and mixed:  # diffusers' SGM map would drop the SGM half of such a file: refuse instead
        _fail(path, f"mixes kohya's SGM U-Net names ({sgm[0]!r}) with diffusers' ({mixed[0]!r}); expected one layout")
    pairs, origin = {}, {}
    for name, g in groups.items():
        for part in ("lora_down.weight", "lora_up.weight"):
            if part not in g:
                _fail(path, f"{name}.{part} is missing (the file has {', '.join(name + '.' + s for s in g)})")
            pairs[f"{name}.{part}"] = g[part]
            origin[id(g[part])] = name
    # diffusers' converter renames kohya keys; the tensors keep their identity, which maps them back
    try:
        if sgm:  # kohya's SDXL names: diffusers' own SGM -> diffusers block map, as SDXL's load_lora_weights runs it
            from types import SimpleNamespace

            pairs = _maybe_map_sgm_blocks_to_diffusers(dict(pairs), SimpleNamespace(
                layers_per_block=layout.layers_per_block))
        converted, _ = _convert_non_diffusers_lora_to_diffusers(dict(pairs))
    except (ValueError, KeyError, IndexError) as e:
        _fail(path, f"diffusers cannot place these kohya keys: {str(e).strip()[:300]}")
    by_component = {c: {k[len(c) + 1:]: v for k, v in converted.items() if k.startswith(c + ".")}
                    for c in COMPONENTS}
    out = LoraWeights({}, format="kohya")
    for component, part in by_component.items():
        for k, v in _to_peft(component, part).items():
            module, ab = _split_peft_key(path, k)
            name = origin[id(v)]
            prefix = "lora_unet_" if component == "unet" else name[: name.index("_text_model") + 1]
            back = sgm_name(module, layout) if name in sgm else prefix + module.replace(".", "_")
            if back != name or (component == "unet" and not unet_grammar.match(module)):
                _fail(path, f"key {name + '.lora_down.weight'!r} was converted to {component} layer {module!r}, "
                            f"which does not name it back; refusing to guess")
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
            f.alpha = _alpha(path, name, g["alpha"]) if "alpha" in g else float(g["lora_down.weight"].shape[0])
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


def _peft_components(path, tensors: dict) -> dict[str, dict]:
    """Split peft keys by component: 'unet.' / 'text_encoder.' / 'text_encoder_2.' prefixes, or (bare peft
    files) by the module names: CLIP's with or without text_model. (transformers 5 saves adapters without it),
    else the U-Net's."""
    from sdknobs.lora.keys import component_of_module

    parts = {c: {} for c in COMPONENTS}
    unknown = []
    for k, v in tensors.items():
        comp, _, rest = k.partition(".")
        if comp in parts:
            parts[comp][rest] = v
            continue
        comp = component_of_module(re.split(r"\.lora_[AB]\.", k)[0]) or _component_by_prefix(k)
        if comp is None:
            unknown.append(k)
        else:
            parts[comp][k] = v
    if unknown:
        _fail(path, f"{len(unknown)} key(s) {_list(unknown)} name no LoRA-able layer of an SD1.x/SD2.x U-Net or "
                    f"CLIP text encoder (expected e.g. down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_q"
                    f".lora_A.weight or text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight)")
    return parts


def _component_by_prefix(key: str) -> str | None:
    """The component of a key in diffusers' older layouts (...processor.to_q_lora.down.weight), whose module
    path is checked against the grammar after diffusers' conversion."""
    if re.match(r"(down_blocks|up_blocks|mid_block)\.\d*", key):
        return "unet"
    if re.match(r"(text_model\.)?encoder\.layers\.\d+\.", key):
        return "text_encoder"
    return None


def _read_peft(path, sd, meta, xl: bool = False) -> LoraWeights:
    from peft.utils.other import get_pattern_key

    from sdknobs.lora.keys import TE_MODULE, UNET_MODULE, UNET_MODULE_XL

    alphas_in_file, tensors = {}, {}
    for k, v in sd.items():
        k2 = k.removeprefix("base_model.model.")
        if k2.endswith(".alpha"):
            alphas_in_file[k2[: -len(".alpha")]] = _alpha(path, k2[: -len(".alpha")], v)
        else:
            tensors[k2] = v
    config = json.loads(meta.get("lora_adapter_metadata") or "{}")
    side = path.parent / "adapter_config.json"  # peft's save_pretrained writes it next to the weights
    if not config and side.is_file():
        config = json.loads(side.read_text())
    out = LoraWeights({}, format="diffusers" if "lora_adapter_metadata" in meta else "peft")
    configs = {}
    for component, part in _peft_components(path, tensors).items():
        configs[component] = {k[len(component) + 1:]: v for k, v in config.items()
                              if k.startswith(component + ".")} or config
        original = {id(v): k for k, v in part.items()}
        grammar = (UNET_MODULE_XL if xl else UNET_MODULE) if component == "unet" else TE_MODULE
        for k, v in _to_peft(component, part).items():
            module, ab = _split_peft_key(path, k)
            if not grammar.match(module):
                _fail(path, f"key {original.get(id(v), k)!r} names {component} layer {module!r}, which is no "
                            f"LoRA-able layer of an {'SDXL' if xl else 'SD1.x/SD2.x'} {component.replace('_', ' ')}")
            if component != "unet" and not module.startswith(TE_PREFIX):
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


def architecture_of(w: LoraWeights) -> str:
    """The family name of `w`: as read or extracted, else from its layer names (keys.detect_architecture)."""
    from sdknobs.lora.keys import detect_architecture

    return w.architecture or detect_architecture(list(w.layers), w.metadata)[0].name


def to_kohya(w: LoraWeights) -> dict[str, torch.Tensor]:
    """kohya/A1111 keys via diffusers' PEFT -> kohya converter; SD1/SD2 text encoders are lora_te_. SDXL as
    kohya writes it: U-Net layers under their SGM names (`keys.sgm_name`), text encoders lora_te1_/lora_te2_."""
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya

    from sdknobs.lora.keys import UnetLayout, sgm_name

    xl = architecture_of(w) == "SDXL"
    peft_sd = _peft_state_dict(w)
    layer_of = {id(v): k.rsplit(".lora_", 1)[0] for k, v in peft_sd.items()}
    out = {}
    for k, v in convert_state_dict_to_kohya(peft_sd).items():
        if not xl:
            k = k.replace("lora_te1_", "lora_te_", 1)
        elif k.startswith("lora_unet_") and not k.endswith(".alpha"):
            module = layer_of[id(v)].split(".", 1)[1]
            name = sgm_name(module, w.unet_layout or UnetLayout())
            if name is None:
                raise SdknobsError(f"LoRA layer unet.{module} has no name in kohya's SDXL (SGM) layout; write it "
                                   f"with --format diffusers")
            k = name + "." + k.split(".", 1)[1]
        if k.endswith(".alpha"):  # the converter writes alpha = r; the true alpha is set below
            continue
        out[k] = v
        if k.endswith(".lora_down.weight"):
            out[k.split(".")[0] + ".alpha"] = torch.tensor(float(w.layers[layer_of[id(v)]].alpha))
    return out


def portable(w: LoraWeights, fmt: str) -> LoraWeights:
    """The same delta W in factors every peer scales alike.

    Peers do not all honour per-layer alphas: diffusers' load_lora_weights uses the most common alpha of a
    kohya file for every layer, and ComfyUI reads a diffusers-layout file (no .alpha keys) at scale 1. So
    kohya files get one alpha A for the whole file (the most common one) and each layer's B is scaled by
    alpha_l / A, which keeps (alpha_l / r_l) B A; diffusers files get scale 1 in every layer (B scaled by
    alpha_l / r_l, alpha = r). Layers already at the target keep their bits."""
    if fmt == "kohya":
        a = Counter(f.alpha for f in w.layers.values()).most_common(1)[0][0]
        factor = {k: f.alpha / a for k, f in w.layers.items()}
        alpha = {k: a for k in w.layers}
    else:
        factor = {k: f.scale for k, f in w.layers.items()}
        alpha = {k: float(f.rank) for k, f in w.layers.items()}
    layers = {}
    for k, f in w.layers.items():
        up = f.up if factor[k] == 1.0 else (f.up.detach().float() * factor[k]).to(f.up.dtype)
        layers[k] = LoraFactors(f.down, up, alpha[k])
    return LoraWeights(layers, dict(w.metadata), dict(w.source_keys), w.path, w.format, w.architecture, w.unet_layout)


def write_lora(w: LoraWeights, path: str | Path, fmt: str = "kohya", metadata: dict | None = None) -> Path:
    """Write `w` as .safetensors in `fmt` ("kohya" or "diffusers"), atomically, in `portable` factors."""
    from sdknobs.atomic import save_safetensors

    path = Path(path)
    if fmt not in FORMATS:
        raise SdknobsError(f"--format {fmt!r} is not known; choose one of {', '.join(FORMATS)}")
    if path.suffix != ".safetensors":
        raise SdknobsError(f"--out {str(path)!r} must end in .safetensors")
    if not w.layers:
        raise SdknobsError(f"nothing to write to {path}: the LoRA has no layers")
    for layer, f in w.layers.items():
        _check_factors(path, layer, f)
    arch, layout = architecture_of(w), w.unet_layout
    w = portable(w, fmt)
    w.architecture, w.unet_layout = arch, layout
    meta = {k: str(v) for k, v in {**w.metadata, **(metadata or {})}.items()}
    if arch == "SDXL" and layout is not None:  # what the SGM numbering was made with (read back by read_lora)
        meta["sdknobs.unet_layers_per_block"] = str(layout.layers_per_block)
    if fmt == "kohya":
        sd = to_kohya(w)
        if "ss_network_alpha" in meta:  # the file's one alpha (see `portable`)
            meta["ss_network_alpha"] = f"{next(iter(w.layers.values())).alpha:g}"
    else:
        sd = _peft_state_dict(w)
        meta["lora_adapter_metadata"] = json.dumps(_diffusers_config(w), indent=2, sort_keys=True)
    meta.setdefault("format", "pt")
    return save_safetensors(sd, path, meta)  # temporary name + rename: never half a file


def _diffusers_config(w: LoraWeights) -> dict:
    """LoraConfig fields per component, prefixed as diffusers' `_pack_dict_with_prefix` does."""
    from diffusers.loaders.lora_base import _pack_dict_with_prefix

    out = {}
    for component in COMPONENTS:
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
