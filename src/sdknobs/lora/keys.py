"""Which model a LoRA file is for, and which of its layer names an SD1.x/SD2.x or SDXL model has.

Architecture: a file says it in its metadata (kohya's `ss_base_model_version`, ModelSpec's
`modelspec.architecture`) and in its key names (SDXL: a second text encoder `lora_te2_` /
`text_encoder_2.`, kohya's SGM U-Net names `lora_unet_input_blocks_...`, more than one transformer block per
attention, `add_embedding`; SD1.x/SD2.x: kohya's one-encoder `lora_te_`, attention in the first down block,
a fourth up block). `detect_architecture` returns the first family whose signs are present, with the
evidence; `model_architecture` names a loaded model's, and `check_architecture` refuses a file of the
other one naming both.

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
# SDXL's U-Net: several transformer blocks per attention, and the added-conditioning MLP (add_embedding)
UNET_MODULE_XL = re.compile(UNET_MODULE.pattern.replace(r"transformer_blocks\.0\.", r"transformer_blocks\.\d+\.")
                            .replace("|time_embedding", r"|add_embedding\.linear_[12]|time_embedding"))


def kohya_pattern(dotted: re.Pattern) -> re.Pattern:
    """The same grammar over kohya names (dots written as underscores)."""
    return re.compile(dotted.pattern.replace(r"\.", "_"))


KOHYA_UNET = re.compile("^lora_unet_" + kohya_pattern(UNET_MODULE).pattern[1:])
KOHYA_TE = re.compile(r"^lora_te[12]?_text_model_encoder_layers_\d+_(?:self_attn_(?:q|k|v|out)_proj|mlp_fc[12])$")
# kohya's SDXL U-Net names: the original (SGM) module paths of sdxl_original_unet.py, dots as underscores
_SGM_RES = r"(?:in_layers_2|out_layers_3|emb_layers_1|skip_connection)"
_SGM_ATTN = r"(?:proj_in|proj_out|transformer_blocks_\d+_(?:attn[12]_(?:to_q|to_k|to_v|to_out_0)|ff_net_(?:0_proj|2)))"
KOHYA_UNET_SGM = re.compile(
    rf"^lora_unet_(?:(?:input_blocks_\d+|output_blocks_\d+)_(?:0_{_SGM_RES}|\d+_{_SGM_ATTN}|0_op|\d+_conv)"
    rf"|middle_block_[02]_{_SGM_RES}|middle_block_1_{_SGM_ATTN}|input_blocks_0_0|out_2|time_embed_[02]|label_emb_0_[02])$")
SGM_SIGN = re.compile(r"^lora_unet_(?:input_blocks|middle_block|output_blocks|time_embed|label_emb|out_2)")


@dataclass(frozen=True)
class Family:
    name: str
    supported: bool
    metadata: tuple[str, ...] = ()  # prefixes of ss_base_model_version / modelspec.architecture
    key_signs: tuple[str, ...] = ()  # regexes over key names


FAMILIES = (
    Family("SDXL", True, ("sdxl", "stable-diffusion-xl"),
           (r"^lora_te2_", r"^text_encoder_2\.", SGM_SIGN.pattern, r"transformer_blocks[._][1-9]", r"add_embedding",
            r"label_emb")),
    Family("SD3/Flux (a DiT, not a U-Net)", False, ("stable-diffusion-3", "flux"),
           (r"^lora_transformer_", r"double_blocks", r"single_blocks", r"joint_blocks", r"^transformer\.")),
    Family("SD1.x/SD2.x", True, ("sd_v1", "sd_v2", "stable-diffusion-v1", "stable-diffusion-v2"),
           (r"^lora_te_", r"down_blocks[._]0[._]attentions", r"up_blocks[._]3[._]")),
)
SUPPORTED = " and ".join(f.name for f in FAMILIES if f.supported)
DEFAULT_EVIDENCE = "no family's sign"


def detect_architecture(keys, metadata: dict) -> tuple[Family, str]:
    """(family, evidence) for a LoRA file's keys and metadata: the first family whose metadata or key signs are
    present (metadata first); SD1.x/SD2.x with evidence DEFAULT_EVIDENCE when nothing says."""
    said = {k: str(metadata.get(k, "")).lower() for k in ("ss_base_model_version", "modelspec.architecture")}
    for fam in FAMILIES:
        for field, value in said.items():
            if value and value.startswith(fam.metadata):
                return fam, f"metadata {field} = {metadata[field]!r}"
    for fam in FAMILIES:
        for sign in fam.key_signs:
            hit = next((k for k in keys if re.search(sign, k)), None)
            if hit is not None:
                return fam, f"key {hit!r}"
    return FAMILIES[-1], DEFAULT_EVIDENCE


def model_architecture(model) -> Family:
    """The architecture family of a loaded model: SDXL for one with a second text encoder, else SD1.x/SD2.x
    (the embedded shapes model and tiny test models included)."""
    xl = getattr(model, "text_encoder_2", None) is not None or str(getattr(model, "family", "")).lower() == "sdxl"
    return FAMILIES[0] if xl else FAMILIES[-1]


def check_architecture(what: str, family: Family, evidence: str, model) -> None:
    """SdknobsError when a file of `family` (by `evidence`) is used with a model of the other architecture; a
    file with no sign either way is left to the layer-by-layer shape check."""
    from sdknobs.errors import SdknobsError

    mine = model_architecture(model)
    if family is mine or evidence == DEFAULT_EVIDENCE:
        return
    raise SdknobsError(f"{what} is a LoRA for {family.name} ({evidence}); the model {model.source or ''!r} is an "
                       f"{mine.name}-architecture model (family {model.family}), whose layers have other names and "
                       f"shapes; use it with an {family.name} model")


def component_of_module(path: str) -> str | None:
    """'unet' or 'text_encoder' for a dotted module path of the grammar (CLIP's with or without the
    text_model. level that transformers 5 drops), None when it is neither."""
    if UNET_MODULE.match(path) or UNET_MODULE_XL.match(path):
        return "unet"
    if TE_MODULE.match(path):
        return "text_encoder"
    return None


# --- kohya's SDXL U-Net names (SGM, the original layout) <-> diffusers' ------------------------------------
# diffusers reads them with `_maybe_map_sgm_blocks_to_diffusers` + `_convert_non_diffusers_lora_to_diffusers`
# (what SDXL's load_lora_weights runs); `sgm_name` is the way back, for writing kohya's files, checked by those
# two on every name written (tests/interop).

@dataclass(frozen=True)
class UnetLayout:
    """What the SGM numbering depends on: resnets per block and which up blocks have attentions."""
    layers_per_block: int = 2  # SDXL's (base and every fine-tune)
    up_attention: tuple[bool, ...] = (True, True, False)  # SDXL's up_blocks: CrossAttn, CrossAttn, UpBlock2D

    @classmethod
    def of(cls, config) -> "UnetLayout":
        get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
        lpb = get("layers_per_block", 2)
        lpb = lpb[0] if isinstance(lpb, (list, tuple)) else lpb
        return cls(int(lpb), tuple("CrossAttn" in t for t in get("up_block_types", ()) or ()))


_RES_SGM = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
            "conv_shortcut": "skip_connection"}
_FIXED_SGM = {"conv_in": "input_blocks.0.0", "conv_out": "out.2", "time_embedding.linear_1": "time_embed.0",
              "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
              "add_embedding.linear_2": "label_emb.0.2"}


def sgm_name(path: str, layout: UnetLayout = UnetLayout()) -> str | None:
    """kohya's SDXL name (lora_unet_ + SGM path with _) of a diffusers U-Net module path; None if it has none."""
    n = layout.layers_per_block
    if path in _FIXED_SGM:
        return "lora_unet_" + _FIXED_SGM[path].replace(".", "_")
    m = re.fullmatch(r"(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", path)
    if m:
        kind, b, sub, j, rest = m[1], int(m[2]), m[3], int(m[4]), m[5]
        index = 1 + b * (n + 1) + j if kind == "down_blocks" else b * (n + 1) + j
        head = f"{'input_blocks' if kind == 'down_blocks' else 'output_blocks'}.{index}.{0 if sub == 'resnets' else 1}"
    elif (m := re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", path)):
        sub, j, rest = m[1], int(m[2]), m[3]
        head = f"middle_block.{1 if sub == 'attentions' else 2 * j}"
    elif (m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv", path)):
        return f"lora_unet_input_blocks_{(int(m[1]) + 1) * (n + 1)}_0_op"
    elif (m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv", path)):
        b = int(m[1])
        attn = layout.up_attention[b] if b < len(layout.up_attention) else True
        return f"lora_unet_output_blocks_{b * (n + 1) + n}_{2 if attn else 1}_conv"
    else:
        return None
    if sub == "resnets":
        if rest not in _RES_SGM:
            return None
        rest = _RES_SGM[rest]
    return "lora_unet_" + f"{head}.{rest}".replace(".", "_")
