"""How each peer tool loads our files: its own code where it is installed here, its rules otherwise.

Run (their code, installed in the dev environment): diffusers (`load_lora_weights`,
`load_textual_inversion`), peft (`inject_adapter_in_model` + `set_peft_model_state_dict`), LyCORIS
(`lycoris.kohya.create_network_from_weights`, what kohya's trainer calls for `--network_module lycoris.kohya`).

Encoded (their code cannot be vendored and CI has no network; each rule below cites the file and
function it was read from, at kohya-ss/sd-scripts 48d368fa, ComfyUI and AUTOMATIC1111 v1.10 masters):
kohya's networks/lora.py, ComfyUI's comfy/lora.py + comfy/weight_adapter/lora.py + comfy/sd1_clip.py,
A1111's extensions-builtin/Lora/networks.py + network.py + network_lora.py,
modules/textual_inversion/textual_inversion.py and modules/safe.py.

LoRA peers return `Loaded`: delta W per layer ("unet.<diffusers path>" / "text_encoder.text_model.<path>",
the keys of sdknobs' own `LoraWeights`) as that peer adds it to the weight at strength 1, and the file's
keys the peer leaves unused (loaders that drop them silently count too: that is the point).
"""
from __future__ import annotations

import pickletools
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file


@dataclass
class Loaded:
    deltas: dict[str, torch.Tensor] = field(default_factory=dict)
    not_loaded: list[str] = field(default_factory=list)


def te_name(path: str) -> str:
    """CLIP module paths as transformers 4.x names them (kohya pins 4.54, A1111 4.30): with text_model."""
    return path if path.startswith("text_model.") else "text_model." + path


def modules(model):
    """(layer key, module) for every Linear/Conv2d of the U-Net and the text encoder, transformers-4 names."""
    out = [(f"unet.{n}", m) for n, m in model.unet.named_modules()]
    out += [(f"text_encoder.{te_name(n)}", m) for n, m in model.text_encoder.named_modules() if n]
    return [(k, m) for k, m in out if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]


def _updown(up: torch.Tensor, down: torch.Tensor, shape) -> torch.Tensor:
    """up @ down over flattened factors, in the weight's shape: A1111 lyco_helpers.rebuild_conventional,
    ComfyUI LoRAAdapter.calculate_weight (mat1.flatten(1) @ mat2.flatten(1)), kohya LoRAInfModule.get_weight."""
    return (up.float().flatten(1) @ down.float().flatten(1)).reshape(shape)


# --- kohya sd-scripts: networks/lora.py -------------------------------------------------------------

KOHYA_UNET_CLASSES = ("Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D")  # LoRANetwork
KOHYA_TE_CLASSES = ("CLIPAttention", "CLIPSdpaAttention", "CLIPMLP")  # TEXT_ENCODER_TARGET_REPLACE_MODULE


def kohya_names(model) -> dict[str, tuple[str, torch.nn.Module]]:
    """LoRANetwork.create_modules: lora_name = prefix + '.' + name + '.' + child_name with '.' -> '_', for
    Linear/Conv2d children of the target classes (UNET_TARGET_REPLACE_MODULE, plus _CONV2D_3X3 when built
    from weights); the U-Net is kohya's library/original_unet.py, whose module names are diffusers'."""
    out = {}
    for prefix, root, classes, rename in (("lora_unet", model.unet, KOHYA_UNET_CLASSES, lambda n: f"unet.{n}"),
                                          ("lora_te", model.text_encoder, KOHYA_TE_CLASSES,
                                           lambda n: f"text_encoder.{te_name(n)}")):
        for name, mod in root.named_modules():
            if type(mod).__name__ not in classes:
                continue
            for child, sub in mod.named_modules():
                if type(sub).__name__ in ("Linear", "Conv2d"):
                    full = te_name(f"{name}.{child}") if prefix == "lora_te" else f"{name}.{child}"
                    out[f"{prefix}.{full}".replace(".", "_")] = (rename(f"{name}.{child}"), sub)
    return out


