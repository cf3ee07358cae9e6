"""`sdknobs train-lora`: LoRA as a Method of the shared trainer (`training/trainer.py`).

Trainable: the factors A, B of a rank-r bypass on each target layer (peft), nothing else:
    y = W x + (alpha / r) B A x,   A ~ N(0, 1/r) ("gaussian", as diffusers' train_text_to_image_lora.py), B = 0
so training starts exactly at the base model. The loss is the shared diffusion loss
    L = w(t) || eps_theta'(x_t, t, c) - eps ||^2      (theta' = theta frozen + the bypasses)
and only A, B receive gradients; every base weight stays bit-identical.

Subject mode (DreamBooth-style, `--instance-token sks --class-word shape`): every instance caption says
"sks shape" where it said "shape" (or starts with "sks shape, " if the word is missing; a missing caption
becomes "a sks shape"); optional class images (`--class-data-dir`) keep their own captions and add
`prior_loss_weight` * their loss, so the model keeps drawing other shapes. Style mode: the captions as given.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from sdknobs.errors import SdknobsError
from sdknobs.lora.files import FORMATS, LoraWeights, write_lora
from sdknobs.lora.layers import component, extract, inject, lora_layers, model_components, set_active
from sdknobs.lora.targets import PRESETS, TEXT_ENCODER_CHOICES, count_params, resolve_targets
from sdknobs.training.data import seed_for
from sdknobs.training.method import Method
from sdknobs.training.trainer import TrainConfig, _f

ADAPTER = "trained"


@dataclass
class LoraTrainConfig(TrainConfig):
    """train-lora: the shared training options plus the LoRA's."""

    METHOD = "lora"  # (not a field) the "training" section of sdknobs.json these defaults come from
    rank: int | None = _f(None, "LoRA rank r (the bypass is B A with A: [r, in], B: [out, r])", type=int, fallback=4)
    alpha: float = _f(0.0, "LoRA alpha; the bypass is scaled by alpha / r (0 = alpha equals the rank, scale 1)")
    targets: list = _f([], f"layers: presets ({', '.join(PRESETS)}) and/or regexes over module names "
                           f"('te:REGEX' for the text encoder, 'te2:REGEX' for SDXL's second); repeatable; none given = "
                           f"cross-attn", repeatable=True)
    text_encoder: bool = _f(False, "also train LoRA layers on the text encoder's self-attention (preset text-encoder)")
    text_encoders: str = _f("both", f"with --text-encoder on SDXL (two text encoders): {', '.join(TEXT_ENCODER_CHOICES)} "
                                    f"(1 = CLIP-L, preset text-encoder; 2 = OpenCLIP bigG, preset text-encoder-2)")
    text_encoder_lr: float = _f(0.0, "learning rate of the text-encoder layers (0 = --learning-rate)")
    instance_token: str = _f("", "subject mode: the rare identifier placed before --class-word in captions, e.g. sks")
    class_word: str = _f("", "subject mode: the class noun the identifier qualifies, e.g. shape")
    format: str = _f("kohya", f"output layout: {', '.join(FORMATS)} (kohya = A1111/ComfyUI; diffusers = load_lora_weights)")

    def __post_init__(self):
        if not self.out:
            self.out = str(Path("out") / "lora.safetensors")
        self.targets = list(self.targets) or ["cross-attn"]  # (a non-empty default would be extended by the CLI)
        super().__post_init__()
        if self.rank is not None and self.rank < 1:
            raise SdknobsError(f"--rank must be >= 1, got {self.rank}")
        if self.alpha < 0:
            raise SdknobsError(f"--alpha must be >= 0 (0 = the rank), got {self.alpha}")
        if self.text_encoders not in TEXT_ENCODER_CHOICES:
            raise SdknobsError(f"--text-encoders {self.text_encoders!r} is not known; choose one of "
                               f"{', '.join(TEXT_ENCODER_CHOICES)}")
        if self.text_encoder_lr < 0:
            raise SdknobsError(f"--text-encoder-lr must be >= 0, got {self.text_encoder_lr}")
        if self.format not in FORMATS:
            raise SdknobsError(f"--format {self.format!r} is not known; choose one of {', '.join(FORMATS)}")
        if Path(self.out).suffix != ".safetensors":
            raise SdknobsError(f"--out {self.out!r} must end in .safetensors")
        if bool(self.instance_token) != bool(self.class_word):
            raise SdknobsError("subject mode needs both --instance-token (e.g. sks) and --class-word (e.g. shape)")
        if self.instance_token and not re.fullmatch(r"[\w<>-]+", self.instance_token):
            raise SdknobsError(f"--instance-token {self.instance_token!r} must be one word")

    @property
    def effective_alpha(self) -> float:
        return self.alpha or float(self.rank)


