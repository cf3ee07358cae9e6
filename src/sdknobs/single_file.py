"""Single-file Stable Diffusion checkpoints in the original CompVis/LDM layout (what A1111 and ComfyUI
load): one .safetensors (or .ckpt) holding three prefixed state dicts,

    model.diffusion_model.*  U-Net (ldm openaimodel.UNetModel: input_blocks / middle_block / output_blocks)
    first_stage_model.*      VAE   (ldm AutoencoderKL: encoder.down.N.block.M, decoder.up.N..., mid.attn_1)
    cond_stage_model.*       text encoder, SD1.x: transformer.text_model.* (HF CLIP ViT-L/14, width 768)
                                           SD2.x: model.*  (OpenCLIP ViT-H/14 text tower, width 1024)

SDXL (Stability's SGM layout) has the same U-Net and VAE prefixes and two text encoders instead:

    conditioner.embedders.0.transformer.text_model.*  CLIP ViT-L/14 (width 768), HF names
    conditioner.embedders.1.model.*                   OpenCLIP ViT-bigG/14 (width 1280) with text_projection

Loading builds empty components from configs shipped in assets/configs (or a local diffusers folder,
`config=`), so nothing is downloaded, and converts with diffusers' own LDM->diffusers converters.
Nothing is dropped silently: every weight the built model needs must be in the file with the right
shape, and every key in the file must be one of those weights, a known non-weight (training state,
EMA copy) or SD2's known-unused last text layer. Saving is the reverse mapping, written here (diffusers
ships it only as scripts/convert_diffusers_to_original_stable_diffusion.py); loading uses the same
mapping to list the keys a file must hold, so errors name keys as the file names them.
"""
from __future__ import annotations

import json
import logging
import pickle
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from sdknobs.atomic import save_safetensors
from sdknobs.errors import SdknobsError
from sdknobs.families import SDXL
from sdknobs.model import ASSETS, Model

log = logging.getLogger(__name__)

CONFIGS = ASSETS / "configs"
UNET, VAE, TEXT = "model.diffusion_model.", "first_stage_model.", "cond_stage_model."
CLIP, OPEN_CLIP = TEXT + "transformer.", TEXT + "model."  # SD1.x / SD2.x text encoder prefixes
CLIP_EMB = CLIP + "text_model.embeddings.token_embedding.weight"  # (49408, 768)
OPEN_CLIP_EMB = OPEN_CLIP + "token_embedding.weight"  # (49408, 1024)
CONTEXT_KEY = UNET + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"  # (320, text width)
FAMILIES = {("clip", 768): "SD1.x", ("open_clip", 1024): "SD2.x"}
XL_CLIP, XL_OPEN_CLIP = SDXL.ldm_text_prefixes  # SDXL's two encoders: conditioner.embedders.0.transformer. / .1.model.
XL_CLIP_EMB = XL_CLIP + "text_model.embeddings.token_embedding.weight"  # (49408, 768)
XL_OPEN_CLIP_EMB = XL_OPEN_CLIP + "token_embedding.weight"  # (49408, 1280)
XL_TEXT = "conditioner.embedders."
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")

# Non-weights an LDM training checkpoint carries: LatentDiffusion's DDPM schedule buffers, the EMA copy
# (model_ema.*; like diffusers we load the plain weights), CLIP's position_ids buffer, OpenCLIP's logit
# scale / attention mask and ComfyUI's v_pred/ztsnr markers. Listed in Model.extra["ignored_keys"].
_NON_WEIGHTS = re.compile(
    r"^(model_ema\.|(betas|alphas_cumprod(_prev)?|sqrt_(one_minus_)?alphas_cumprod|log_one_minus_alphas_cumprod"
    r"|sqrt_recip(m1)?_alphas_cumprod|posterior_(variance|log_variance_clipped|mean_coef[12])|logvar|v_pred|ztsnr)$"
    r"|(cond_stage_model|conditioner\.embedders\.[01])\.(transformer\.text_model\.embeddings\.position_ids"
    r"|model\.(logit_scale|attn_mask))$)"
)