def kohya(sd: dict, model) -> Loaded:
    """create_network_from_weights: dim = lora_down.shape[0], alpha = the '.alpha' key or dim (LoRAModule:
    alpha 0/None -> dim), scale = alpha / dim; load_weights -> load_state_dict(strict=False), so keys of no
    module are dropped silently; LoRAInfModule.merge_to: W += multiplier * up @ down * scale."""
    names, res = kohya_names(model), Loaded()
    for key in sd:
        name = key.split(".")[0]
        if name not in names:
            res.not_loaded.append(key)
    for name, (layer, mod) in names.items():
        down, up = sd.get(f"{name}.lora_down.weight"), sd.get(f"{name}.lora_up.weight")
        if down is None or up is None:
            continue
        dim = down.shape[0]
        alpha = float(sd[f"{name}.alpha"]) if f"{name}.alpha" in sd else dim
        alpha = dim if alpha == 0 else alpha
        res.deltas[layer] = _updown(up, down, mod.weight.shape) * (alpha / dim)
    return res


# --- ComfyUI: comfy/lora.py, comfy/weight_adapter/lora.py --------------------------------------------

LORA_CLIP_MAP = {"mlp.fc1": "mlp_fc1", "mlp.fc2": "mlp_fc2", "self_attn.k_proj": "self_attn_k_proj",
                 "self_attn.q_proj": "self_attn_q_proj", "self_attn.v_proj": "self_attn_v_proj",
                 "self_attn.out_proj": "self_attn_out_proj"}  # comfy/lora.py LORA_CLIP_MAP


def comfy_key_map(model) -> dict[str, str]:
    """model_lora_keys_unet: for every diffusers U-Net weight (utils.unet_to_diffusers of the config):
    'lora_unet_' + path with '_', and ''/'unet.' + path with '.to_' -> '.processor.to_' (to_out.0 -> to_out);
    model_lora_keys_clip: for layers b < 32 and LORA_CLIP_MAP only: lora_te_/lora_te1_text_model_encoder_
    layers_{b}_{c} and text_encoder.text_model.encoder.layers.{b}.{c}."""
    km = {}
    for name, mod in model.unet.named_modules():
        if isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)):
            km[f"lora_unet_{name.replace('.', '_')}"] = f"unet.{name}"
            legacy = name.replace(".to_", ".processor.to_")
            legacy = legacy[:-2] if legacy.endswith(".to_out.0") else legacy
            km[legacy] = km[f"unet.{legacy}"] = f"unet.{name}"
    te = {te_name(n) for n, _ in model.text_encoder.named_modules()}
    for b in range(32):
        for c, kc in LORA_CLIP_MAP.items():
            if f"text_model.encoder.layers.{b}.{c}" in te:
                layer = f"text_encoder.text_model.encoder.layers.{b}.{c}"
                for k in (f"lora_te_text_model_encoder_layers_{b}_{kc}", f"lora_te1_text_model_encoder_layers_{b}_{kc}",
                          f"text_encoder.text_model.encoder.layers.{b}.{c}"):
                    km[k] = layer
    return km


def comfy(sd: dict, model) -> Loaded:
    """load_lora over the key map; LoRAAdapter.load takes '{x}.lora_up.weight'/'{x}.lora_down.weight',
    '{x}_lora.up.weight', '{x}.lora_B.weight'/'{x}.lora_A.weight', ...; calculate_weight: alpha = the
    '.alpha' key / mat2.shape[0], or 1.0 without one; W += strength * alpha * mat1 @ mat2; every key not
    in loaded_keys is only logged ('lora key not loaded')."""
    shapes = {k: m.weight.shape for k, m in modules(model)}
    res, loaded = Loaded(), set()
    for x, layer in comfy_key_map(model).items():
        for up_k, down_k in ((f"{x}.lora_up.weight", f"{x}.lora_down.weight"), (f"{x}_lora.up.weight", f"{x}_lora.down.weight"),
                             (f"{x}.lora_B.weight", f"{x}.lora_A.weight"), (f"{x}.lora.up.weight", f"{x}.lora.down.weight")):
            if up_k in sd:
                alpha = sd.get(f"{x}.alpha")
                scale = float(alpha) / sd[down_k].shape[0] if alpha is not None else 1.0
                res.deltas[layer] = _updown(sd[up_k], sd[down_k], shapes[layer]) * scale
                loaded |= {up_k, down_k} | ({f"{x}.alpha"} if alpha is not None else set())
                break
    res.not_loaded = [k for k in sd if k not in loaded]
    return res