class LoraMethod(Method):
    """Rank-r bypasses on the target layers; A, B are the only trainable parameters."""

    name = "lora"

    def __init__(self, cfg: LoraTrainConfig):
        self.cfg = cfg
        self.needs_captions = not cfg.instance_token  # subject mode: a missing caption is "a sks shape"
        self.params: dict[str, torch.nn.Parameter] = {}  # "<layer>.lora_A" / "<layer>.lora_B" -> parameter
        self.targets = []
        self.trace_shapes: list[tuple[str, tuple]] | None = None  # set to [] to record one layer's bypass shapes
        self._text: dict[str, torch.Tensor] = {}  # caption -> text encoding, while the text encoder is frozen
        self.trace_target = None  # the layer whose bypass shapes trace-step records

    def setup(self, model) -> None:
        if model.extra.get("lora"):
            raise SdknobsError("train-lora: the model already has LoRAs applied; merge them first (lora merge)")
        cfg = self.cfg
        self.targets = resolve_targets(model, cfg.targets, cfg.text_encoder and cfg.text_encoders)
        most = max(min(t.in_features * t.kernel[0] * t.kernel[1], t.out_features) for t in self.targets)
        if cfg.rank > most:
            raise SdknobsError(f"--rank {cfg.rank} is above the size of every target layer (at most {most} here): "
                               f"a LoRA's rank is at most min(in, out) of its layer")
        with torch.random.fork_rng():  # A's initial values depend on --seed only, not on what ran before
            torch.manual_seed(seed_for(cfg.seed, "lora-init"))
            inject(model, self.targets, cfg.rank, cfg.effective_alpha, ADAPTER, init="gaussian")
        set_active(model, [ADAPTER], trainable=True)
        for comp in model_components(model):
            root = component(model, comp)
            for path, mod in lora_layers(root):
                if ADAPTER in mod.lora_A:
                    # A, B in fp32 even on a half-precision base (as diffusers' cast_training_params)
                    mod.lora_A[ADAPTER].float()
                    mod.lora_B[ADAPTER].float()
                    self.params[f"{comp}.{path}.lora_A"] = mod.lora_A[ADAPTER].weight
                    self.params[f"{comp}.{path}.lora_B"] = mod.lora_B[ADAPTER].weight
        if self.trace_shapes is not None:
            self._hook(model)

    def parameters(self):
        te = [p for k, p in self.params.items() if k.startswith("text_encoder")]
        unet = [p for k, p in self.params.items() if k.startswith("unet.")]
        groups = [{"params": unet}]  # (the trainer's AdamW is fused: one kernel for the ~100 small A/B tensors)
        if te:
            groups.append({"params": te, "lr": self.cfg.text_encoder_lr or self.cfg.learning_rate})
        return [g for g in groups if g["params"]]

    def caption(self, text: str, example) -> str:
        tok, word = self.cfg.instance_token, self.cfg.class_word
        if not tok or example.is_class:
            return text
        if not text:
            return f"a {tok} {word}"
        if re.search(rf"\b{re.escape(tok)}\b", text):
            return text
        pat = rf"\b{re.escape(word)}\b"
        if re.search(pat, text):
            return re.sub(pat, f"{tok} {word}", text, count=1)
        return f"{tok} {word}, {text}"

    def encode(self, model, captions):
        """With frozen text encoders, each distinct caption is encoded once, on its own (so its value never
        depends on the batch it arrived in, and resume stays exact), and reused: like latent caching. Cached:
        the hidden states and (SDXL) the pooled output."""
        if any(k.startswith("text_encoder") for k in self.params):
            return super().encode(model, captions)  # text-encoder LoRA layers learn: encode every step
        for c in dict.fromkeys(captions):
            if c not in self._text:
                hidden, pooled = super().encode(model, [c])
                self._text[c] = (hidden[0].detach(), None if pooled is None else pooled[0].detach())
        hidden = torch.stack([self._text[c][0] for c in captions])
        pooled = None if self._text[captions[0]][1] is None else torch.stack([self._text[c][1] for c in captions])
        return hidden, pooled

    def state_dict(self):
        return {k: p.detach() for k, p in self.params.items()}

    def load_state_dict(self, sd):
        missing = sorted(set(self.params) - set(sd))
        if missing:
            raise SdknobsError(f"checkpoint has no LoRA weights for {missing[0]} ({len(missing)} missing)")
        with torch.no_grad():
            for k, p in self.params.items():
                if sd[k].shape != p.shape:
                    raise SdknobsError(f"checkpoint {k} has shape {tuple(sd[k].shape)}, expected {tuple(p.shape)}")
                p.copy_(sd[k])

    def metadata(self) -> dict:
        c = self.cfg
        return {"lora_rank": c.rank, "lora_alpha": c.effective_alpha, "lora_targets": " ".join(c.targets)
                + (" text-encoder" if c.text_encoder else ""), "lora_params": count_params(self.targets, c.rank)}

    def weights(self, model) -> LoraWeights:
        return extract(model, ADAPTER)

    def save(self, model, path, metadata):
        te = any(t.component != "unet" for t in self.targets)
        return write_lora(self.weights(model), path, self.cfg.format, kohya_metadata(model, self.cfg, metadata, te))

    def _hook(self, model) -> None:
        """Record the tensor shapes inside one target layer's bypass (for trace-step): the first to_k (text
        tokens -> keys, where the caption enters the picture), else the first target."""
        t = self.trace_target = next((t for t in self.targets if t.name.endswith("to_k")), self.targets[0])
        mod = component(model, t.component).get_submodule(t.name)
        rec = self.trace_shapes

        def grab(label):
            return lambda m, inp, out: rec.append((label, tuple(inp[0].shape), tuple(out.shape)))

        mod.lora_A[ADAPTER].register_forward_hook(grab(f"{t.name}: A x"))
        mod.lora_B[ADAPTER].register_forward_hook(grab(f"{t.name}: B (A x)"))
        mod.base_layer.register_forward_hook(grab(f"{t.name}: W x"))