# diffusers -> LDM renames inside one U-Net resnet, VAE attention block and OpenCLIP layer.
_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
           "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
_VAE_ATTN = {"group_norm.": "norm.", "to_q.": "q.", "to_k.": "k.", "to_v.": "v.", "to_out.0.": "proj_out."}
_OPEN_CLIP_LAYER = {"self_attn.": "attn.", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
                    "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
_OPEN_CLIP_TOP = {"embeddings.token_embedding.weight": "token_embedding.weight",
                  "embeddings.position_embedding.weight": "positional_embedding",
                  "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias"}
_BLOCK = re.compile(r"(?:(encoder|decoder)\.)?(down_blocks|up_blocks|mid_block)\.(?:(\d+)\.)?"
                    r"(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)")


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _short(keys: list, n: int = 4) -> str:
    return ", ".join(map(str, keys[:n])) + (f", ... ({len(keys)} in all)" if len(keys) > n else "")


# ---------------------------------------------------------------------------------------------- reading
def _read(path: Path):
    """(get tensor by key, {key: shape}, metadata, global_step) of a checkpoint file. For .safetensors the
    shapes come from the header and each tensor is read when asked for, so checks come before reading."""
    from safetensors import safe_open

    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        try:
            f = safe_open(str(path), framework="pt")
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        except Exception as e:
            raise SdknobsError(f"{path}: not a readable .safetensors file ({_first_line(e)})") from e
        return f.get_tensor, shapes, f.metadata() or {}, None
    if suffix not in (".ckpt", ".pt", ".pth"):
        raise SdknobsError(f"{path}: unknown checkpoint type {suffix!r}; expected .safetensors, .ckpt, .pt or .pth")
    try:  # weights_only: tensors and plain containers only; a pickle can otherwise run any code
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        why = re.search(r"WeightsUnpickler error:\s*(.+)", str(e))
        why = why[1].split(" was not an allowed")[0] if why else _first_line(e)
        raise SdknobsError(
            f"{path}: refusing to load this pickle checkpoint: it is not readable with weights-only "
            f"unpickling ({why}), so it needs arbitrary unpickling, which can run code from the file (or it "
            f"is not a PyTorch checkpoint). Convert it to .safetensors with a tool you trust, or get a "
            f".safetensors release, and load that instead"
        ) from e
    except Exception as e:
        raise SdknobsError(f"{path}: could not read the checkpoint ({_first_line(e)})") from e
    step = obj.get("global_step") if isinstance(obj, dict) else None
    sd = obj.get("state_dict", obj) if isinstance(obj, dict) else obj  # Lightning wraps it in "state_dict"
    if not isinstance(sd, dict):
        raise SdknobsError(f"{path}: holds a {type(sd).__name__}, not a state dict of tensors")
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise SdknobsError(f"{path}: entry {bad[0]!r} is a {type(sd[bad[0]]).__name__}, not a tensor")
    return sd.__getitem__, {k: tuple(v.shape) for k, v in sd.items()}, {}, None if step is None else int(step)


# -------------------------------------------------------------------------------------------- detecting
def _text_layout(label: str, shapes: Mapping) -> str:
    """"clip" (SD1.x), "open_clip" (SD2.x) or "sdxl" (SGM's two embedders); SdknobsError if the file is not an
    SD1/SD2/SDXL checkpoint in the original layout."""
    keys = list(shapes)
    xl = any(k.startswith(XL_TEXT) for k in keys)
    absent = [p for p in (UNET, VAE, XL_TEXT if xl else TEXT) if not any(k.startswith(p) for k in keys)]
    if absent:
        hint = ""
        if xl:
            hint = " It looks like an SDXL checkpoint (conditioner.embedders.*) with parts missing."
        elif any(k.startswith(("down_blocks.", "encoder.", "text_model.", "unet.")) for k in keys):
            hint = " It looks like a diffusers component; load the whole diffusers folder instead."
        raise SdknobsError(
            f"{label}: not a Stable Diffusion 1.x/2.x/SDXL checkpoint in the original layout: no keys under "
            f"{', '.join(absent)} (its keys start {_short(keys, 3) or 'nowhere: it is empty'}).{hint}"
        )
    if xl:
        if not any(k.startswith(XL_OPEN_CLIP) for k in keys) and any(k.startswith("conditioner.embedders.0.model.")
                                                                     for k in keys):
            raise SdknobsError(f"{label}: an SDXL refiner (one OpenCLIP embedder, conditioner.embedders.0.model.*); "
                               f"sdknobs loads SDXL base models, not refiners")
        missing = [p for p in (XL_CLIP, XL_OPEN_CLIP) if not any(k.startswith(p) for k in keys)]
        if missing:
            raise SdknobsError(f"{label}: an SDXL checkpoint needs both text encoders; no keys under {', '.join(missing)}")
        return "sdxl"
    for layout, emb in (("clip", CLIP_EMB), ("open_clip", OPEN_CLIP_EMB)):
        if emb in shapes:
            return layout
    for layout, prefix in (("clip", CLIP), ("open_clip", OPEN_CLIP)):  # no token embedding: go by prefix
        if any(k.startswith(prefix) for k in keys):
            return layout
    raise SdknobsError(f"{label}: unknown text encoder layout: expected keys under {CLIP} (SD1.x) or "
                       f"{OPEN_CLIP} (SD2.x), found {_short([k for k in keys if k.startswith(TEXT)], 3)}")


XL_CONTEXT_KEY = UNET + "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"  # (640, 768 + 1280)


def detect_family(shapes: Mapping, label: str = "checkpoint") -> str:
    """"SD1.x", "SD2.x" or "sdxl" from key names and shapes (the markers diffusers' infer_diffusers_model_type
    uses)."""
    layout = _text_layout(label, shapes)
    conv_in = shapes.get(UNET + "input_blocks.0.0.weight")
    if conv_in is not None and len(conv_in) == 4 and conv_in[1] != 4:
        raise SdknobsError(f"{label}: the U-Net takes {conv_in[1]} input channels ({UNET}input_blocks.0.0.weight "
                           f"{conv_in}); only text-to-image checkpoints (4) are supported, not inpainting or pix2pix")
    if layout == "sdxl":
        widths = (shapes.get(XL_CLIP_EMB, (None, None))[-1], shapes.get(XL_OPEN_CLIP_EMB, (None, None))[-1])
        context = shapes.get(XL_CONTEXT_KEY, (None,))[-1]
        if widths != (768, 1280) or context != 2048:
            raise SdknobsError(
                f"{label}: not a standard SDXL base checkpoint (CLIP 768 + OpenCLIP 1280 = cross-attention 2048): "
                f"{XL_CLIP_EMB} has shape {shapes.get(XL_CLIP_EMB)}, {XL_OPEN_CLIP_EMB} {shapes.get(XL_OPEN_CLIP_EMB)} "
                f"and {XL_CONTEXT_KEY} {shapes.get(XL_CONTEXT_KEY)}; pass config= (CLI: --model-config) a local "
                f"diffusers SDXL folder describing its architecture")
        return "sdxl"
    emb = CLIP_EMB if layout == "clip" else OPEN_CLIP_EMB
    width, context = shapes.get(emb, (None, None))[-1], shapes.get(CONTEXT_KEY, (None,))[-1]
    family = FAMILIES.get((layout, width))
    if family is None or context != width:
        raise SdknobsError(
            f"{label}: not a standard SD1.x (CLIP, width 768) or SD2.x (OpenCLIP, width 1024) checkpoint: "
            f"{emb} has shape {shapes.get(emb)} and {CONTEXT_KEY} {shapes.get(CONTEXT_KEY)}; pass config= (CLI: --model-config) a "
            f"local diffusers folder describing its architecture"
        )
    return family


def _prediction_type(family, override, get, shapes, metadata, step) -> tuple[str | None, str]:
    """(prediction type, why), or (None, "") to use the config's, or (None, TEST_RUN) for an SD2.x file that says
    nothing: then the loaded U-Net is run once (`_v_test`, AUTOMATIC1111's rule). Order: argument, file metadata or
    marker, then for SD2.x diffusers' rule (global_step 875000 is the 512-px epsilon base, others the 768-px v
    model), then the test run. (ComfyUI's rule, the spread of one norm bias, read a v-prediction fine-tune as
    epsilon: a test of what the weights do is what A1111 relies on.)"""
    if override is not None:
        if override not in PREDICTION_TYPES:
            raise SdknobsError(f"prediction_type {override!r} is not one of {', '.join(PREDICTION_TYPES)}")
        return override, "argument"
    names = {"epsilon": "epsilon", "eps": "epsilon", "v": "v_prediction", "v_prediction": "v_prediction"}
    for key in ("prediction_type", "modelspec.prediction_type"):  # ours (save_single_file), Stability's ModelSpec
        if metadata.get(key) in names:
            return names[metadata[key]], f"file metadata {key}"
    if "v_pred" in shapes:
        return "v_prediction", "v_pred marker key (ComfyUI)"
    if family != "SD2.x":
        return None, ""
    if step is not None:
        return ("epsilon" if step == 875000 else "v_prediction"), f"global_step {step} (diffusers' rule)"
    return None, TEST_RUN


TEST_RUN = "test run"


@torch.no_grad()
def _v_test(unet) -> float:
    """AUTOMATIC1111's v-parameterization test (modules/sd_models_config.py, is_using_v_parameterization_for_sd2):
    the U-Net at t=999 on a constant 0.5 latent and a constant 0.5 context. At t=999 the input is almost pure
    noise, so an epsilon model returns about its input (mean(out - x) near 0) while a v model returns about
    -x_0 - ... (mean(out - x) below -1). Returns mean(out - x); v-prediction when < -1."""
    p = next(unet.parameters())
    x = torch.full((1, unet.config.in_channels, 8, 8), 0.5, dtype=p.dtype, device=p.device)
    ctx = torch.full((1, 2, unet.config.cross_attention_dim), 0.5, dtype=p.dtype, device=p.device)
    t = torch.tensor([999], device=p.device)
    return float((unet(x, t, encoder_hidden_states=ctx, return_dict=False)[0] - x).float().mean())


# ---------------------------------------------------------------------------- diffusers -> LDM mapping
def _unet_key(k: str, layers: int, up_attn: set[int]) -> str:
    """UNet2DConditionModel key -> openaimodel key. input_blocks.0 is conv_in, then per down block
    `layers` x (resnet [+ attention]) and a downsampler; output_blocks hold layers+1 per up block, the
    last one also the upsampler; middle_block is resnet, attention, resnet."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    top = {**DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"],  # conv_in, time embedding, conv_out
           **DIFFUSERS_TO_LDM_MAPPING["unet"]["addition_embed_type"]}  # SDXL's add_embedding = label_emb
    if k in top:
        return top[k]
    m = _BLOCK.fullmatch(k)
    if not m or m[1]:
        raise SdknobsError(f"U-Net weight {k!r} has no place in the LDM layout")
    _, block, i, part, j, rest = m.groups()
    i, j, n = int(i or 0), int(j), layers + 1
    if part == "resnets":
        name, _, tail = rest.partition(".")
        rest = f"{_RESNET.get(name, name)}.{tail}"
    sub = 0 if part == "resnets" else 1
    if block == "mid_block":
        return f"middle_block.{2 * j if part == 'resnets' else 1}.{rest}"
    if block == "down_blocks":
        if part == "downsamplers":
            return f"input_blocks.{n * (i + 1)}.0.op.{rest.removeprefix('conv.')}"
        return f"input_blocks.{n * i + j + 1}.{sub}.{rest}"
    if part == "upsamplers":
        return f"output_blocks.{n * i + layers}.{2 if i in up_attn else 1}.{rest}"
    return f"output_blocks.{n * i + j}.{sub}.{rest}"


def _vae_key(k: str, n_up: int) -> str:
    """AutoencoderKL key -> LDM key; LDM numbers decoder up blocks in reverse."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    top = DIFFUSERS_TO_LDM_MAPPING["vae"]  # conv_in/out, norm_out, (post_)quant_conv
    if k in top:
        return top[k]
    m = _BLOCK.fullmatch(k)
    if not m or not m[1]:
        raise SdknobsError(f"VAE weight {k!r} has no place in the LDM layout")
    side, block, i, part, j, rest = m.groups()
    i, j, rest = int(i or 0), int(j), rest.replace("conv_shortcut", "nin_shortcut")
    if part == "attentions":
        for a, b in _VAE_ATTN.items():
            rest = b + rest[len(a):] if rest.startswith(a) else rest
        return f"{side}.mid.attn_1.{rest}"
    if block == "mid_block":
        return f"{side}.mid.block_{j + 1}.{rest}"
    if block == "down_blocks":
        return f"{side}.down.{i}." + ("downsample." if part == "downsamplers" else f"block.{j}.") + rest
    return f"{side}.up.{n_up - 1 - i}." + ("upsample." if part == "upsamplers" else f"block.{j}.") + rest


def _text_ldm(sd: dict, layout: str, prefix: str | None = None) -> dict:
    """One text encoder's weights in the LDM layout: "clip" (HF names under `prefix`, default SD1.x's) or
    "open_clip" (OpenCLIP names; SDXL's second encoder adds text_projection, stored as x @ P, i.e. transposed)."""
    sd = {k.removeprefix("text_model."): v for k, v in sd.items()}  # transformers < 5.6 nests text_model.
    if layout == "clip":  # SD1.x's FrozenCLIPEmbedder wraps HF CLIPTextModel: its names, prefixed
        return {f"{prefix or CLIP}text_model.{k}": v for k, v in sd.items()}
    oc = prefix or OPEN_CLIP  # the prefix this encoder's keys take
    out, qkv = {}, {}
    for k, v in sd.items():
        m = re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)", k)
        if k == "text_projection.weight":
            out[oc + "text_projection"] = v.T.contiguous()
        elif k in _OPEN_CLIP_TOP:
            out[oc + _OPEN_CLIP_TOP[k]] = v
        elif not m:
            raise SdknobsError(f"text encoder weight {k!r} has no place in the OpenCLIP layout")
        elif p := re.fullmatch(r"self_attn\.([qkv])_proj\.(weight|bias)", m[2]):
            qkv.setdefault((m[1], p[2]), {})[p[1]] = v  # nn.MultiheadAttention packs q, k, v in in_proj
        else:
            rest = m[2]
            for a, b in _OPEN_CLIP_LAYER.items():
                rest = rest.replace(a, b)
            out[f"{oc}transformer.resblocks.{m[1]}.{rest}"] = v
    for (i, kind), d in qkv.items():
        out[f"{oc}transformer.resblocks.{i}.attn.in_proj_{kind}"] = torch.cat([d["q"], d["k"], d["v"]])
    return out