# --- AUTOMATIC1111: extensions-builtin/Lora/networks.py, network.py, network_lora.py -----------------

def a1111_compvis(key: str) -> str:
    """networks.convert_diffusers_name_to_compvis (is_sd2 False), rule for rule."""
    suffix = {"conv1": "in_layers_2", "conv2": "out_layers_3", "time_emb_proj": "emb_layers_1",
              "conv_shortcut": "skip_connection"}
    rules = [
        (r"lora_unet_conv_in(.*)", lambda m: f"diffusion_model_input_blocks_0_0{m[1]}"),
        (r"lora_unet_conv_out(.*)", lambda m: f"diffusion_model_out_2{m[1]}"),
        (r"lora_unet_time_embedding_linear_(\d+)(.*)", lambda m: f"diffusion_model_time_embed_{int(m[1]) * 2 - 2}{m[2]}"),
        (r"lora_unet_down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", lambda m: "diffusion_model_input_blocks_"
         f"{1 + int(m[1]) * 3 + int(m[3])}_{1 if m[2] == 'attentions' else 0}_{_suffix(suffix, m[2], m[4])}"),
        (r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)", lambda m: "diffusion_model_middle_block_"
         f"{1 if m[1] == 'attentions' else int(m[2]) * 2}_{_suffix(suffix, m[1], m[3])}"),
        (r"lora_unet_up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", lambda m: "diffusion_model_output_blocks_"
         f"{int(m[1]) * 3 + int(m[3])}_{1 if m[2] == 'attentions' else 0}_{_suffix(suffix, m[2], m[4])}"),
        (r"lora_unet_down_blocks_(\d+)_downsamplers_0_conv", lambda m: f"diffusion_model_input_blocks_{3 + int(m[1]) * 3}_0_op"),
        (r"lora_unet_up_blocks_(\d+)_upsamplers_0_conv",
         lambda m: f"diffusion_model_output_blocks_{2 + int(m[1]) * 3}_{2 if int(m[1]) > 0 else 1}_conv"),
        (r"lora_te_text_model_encoder_layers_(\d+)_(.+)", lambda m: f"transformer_text_model_encoder_layers_{m[1]}_{m[2]}"),
    ]
    for pattern, out in rules:
        m = re.match(pattern, key)
        if m:
            return out(m)
    return key


def _suffix(table, kind, rest):
    return table.get(rest, rest) if kind == "resnets" else rest


def a1111_layer_mapping(model) -> dict[str, str]:
    """assign_network_names_to_compvis_modules: module names of sd_model.model (diffusion_model.*) and of
    cond_stage_model.wrapped (transformer.text_model.*) with '.' -> '_'. The LDM names come from
    sdknobs.single_file.ldm_state_dict (tested against original SD checkpoints), mapped back by storage."""
    from sdknobs.single_file import ldm_state_dict

    def ident(t):
        return t.data_ptr(), tuple(t.shape)

    diffusers_of = {ident(t): f"unet.{k}" for k, t in model.unet.state_dict().items()}
    diffusers_of |= {ident(t): f"text_encoder.{te_name(k)}" for k, t in model.text_encoder.state_dict().items()}
    ldm = ldm_state_dict(model.text_encoder, model.unet, model.vae)
    out = {}
    for k, t in ldm.items():
        if ident(t) in diffusers_of and k.endswith(".weight"):
            name = k[: -len(".weight")].removeprefix("model.").removeprefix("cond_stage_model.")
            out[name.replace(".", "_")] = diffusers_of[ident(t)][: -len(".weight")]
    return out