def model_sha256(model) -> str:
    """sha256 of the base model: of the file for a single-file checkpoint, else of the weight files of a
    diffusers folder (sorted relative paths and bytes), else of the loaded U-Net and text-encoder weights."""
    from sdknobs.model import EMBEDDED

    if "sha256" in model.extra:
        return model.extra["sha256"]
    h = hashlib.sha256()
    src = Path(str(EMBEDDED.get(model.source, model.source))) if model.source else None
    if src is not None and src.is_file():
        from sdknobs.lora.files import file_sha256

        digest = file_sha256(src)
    elif src is not None and src.is_dir():
        for f in sorted(p for p in src.rglob("*") if p.suffix in (".safetensors", ".bin") and p.is_file()):
            h.update(str(f.relative_to(src)).encode())
            h.update(f.read_bytes())
        digest = h.hexdigest()
    else:
        for comp in [component(model, c) for c in model_components(model)]:
            for k, v in comp.state_dict().items():
                if ".lora_" not in k:
                    h.update(k.encode())
                    h.update(v.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        digest = h.hexdigest()
    model.extra["sha256"] = digest
    return digest


def modelspec_architecture(model) -> str:
    """ModelSpec's architecture id (kohya's library/sai_model_spec.py): SD1-architecture models, the
    embedded one included, are stable-diffusion-v1; SD2.x is v2-512 or v2-768-v by prediction type; SDXL is
    stable-diffusion-xl-v1-base."""
    if getattr(model, "text_encoder_2", None) is not None:
        return "stable-diffusion-xl-v1-base"
    if model.family == "SD2.x":
        return "stable-diffusion-v2-768-v" if model.prediction_type == "v_prediction" else "stable-diffusion-v2-512"
    return "stable-diffusion-v1"


def kohya_metadata(model, cfg: LoraTrainConfig, trainer_meta: dict, text_encoder: bool | None = None) -> dict[str, str]:
    """kohya's ss_* keys (A1111 and ComfyUI show them) plus modelspec's and ours. Model names are file or
    folder names only (as kohya stores them), never a local path."""
    from sdknobs.lora.files import model_file_name
    from sdknobs.training import defaults

    if any(getattr(cfg, f) is None for f in defaults.defaultable(type(cfg))):  # a config not yet run: its values as
        cfg = dataclasses.replace(cfg)                                           # training would resolve them
        defaults.resolve(cfg, model, "lora")
    res = trainer_meta.get("resolution", cfg.resolution or model.default_size)
    # kohya's ss_base_model_version values (train_util.py / sdxl_train_util.py)
    version = "sdxl_base_v1-0" if getattr(model, "text_encoder_2", None) is not None else \
        "sd_v2" if model.family == "SD2.x" else "sd_v1"
    trigger = f"{cfg.instance_token} {cfg.class_word}".strip()
    te = cfg.text_encoder if text_encoder is None else text_encoder
    meta = {
        "ss_network_module": "networks.lora", "ss_network_dim": cfg.rank, "ss_network_alpha": cfg.effective_alpha,
        "ss_sd_model_name": model_file_name(cfg.model), "ss_new_sd_model_hash": model_sha256(model),
        "ss_base_model_version": version, "ss_v2": str(model.family == "SD2.x"), "ss_resolution": f"({res}, {res})",
        "ss_max_train_steps": cfg.steps, "ss_learning_rate": cfg.learning_rate, "ss_seed": cfg.seed,
        "ss_num_train_images": trainer_meta.get("train_images", ""),
        "ss_network_args": json.dumps({"targets": cfg.targets, "text_encoder": te}),
        "ss_network_train_unet_only": str(not te),
        "ss_tag_frequency": json.dumps({Path(cfg.data_dir).name: {trigger: 1}} if trigger else {}),
        "modelspec.trigger_phrase": trigger, "modelspec.architecture": f"{modelspec_architecture(model)}/lora",
    }
    meta.update({f"sdknobs.{k}": v for k, v in trainer_meta.items()})
    meta["sdknobs.base_model"] = model_file_name(trainer_meta.get("base_model", cfg.model))
    return {k: str(v) for k, v in meta.items()}


def load_base(cfg: LoraTrainConfig):
    """The frozen base model: fp32, or with --mixed-precision fp16/bf16 on a GPU in that dtype (as diffusers'
    LoRA scripts keep frozen weights in weight_dtype); the LoRA factors are fp32 either way."""
    from sdknobs.model import load_model, resolve_device_dtype

    dev, _ = resolve_device_dtype(cfg.device or None, None)
    half = cfg.mixed_precision in ("fp16", "bf16") and dev.type == "cuda"
    return load_model(cfg.model, device=cfg.device or None, dtype=cfg.mixed_precision if half else "fp32",
                      config=cfg.model_config or None)


def train_lora(cfg: LoraTrainConfig, model=None, *, log=print):
    """Load the base model unless given, train the LoRA, write the file; returns (TrainResult, method)."""
    from sdknobs.training.trainer import accelerator_from_env, train

    model = model if model is not None else load_base(cfg)
    method = LoraMethod(cfg)
    return train(model, method, cfg, accelerator=accelerator_from_env(cfg), log=log), method