def ldm_state_dict(text_encoder, unet, vae, text_layout: str = "clip", text_encoder_2=None) -> dict[str, torch.Tensor]:
    """The components as one LDM-layout state dict (works on meta tensors too); text_layout "sdxl" takes both
    text encoders (SGM's conditioner.embedders.0 / .1)."""
    usd = unet.state_dict()
    up_attn = {int(k.split(".")[1]) for k in usd if k.startswith("up_blocks.") and ".attentions." in k}
    out = {UNET + _unet_key(k, unet.config.layers_per_block, up_attn): v for k, v in usd.items()}
    for k, v in vae.state_dict().items():
        key = _vae_key(k, len(vae.config.up_block_types))
        if re.search(r"mid\.attn_1\.(q|k|v|proj_out)\.weight$", key) and v.ndim == 2:
            v = v[:, :, None, None]  # LDM's AttnBlock uses 1x1 convs where diffusers uses Linear
        out[VAE + key] = v
    if text_layout == "sdxl":
        if text_encoder_2 is None:
            raise SdknobsError("the SDXL layout needs both text encoders")
        out.update(_text_ldm(text_encoder.state_dict(), "clip", XL_CLIP))
        out.update(_text_ldm(text_encoder_2.state_dict(), "open_clip", XL_OPEN_CLIP))
    else:
        out.update(_text_ldm(text_encoder.state_dict(), text_layout))
    return out