def a1111(sd: dict, model) -> Loaded:
    """load_network: key_network.split('.', 1); convert_diffusers_name_to_compvis; network_layer_mapping,
    then the _[qkv]_proj fallback and lora_unet -> diffusion_model; unmatched keys are only printed
    ('Failed to match keys'). ModuleTypeLora takes lora_up/lora_down (or lora_A/lora_B); NetworkModule:
    alpha = the 'alpha' key or None, calc_scale = alpha / dim, or 1.0 without alpha; W += updown * scale."""
    mapping, shapes = a1111_layer_mapping(model), {k: m.weight.shape for k, m in modules(model)}
    res, groups = Loaded(), {}
    for key, t in sd.items():
        base, part = key.split(".", 1)
        k = a1111_compvis(base)
        layer = mapping.get(k)
        if layer is None and (m := re.match(r"(.*)_([qkv]_proj)$", k)):
            layer = mapping.get(m[1])
        if layer is None and "lora_unet" in base:
            layer = mapping.get(base.replace("lora_unet", "diffusion_model"))
        if layer is None:
            res.not_loaded.append(key)
            continue
        groups.setdefault(layer, {})[part] = t
    for layer, w in groups.items():
        up, down = w.get("lora_up.weight", w.get("lora_B.weight")), w.get("lora_down.weight", w.get("lora_A.weight"))
        scale = float(w["alpha"]) / down.shape[0] if "alpha" in w else 1.0
        res.deltas[layer] = _updown(up, down, shapes[layer]) * scale
    return res


# --- run: diffusers, peft, LyCORIS ------------------------------------------------------------------

def _peft_deltas(root, adapter: str, component: str) -> dict[str, torch.Tensor]:
    from peft.tuners.lora import LoraLayer

    out = {}
    for name, mod in root.named_modules():
        if isinstance(mod, LoraLayer) and adapter in mod.lora_A:
            key = f"unet.{name}" if component == "unet" else f"text_encoder.{te_name(name)}"
            out[key] = mod.get_delta_weight(adapter).detach().float()
    return out


def pipeline(folder: Path):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)


def diffusers_lora(path: Path, pipe) -> Loaded:
    """pipe.load_lora_weights (a StableDiffusionPipeline of the model folder); delta W from peft's
    get_delta_weight; the LoRA is unloaded again."""
    pipe.load_lora_weights(str(path), adapter_name="peer")
    try:
        return Loaded(_peft_deltas(pipe.unet, "peer", "unet") | _peft_deltas(pipe.text_encoder, "peer", "text_encoder"))
    finally:
        pipe.unload_lora_weights()


def peft_lora(path: Path, model) -> Loaded:
    """peft on a diffusers-layout file: LoraConfig from its lora_adapter_metadata, inject_adapter_in_model,
    set_peft_model_state_dict (unexpected keys = not loaded)."""
    import json

    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = json.loads((f.metadata() or {})["lora_adapter_metadata"])
    sd, res = load_file(str(path)), Loaded()
    for comp, root in (("unet", model.unet), ("text_encoder", model.text_encoder)):
        cfg = {k[len(comp) + 1:]: v for k, v in meta.items() if k.startswith(comp + ".")}
        part = {k[len(comp) + 1:]: v for k, v in sd.items() if k.startswith(comp + ".")}
        if comp == "text_encoder" and not hasattr(root, "text_model"):
            part = {k.removeprefix("text_model."): v for k, v in part.items()}
        if not part:
            continue
        inject_adapter_in_model(LoraConfig(**cfg), root, adapter_name="peer")
        result = set_peft_model_state_dict(root, part, adapter_name="peer")
        res.not_loaded += [f"{comp}.{k}" for k in result.unexpected_keys]
        res.deltas |= _peft_deltas(root, "peer", comp)
    return res


def lycoris_lora(path: Path, model) -> Loaded:
    """lycoris.kohya.create_network_from_weights (kohya's --network_module lycoris.kohya): lora names from
    unet/text_encoder.named_modules(); each module's get_diff_weight(multiplier=1). The text encoder is
    handed over in transformers 4.x's module tree (a text_model level), as under kohya's pinned 4.54."""
    from lycoris import kohya as lk

    te = model.text_encoder
    if not hasattr(te, "text_model"):
        te = torch.nn.Module()
        te.text_model = model.text_encoder
    sd = load_file(str(path))
    # LyCORIS 4.1.3's LycorisNetworkKohya targets both the class TimestepEmbedding (for Anima) and the names
    # time_embedding.linear_1/2, which collide on a diffusers U-Net ("duplicated lora name") while it builds
    # the empty network; loading from weights maps names by named_modules() alone, so drop the class here.
    cls, saved = lk.LycorisNetworkKohya, lk.LycorisNetworkKohya.UNET_TARGET_REPLACE_MODULE
    cls.UNET_TARGET_REPLACE_MODULE = [c for c in saved if c != "TimestepEmbedding"]
    try:
        net, _ = lk.create_network_from_weights(1.0, str(path), None, te, model.unet, weights_sd=dict(sd))
    finally:
        cls.UNET_TARGET_REPLACE_MODULE = saved
    names = {f"lora_unet_{n}".replace(".", "_"): f"unet.{n}" for n, _ in model.unet.named_modules()}
    names |= {f"lora_te_{n}".replace(".", "_"): f"text_encoder.{n}" for n, _ in te.named_modules()}
    res = Loaded()
    for lora in net.unet_loras + net.text_encoder_loras:
        res.deltas[names[lora.lora_name]] = lora.get_diff_weight(multiplier=1)[0].detach().float()
    found = {lora.lora_name for lora in net.unet_loras + net.text_encoder_loras}
    res.not_loaded = [k for k in sd if k.split(".")[0] not in found]
    return res


