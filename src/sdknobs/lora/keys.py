"""Which model a LoRA file is for, and which of its layer names an SD1.x/SD2.x model has.

Architecture: a file says it in its metadata (kohya's `ss_base_model_version`, ModelSpec's
`modelspec.architecture`) and in its key names (SDXL: a second text encoder `lora_te2_` /
`text_encoder_2.`, more than one transformer block per attention, `add_embedding`). `detect_architecture` returns the first family whose signs are present, with the
evidence; `FAMILIES` says which families this tool loads, so SDXL support plugs in by marking it
supported and giving it its own grammar.

Grammar: the module paths (diffusers names, dotted) a LoRA may target in an SD1.x/SD2.x U-Net or CLIP
text encoder. A key outside it is an error naming it: diffusers' key converters would otherwise invent
a module path from an unknown kohya name, or fail with a traceback.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

_BLOCK = r"(?:down_blocks\.\d+|up_blocks\.\d+|mid_block)"
UNET_MODULE = re.compile(
    rf"^(?:{_BLOCK}\.(?:attentions\.\d+\.(?:proj_in|proj_out|transformer_blocks\.0\.(?:attn[12]\.(?:to_q|to_k|to_v|to_out\.0)"
    rf"|ff\.net\.(?:0\.proj|2)))|resnets\.\d+\.(?:conv1|conv2|conv_shortcut|time_emb_proj)"
    rf"|downsamplers\.0\.conv|upsamplers\.0\.conv)|conv_in|conv_out|time_embedding\.linear_[12])$")
TE_MODULE = re.compile(r"^(?:text_model\.)?encoder\.layers\.\d+\.(?:self_attn\.(?:q|k|v|out)_proj|mlp\.fc[12])$")


def kohya_pattern(dotted: re.Pattern) -> re.Pattern:
    """The same grammar over kohya names (dots written as underscores)."""
    return re.compile(dotted.pattern.replace(r"\.", "_"))


KOHYA_UNET = re.compile("^lora_unet_" + kohya_pattern(UNET_MODULE).pattern[1:])
KOHYA_TE = re.compile(r"^lora_te1?_text_model_encoder_layers_\d+_(?:self_attn_(?:q|k|v|out)_proj|mlp_fc[12])$")


@dataclass(frozen=True)
class Family:
    name: str
    supported: bool
    metadata: tuple[str, ...] = ()  # prefixes of ss_base_model_version / modelspec.architecture
    key_signs: tuple[str, ...] = ()  # regexes over key names


FAMILIES = (
    Family("SDXL", False, ("sdxl", "stable-diffusion-xl"),
           (r"^lora_te2_", r"^text_encoder_2\.", r"transformer_blocks[._][1-9]", r"add_embedding", r"label_emb")),
    Family("SD3/Flux (a DiT, not a U-Net)", False, ("stable-diffusion-3", "flux"),
           (r"^lora_transformer_", r"double_blocks", r"single_blocks", r"joint_blocks", r"^transformer\.")),
    Family("SD1.x/SD2.x", True, ("sd_v1", "sd_v2", "stable-diffusion-v1", "stable-diffusion-v2"), ()),
)
SUPPORTED = ", ".join(f.name for f in FAMILIES if f.supported)


def detect_architecture(keys, metadata: dict) -> tuple[Family, str]:
    """(family, evidence) for a LoRA file's keys and metadata; SD1.x/SD2.x when nothing says otherwise."""
    said = {k: str(metadata.get(k, "")).lower() for k in ("ss_base_model_version", "modelspec.architecture")}
    for fam in (f for f in FAMILIES if not f.supported):
        for field, value in said.items():
            if value and value.startswith(fam.metadata):
                return fam, f"metadata {field} = {metadata[field]!r}"
        for sign in fam.key_signs:
            hit = next((k for k in keys if re.search(sign, k)), None)
            if hit is not None:
                return fam, f"key {hit!r}"
    return next(f for f in FAMILIES if f.supported), "no other family's sign"


def component_of_module(path: str) -> str | None:
    """'unet' or 'text_encoder' for a dotted module path of the grammar (CLIP's with or without the
    text_model. level that transformers 5 drops), None when it is neither."""
    if UNET_MODULE.match(path):
        return "unet"
    if TE_MODULE.match(path):
        return "text_encoder"
    return None