# ------------------------------------------------------------------------------------------- loading
def _build(folder: Path):
    """Empty (meta) text encoder, U-Net and VAE from a diffusers folder's configs, plus tokenizer and
    scheduler config. Shipped folders carry no vocab: they reuse assets/clip_tokenizer."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    def tokenizer(tok):
        if (tok / "vocab.json").exists() or (tok / "tokenizer.json").exists():
            return CLIPTokenizer.from_pretrained(tok, **local)
        cfg, vocab = json.loads((tok / "tokenizer_config.json").read_text()), ASSETS / "clip_tokenizer"
        return CLIPTokenizer(str(vocab / "vocab.json"), str(vocab / "merges.txt"),
                             pad_token=cfg["pad_token"], model_max_length=cfg["model_max_length"])

    try:
        sched = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
        local = {"local_files_only": True}
        with init_empty_weights():
            unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet", **local))
            vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae", **local))
            text = CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder", **local))
            text_2 = (CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(folder / "text_encoder_2", **local))
                      if (folder / "text_encoder_2").is_dir() else None)
        tokenizers = (tokenizer(folder / "tokenizer"), tokenizer(folder / "tokenizer_2") if text_2 is not None else None)
    except (OSError, ValueError, KeyError) as e:
        raise SdknobsError(f"config folder {folder}: could not read its component configs ({_first_line(e)})") from e
    if text_2 is None:
        return tokenizers[0], text, unet, vae, sched
    return tokenizers, (text, text_2), unet, vae, sched


def _check(label: str, what: str, have: Mapping, want: Mapping, hint: str) -> None:
    """SdknobsError listing missing keys, unexpected keys and shape mismatches of `have` against `want`."""
    missing = [k for k in want if k not in have]
    unexpected = [k for k in have if k not in want]
    wrong = [f"{k} is {tuple(have[k])} in the file, expected {tuple(want[k])}"
             for k in want if k in have and tuple(have[k]) != tuple(want[k])]
    problems = [f"{len(x)} {name}: {_short(x)}" for name, x in
                (("missing key(s)", missing), ("unexpected key(s)", unexpected), ("shape mismatch(es)", wrong)) if x]
    if problems:
        raise SdknobsError(f"{label}: does not match {what}: {'; '.join(problems)}. Nothing was loaded. {hint}")


def _load_into(label: str, module: torch.nn.Module, converted: dict, dtype: torch.dtype) -> None:
    want = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in converted.items() if v is not None}
    _check(label, f"the {type(module).__name__} that diffusers' converter fills", have, want,
           "This is a mapping bug in sdknobs.single_file; please report it.")
    module.load_state_dict({k: v.to(dtype).contiguous() if v.is_floating_point() else v
                            for k, v in converted.items()}, strict=True, assign=True)


def load_single_file(path, dtype=torch.float32, config: str | Path | None = None,
                     prediction_type: str | None = None) -> Model:
    """Load an original-layout SD1.x/SD2.x checkpoint (.safetensors, or a weights-only .ckpt/.pt).

    The family comes from the keys unless `config` (a local diffusers folder whose component configs
    describe the architecture) is given; then the family is "custom"."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise SdknobsError(f"{path}: no such checkpoint file")
    get, shapes, metadata, step = _read(path)
    return _assemble(str(path), get, shapes, metadata, step, dtype, config, prediction_type)