# --- embeddings -------------------------------------------------------------------------------------

# modules/safe.py: RestrictedUnpickler.find_class and check_zip_filenames
A1111_GLOBALS = {("collections", "OrderedDict"), ("torch._utils", "_rebuild_tensor_v2"),
                 ("torch._utils", "_rebuild_parameter"), ("torch._utils", "_rebuild_device_tensor_from_numpy"),
                 ("torch.nn.modules.container", "ParameterDict"), ("numpy.core.multiarray", "scalar"),
                 ("numpy.core.multiarray", "_reconstruct"), ("numpy", "dtype"), ("numpy", "ndarray"),
                 ("_codecs", "encode"), ("__builtin__", "set")}
A1111_GLOBALS |= {("torch", n) for n in ("FloatStorage", "HalfStorage", "IntStorage", "LongStorage", "DoubleStorage",
                                         "ByteStorage", "float32", "BFloat16Storage")}
A1111_ZIP_NAMES = re.compile(r"^([^/]+)/((data/\d+)|version|(data\.pkl))$")


def a1111_safe_check(path: Path) -> list[str]:
    """What modules/safe.py check_pt rejects in a .pt (empty: accepted): zip entry names outside
    dir/version, dir/data.pkl, dir/data/N; not exactly one data.pkl; a global outside find_class's list."""
    with zipfile.ZipFile(path) as z:
        bad = [f"bad file inside: {n}" for n in z.namelist() if not A1111_ZIP_NAMES.match(n)]
        pkls = [n for n in z.namelist() if re.match(r"^([^/]+)/data\.pkl$", n)]
        if len(pkls) != 1:
            return bad + [f"{len(pkls)} data.pkl"]
        data = z.read(pkls[0])
    ops = list(pickletools.genops(data))
    for i, (op, arg, _) in enumerate(ops):
        if op.name == "GLOBAL":
            mod, name = arg.split(" ", 1)
        elif op.name == "STACK_GLOBAL":  # protocol 4: module and name are the two strings pushed before it
            mod, name = [a for o, a, _ in ops[:i] if o.name.endswith("UNICODE")][-2:]
        else:
            continue
        if (mod, name) not in A1111_GLOBALS:
            bad.append(f"global '{mod}/{name}' is forbidden")
    return bad


def a1111_embedding(path: Path) -> tuple[str, torch.Tensor]:
    """textual_inversion.py EmbeddingDatabase.load_from_file: name = the file name without extension
    (.pt/.bin: torch.load after safe.check_pt; .safetensors: load_file); create_embedding_from_data:
    string_to_param's one value (its _parameters for ParameterDict), else a dict of one tensor
    ("diffuser concepts", 1-D unsqueezed)."""
    if path.suffix == ".safetensors":
        data = load_file(str(path))
    else:
        assert not a1111_safe_check(path), a1111_safe_check(path)
        data = torch.load(path, map_location="cpu", weights_only=True)
    if "string_to_param" in data:
        params = getattr(data["string_to_param"], "_parameters", data["string_to_param"])
        assert len(params) == 1, "embedding file has multiple terms in it"
        emb = next(iter(params.values()))
    else:
        assert isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), torch.Tensor)
        emb = next(iter(data.values()))
        emb = emb.unsqueeze(0) if emb.ndim == 1 else emb
    return path.stem, emb.detach().float()