def _assemble(label, get, shapes, metadata, step, dtype, config, prediction_type) -> Model:
    from diffusers.loaders import single_file_utils as sfu

    layout = _text_layout(label, shapes)
    # with config= the architecture is the user's ("custom"), but SDXL's two encoders are in the key layout
    family = ("sdxl" if layout == "sdxl" else "custom") if config is not None else detect_family(shapes, label)
    pred, why = _prediction_type(family, prediction_type, get, shapes, metadata, step)
    if config is not None:
        folder = Path(config).expanduser()
        if not (folder / "unet").is_dir():
            raise SdknobsError(f"config={str(config)!r}: not a diffusers folder (expected {folder / 'unet'})")
        if (layout == "sdxl") != (folder / "text_encoder_2").is_dir():
            raise SdknobsError(f"config={str(config)!r}: {'an SDXL' if layout == 'sdxl' else 'a one-text-encoder'} "
                               f"checkpoint needs a config folder {'with' if layout == 'sdxl' else 'without'} "
                               f"text_encoder_2/")
    else:
        folder = CONFIGS / {"SD1.x": "sd1", "sdxl": "sdxl"}.get(family, "sd2-v" if pred == "v_prediction" else "sd2")
    if why == TEST_RUN:  # decided after loading; built as the 768-px v model, switched below if epsilon
        folder = CONFIGS / "sd2-v"
    tokenizer, text, unet, vae, sched = _build(folder)
    tokenizer_2 = text_2 = None
    if layout == "sdxl":
        (tokenizer, tokenizer_2), (text, text_2) = tokenizer, text
    if not pred and why != TEST_RUN:
        pred, why = sched.get("prediction_type", "epsilon"), f"config {folder.name}"

    # 1. account for every key, in the file's own names, before reading any weight
    expected = {k: tuple(v.shape) for k, v in ldm_state_dict(text, unet, vae, layout, text_2).items()}
    extra = [k for k in shapes if k not in expected]
    passthrough = [k for k in extra if k in sfu.SD_2_TEXT_ENCODER_KEYS_TO_IGNORE]  # SD2's unused 24th layer
    ignored = [k for k in extra if _NON_WEIGHTS.match(k)]
    known = set(passthrough) | set(ignored)
    hint = (f"Check that config={str(config)!r} describes this checkpoint." if config is not None else
            "A fine-tune with another architecture needs config= a local diffusers folder describing it.")
    _check(label, f"the {family} architecture ({folder})", {k: v for k, v in shapes.items() if k not in known},
           expected, hint)
    if any(k.startswith("model_ema.") for k in ignored):  # as diffusers (extract_ema=False) and A1111 do
        log.warning("%s: the file also holds EMA weights (model_ema.*); loading the non-EMA U-Net", label)
    if ignored:
        log.info("%s: ignoring %d non-weight key(s): %s", label, len(ignored), _short(ignored))

    # 2. convert with diffusers' converters, component by component, and load strictly
    def part(prefix):
        return {k: get(k) for k in expected if k.startswith(prefix)}

    def fit(module, sd):  # transformers >= 5.6 flattened CLIPTextModel (not CLIPTextModelWithProjection)
        return sd if hasattr(module, "text_model") else {k.removeprefix("text_model."): v for k, v in sd.items()}

    if layout == "sdxl":
        text_sd = sfu.convert_ldm_clip_checkpoint(part(XL_CLIP))  # drops conditioner.embedders.0.transformer.
        _load_into(label, text_2, fit(text_2, sfu.convert_open_clip_checkpoint(text_2, part(XL_OPEN_CLIP),
                                                                             prefix=XL_OPEN_CLIP)), dtype)
    else:
        text_sd = (sfu.convert_ldm_clip_checkpoint(part(CLIP)) if layout == "clip"
                   else sfu.convert_open_clip_checkpoint(text, part(OPEN_CLIP), prefix=OPEN_CLIP))
    _load_into(label, unet, sfu.convert_ldm_unet_checkpoint(part(UNET), unet.config), dtype)
    _load_into(label, vae, sfu.convert_ldm_vae_checkpoint(part(VAE), vae.config), dtype)
    _load_into(label, text, fit(text, text_sd), dtype)
    if why == TEST_RUN:
        score = _v_test(unet)
        pred, why = ("v_prediction" if score < -1 else "epsilon"), f"test run of the U-Net: {score:.2f} (A1111's rule, v < -1)"
        if pred == "epsilon":  # the 512-px epsilon SD2 base: its config's size and schedule (same architecture)
            folder = CONFIGS / "sd2"
            keys = ("sample_size", "upcast_attention")  # where the sd2 and sd2-v U-Net configs differ
            cfg = json.loads((folder / "unet" / "config.json").read_text())
            unet.register_to_config(**{k: cfg[k] for k in keys})
            from diffusers.models.attention_processor import Attention

            for mod in unet.modules():
                if isinstance(mod, Attention):
                    mod.upcast_attention = cfg["upcast_attention"]
            sched = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    log.info("%s: %s, %s text encoder, prediction type %s (%s)", label, family, layout, pred, why)
    extra_info = {"text_layout": layout, "prediction_type_source": why, "ignored_keys": ignored,
                  "ldm_passthrough": {k: get(k) for k in passthrough}}
    if layout == "sdxl":
        extra_info["force_zeros_for_empty_prompt"] = True  # as diffusers' SDXL pipeline (and A1111) default
    model = Model(tokenizer, text, unet, vae, {**sched, "prediction_type": pred}, family=family,
                  source=label, extra=extra_info, tokenizer_2=tokenizer_2, text_encoder_2=text_2)
    for m in model.components().values():
        m.eval()
    return model


# -------------------------------------------------------------------------------------------- saving
def save_single_file(model: Model, path, text_layout: str | None = None) -> Path:
    """Write `model` as one .safetensors in the original LDM layout (SD1.x text layout unless the model is
    SD2.x or was loaded from an OpenCLIP-layout file; `text_layout` "clip"/"open_clip" overrides).
    Written to a temporary name in the same folder, then renamed."""
    path = Path(path).expanduser()
    if path.suffix.lower() != ".safetensors":
        raise SdknobsError(f"{path}: single-file checkpoints are written as .safetensors only")
    if model.text_encoder_2 is not None:
        if text_layout not in (None, "sdxl"):
            raise SdknobsError(f"text_layout {text_layout!r}: a model with two text encoders is written in SDXL's layout")
        layout = "sdxl"
    else:
        layout = text_layout or model.extra.get("text_layout") or ("open_clip" if model.family == "SD2.x" else "clip")
        if layout not in ("clip", "open_clip"):
            raise SdknobsError(f"text_layout {layout!r} is not 'clip' (SD1.x) or 'open_clip' (SD2.x)")
    sd = ldm_state_dict(model.text_encoder, model.unet, model.vae, layout, model.text_encoder_2)
    if layout == "open_clip":  # put back what loading set aside (SD2's unused last text layer)
        for k, v in model.extra.get("ldm_passthrough", {}).items():
            sd.setdefault(k, v)
    meta = {"format": "pt", "prediction_type": model.prediction_type, "sdknobs.family": model.family}
    return save_safetensors(sd, path, meta, clone=False)  # no second copy of a multi-GB model