def kohya_embedding(path: Path) -> tuple[str, torch.Tensor]:
    """train_textual_inversion.py load_weights and gen_img.py: load_file / torch.load, string_to_param
    unwrapped (its _parameters for ParameterDict), emb = next(iter(values)); token = the file name."""
    data = load_file(str(path)) if path.suffix == ".safetensors" else torch.load(path, map_location="cpu", weights_only=True)
    if "string_to_param" in data:
        data = getattr(data["string_to_param"], "_parameters", data["string_to_param"])
    emb = next(iter(data.values()))
    return path.stem, (emb.unsqueeze(0) if emb.ndim == 1 else emb).detach().float()


def comfy_embedding(path: Path) -> tuple[str, torch.Tensor]:
    """comfy/sd1_clip.py load_embed ('embedding:NAME' in a prompt, NAME = the file name, extension
    optional): load_file, or torch.load(weights_only=True); string_to_param's first value, else
    embed['clip_l'] if present, else the first value."""
    data = load_file(str(path)) if path.suffix == ".safetensors" else torch.load(path, map_location="cpu", weights_only=True)
    if "string_to_param" in data:
        emb = next(iter(data["string_to_param"].values()))
    elif "clip_l" in data:
        emb = data["clip_l"]
    else:
        emb = next(iter(data.values()))
    return path.stem, emb.detach().float().reshape(-1, emb.shape[-1])


def diffusers_embedding(path: Path, pipe, token: str | None) -> tuple[str, torch.Tensor]:
    """pipe.load_textual_inversion(path, token): the rows it appends to the token embedding matrix (then
    unload_textual_inversion)."""
    before = len(pipe.tokenizer)
    pipe.load_textual_inversion(str(path), token=token)
    try:
        rows = pipe.text_encoder.get_input_embeddings().weight[before:len(pipe.tokenizer)].detach().float().clone()
        return pipe.tokenizer.convert_ids_to_tokens(before), rows
    finally:
        pipe.unload_textual_inversion()


def a1111_png(image, data: dict, text_chunk: bool):
    """An embedding picture as modules/textual_inversion/image_embedding.py writes it: JSON with tensors as
    {'TORCHTENSOR': lists}; text_chunk: base64 in a 'sd-ti-embedding' PNG chunk (textual_inversion.py
    train_embedding), else insert_image_data_embed: zlib'd JSON split into low/high nibbles, np.resize'd
    to (h, -1, 3) blocks, XORed with lcg() & 0x0F, pasted left and right of the picture 1 px apart. (The
    decorative dots style_block draws live in the high nibbles, which the reader masks off; here a
    constant 0x50 keeps every data pixel lit for crop_black.) Returns (PIL image, PngInfo or None)."""
    import base64
    import json
    import zlib

    import numpy as np
    from PIL import Image, PngImagePlugin

    from sdknobs.ti.pngs import lcg_nibbles

    def enc(o):
        return {"TORCHTENSOR": o.cpu().detach().numpy().tolist()} if isinstance(o, torch.Tensor) else o

    text = json.dumps(data, default=enc)
    if text_chunk:
        info = PngImagePlugin.PngInfo()
        info.add_text("sd-ti-embedding", base64.b64encode(text.encode()).decode())
        return image, info
    raw = np.frombuffer(zlib.compress(text.encode(), level=9), np.uint8)
    h, d = image.size[1], 3
    size = raw.shape[0] + (h - raw.shape[0] % h)
    size += h * d - size % (h * d)
    blocks = []
    for part in (raw & 0x0F, raw >> 4):
        b = np.resize(part, size).reshape(h, -1, d)
        blocks.append(((b ^ lcg_nibbles(b.size).reshape(b.shape)) | 0x50).astype(np.uint8))
    low, high = (Image.fromarray(b, "RGB") for b in blocks)
    out = Image.new("RGB", (image.size[0] + low.size[0] + high.size[0] + 2, h), (0, 0, 0))
    out.paste(low, (0, 0))
    out.paste(image, (low.size[0] + 1, 0))
    out.paste(high, (low.size[0] + 1 + image.size[0] + 1, 0))
    return out, None
