"""Loading: one plain object holding everything a Stable Diffusion model is made of.

Sources, all local (nothing is ever downloaded):
- a diffusers-format folder (model_index.json, tokenizer/, text_encoder/, unet/, vae/, scheduler/);
- one single-file checkpoint in the original CompVis/LDM key layout (see `single_file.py`);
- the embedded model by name ("shapes"), a diffusers folder shipped inside this package.
"""
from __future__ import annotations

import json
import logging
import os
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sdknobs.errors import SdknobsError

log = logging.getLogger(__name__)

ASSETS = Path(__file__).parent / "assets"
EMBEDDED = {"shapes": ASSETS / "models" / "shapes"}
COMPONENTS = ("tokenizer", "text_encoder", "unet", "vae", "scheduler")

# Text-encoder width -> family. 768 is CLIP ViT-L/14 (SD1.x), 1024 OpenCLIP ViT-H/14 (SD2.x).
FAMILY_BY_TEXT_WIDTH = {768: "SD1.x", 1024: "SD2.x"}

# Sampling defaults for a model whose folder has no sdknobs.json: the community's usual values per family
# (A1111's and diffusers' CFG 7.5; 30 steps; DDIM, which every SD scheduler config supports). The shipped
# shapes model carries its own measured ones in assets/models/shapes/sdknobs.json.
SETTINGS_FILE = "sdknobs.json"
SAMPLING_DEFAULTS = {
    "SD1.x": {"guidance": 7.5, "steps": 30, "scheduler": "ddim"},
    "SD2.x": {"guidance": 7.5, "steps": 30, "scheduler": "ddim"},
    "custom": {"guidance": 7.5, "steps": 30, "scheduler": "ddim"},
    "sdxl": {"guidance": 5.0, "steps": 30, "scheduler": "euler"},  # diffusers' SDXL guidance; its base ships Euler
}
SAMPLING_KEYS = {"guidance": float, "steps": int, "scheduler": str}
PREDICTION_TYPES = ("epsilon", "v_prediction")
# Training defaults per family and method, for the flags a run leaves unset (the model folder's sdknobs.json
# "training" section comes first; a family not listed takes the config dataclass's fallback): the community's
# usual values, diffusers' train_dreambooth_lora / train_text_to_image_lora (lr 1e-4, batch 1, rank 4, 500
# steps) and textual_inversion.py (3000 steps; lr 5e-3, its 5e-4 scaled by batch x accumulation).
# `sdknobs.training.defaults` resolves and checks them; the shapes model ships its measured ones.
TRAINING_DEFAULTS = {
    "SD1.x": {"lora": {"learning_rate": 1e-4, "batch_size": 1, "steps": 500, "rank": 4, "min_snr_gamma": 0.0},
              "ti": {"learning_rate": 5e-3, "batch_size": 1, "steps": 3000, "min_snr_gamma": 0.0}},
    "SD2.x": {"lora": {"learning_rate": 1e-4, "batch_size": 1, "steps": 500, "rank": 4, "min_snr_gamma": 0.0},
              "ti": {"learning_rate": 5e-3, "batch_size": 1, "steps": 3000, "min_snr_gamma": 0.0}},
}


@dataclass
class Model:
    """Tokenizer, text encoder, U-Net, VAE and scheduler config, plus what we detected about them."""

    tokenizer: object  # transformers.CLIPTokenizer
    text_encoder: torch.nn.Module  # transformers.CLIPTextModel
    unet: torch.nn.Module  # diffusers.UNet2DConditionModel
    vae: torch.nn.Module  # diffusers.AutoencoderKL
    scheduler_config: dict
    family: str = "custom"  # "SD1.x", "SD2.x", "shapes" or "custom"
    source: str = ""
    extra: dict = field(default_factory=dict)
    settings: dict = field(default_factory=dict)  # the folder's sdknobs.json ({"sampling": {...}, ...}), {} if none
    tokenizer_2: object = None  # SDXL: the second tokenizer (OpenCLIP's, pads with "!")
    text_encoder_2: torch.nn.Module | None = None  # SDXL: transformers.CLIPTextModelWithProjection (pooled output)

    @property
    def spec(self):
        """The family description (`sdknobs.families.Family`): text encoders, added conditioning, defaults."""
        from sdknobs.families import family_of

        return family_of(self.family, self.text_encoder_2 is not None)

    @property
    def tokenizers(self) -> list:
        """One tokenizer per text encoder, in the order their hidden states are concatenated."""
        return [t for t in (self.tokenizer, self.tokenizer_2) if t is not None]

    @property
    def text_encoders(self) -> list:
        return [e for e in (self.text_encoder, self.text_encoder_2) if e is not None]

    @property
    def text_encoder_names(self) -> list[str]:
        """Component names of the text encoders ("text_encoder", "text_encoder_2"), as in diffusers' folders."""
        return ["text_encoder", "text_encoder_2"][: len(self.text_encoders)]

    @property
    def text_widths(self) -> list[int]:
        """Each text encoder's hidden width (token-embedding width), e.g. [768, 1280] for SDXL."""
        return [int(e.config.hidden_size) for e in self.text_encoders]

    @property
    def context_width(self) -> int:
        """The width of the hidden states the U-Net attends to: the encoders' widths summed (SDXL concatenates)."""
        return sum(self.text_widths)

    @property
    def sampling_defaults(self) -> dict:
        """guidance, steps and scheduler to sample with when not given: the model's sdknobs.json "sampling"
        section over its family's usual values (`SAMPLING_DEFAULTS`)."""
        base = SAMPLING_DEFAULTS.get(self.family, SAMPLING_DEFAULTS["custom"])
        return {**base, **self.settings.get("sampling", {})}

    def sampling(self, guidance=None, steps=None, scheduler=None) -> dict:
        """The values to use: each given one, else the model's default (`sampling_defaults`)."""
        d = self.sampling_defaults
        return {"guidance": d["guidance"] if guidance is None else guidance, "steps": d["steps"] if steps is None else steps,
                "scheduler": d["scheduler"] if scheduler is None else scheduler}

    @property
    def prediction_type(self) -> str:
        return self.scheduler_config.get("prediction_type", "epsilon")

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def latent_scale(self) -> float:
        """The factor that maps VAE latents to the unit-variance space the U-Net works in."""
        return float(self.vae.config.scaling_factor)

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell along one side (8 for SD)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def size_multiple(self) -> int:
        """Width and height must be multiples of this (8 for SD, as diffusers requires)."""
        return max(8, self.vae_scale_factor)

    @property
    def text_width(self) -> int:
        return int(self.text_encoder.config.hidden_size)

    @property
    def default_size(self) -> int:
        return int(self.unet.config.sample_size) * self.vae_scale_factor

    def components(self) -> dict[str, torch.nn.Module]:
        return {**dict(zip(self.text_encoder_names, self.text_encoders)), "unet": self.unet, "vae": self.vae}

    def to(self, device=None, dtype=None) -> "Model":
        for m in self.components().values():
            m.to(device=device, dtype=dtype)
        return self


def read_settings(folder: Path) -> dict:
    """A model folder's sdknobs.json, checked: {} when there is none; SdknobsError naming the file and key for a
    file that is not a JSON object or a "sampling" value of the wrong type (other sections, e.g. "training",
    are kept for their readers)."""
    path = Path(folder) / SETTINGS_FILE
    if not path.is_file():
        return {}
    data = _json_object(path, f"{path}: not readable JSON",
                        f"{path}: expected a JSON object like {{\"sampling\": {{\"guidance\": 3.0}}}}")
    sampling = data.get("sampling", {})
    if not isinstance(sampling, dict):
        raise SdknobsError(f"{path}: \"sampling\" must be an object of {', '.join(SAMPLING_KEYS)}")
    from sdknobs.loop import SCHEDULERS

    for key, v in sampling.items():
        if key not in SAMPLING_KEYS:
            raise SdknobsError(f"{path}: \"sampling\".{key} is not known; the keys are {', '.join(SAMPLING_KEYS)}")
        kind = SAMPLING_KEYS[key]
        ok = isinstance(v, str) if kind is str else (isinstance(v, (int, float)) and not isinstance(v, bool)
                                                     and (kind is float or float(v).is_integer()))
        if not ok:
            raise SdknobsError(f"{path}: \"sampling\".{key} must be {'a string' if kind is str else 'a number'}, got {v!r}")
        if key == "guidance" and not (math.isfinite(v) and v >= 0):
            raise SdknobsError(f"{path}: \"sampling\".guidance must be a finite number >= 0, got {v!r}")
        if key == "steps" and v < 1:
            raise SdknobsError(f"{path}: \"sampling\".steps must be >= 1, got {v!r}")
        if key == "scheduler" and v not in SCHEDULERS:
            raise SdknobsError(f"{path}: \"sampling\".scheduler {v!r} is not known; choose one of {', '.join(SCHEDULERS)}")
        sampling[key] = kind(v)
    return data


def detect_family(text_width: int, name: str = "") -> str:
    if name in EMBEDDED:
        return name
    return FAMILY_BY_TEXT_WIDTH.get(text_width, "custom")


DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
          "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
CUDA_INSTALL = "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"


def check_device(device: str | None) -> torch.device:
    """The torch device for `--device` (default: cuda if available, else cpu); SdknobsError for one that
    is unknown, unsupported (mps and the rest: sdknobs runs on cpu and cuda) or absent on this machine."""
    if not device:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise SdknobsError(f"--device {device!r} is not a device; expected cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise SdknobsError(f"--device {device!r}: sdknobs runs on cpu or cuda, not {dev.type}")
    if dev.type == "cuda":
        if torch.version.cuda is None:
            raise SdknobsError(f"--device {device!r}: this torch ({torch.__version__}) is a CPU build; on a GPU "
                               f"machine install a CUDA build ({CUDA_INSTALL}) or use --device cpu")
        if not torch.cuda.is_available():
            raise SdknobsError(f"--device {device!r}: no CUDA GPU is visible (check the driver and "
                               f"CUDA_VISIBLE_DEVICES) or use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise SdknobsError(f"--device {device!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s), "
                               f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return dev


def available_memory(device: torch.device | str | None = None) -> int | None:
    """Bytes free for tensors: CUDA's free memory on a cuda device, else the kernel's MemAvailable (free
    RAM plus what the page cache would give back); None where the system does not say."""
    if device is not None and torch.device(device).type == "cuda":
        return int(torch.cuda.mem_get_info(torch.device(device))[0])
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def resolve_device_dtype(device: str | None, dtype: str | None) -> tuple[torch.device, torch.dtype]:
    """fp32 on CPU; fp16 on CUDA unless told otherwise."""
    dev = check_device(device)
    if not dtype:
        return dev, (torch.float16 if dev.type == "cuda" else torch.float32)
    if dtype not in DTYPES:
        raise SdknobsError(f"--dtype {dtype!r} is not known; choose one of fp32, fp16, bf16")
    if dev.type == "cpu" and DTYPES[dtype] == torch.float16:
        raise SdknobsError("--dtype fp16 is not supported on the CPU; use fp32 or bf16")
    return dev, DTYPES[dtype]


def load_model(model: str | Path = "shapes", device: str | None = None, dtype: str | None = None,
               config: str | Path | None = None, jit: bool = False, prediction_type: str | None = None) -> Model:
    """Load a model from a diffusers folder, a single-file checkpoint, or the embedded name.

    config: for a single file, a local diffusers folder whose configs describe its architecture
    (default: detect SD1.x / SD2.x and use the configs shipped in the package).
    jit: sample with a TorchScript-frozen U-Net (`sdknobs.fast`): faster per step on CPU after a
    one-off trace of a few seconds; worth it for many images in one process.
    prediction_type: "epsilon" or "v_prediction" over what the model says or the loader guesses (a single
    file's is guessed from its keys, metadata and weights; see `single_file._prediction_type`)."""
    if prediction_type and prediction_type not in PREDICTION_TYPES:
        raise SdknobsError(f"--prediction-type {prediction_type!r} is not known; choose one of {', '.join(PREDICTION_TYPES)}")
    dev, dt = resolve_device_dtype(device, dtype)
    name = str(model)
    if config and (name in EMBEDDED or Path(name).expanduser().is_dir()):
        raise SdknobsError(f"--model-config {str(config)!r} applies to single-file checkpoints only; --model {name!r} "
                           f"brings its own configs")
    if name in EMBEDDED:
        path = EMBEDDED[name]
        if not (path / "model_index.json").exists():
            raise SdknobsError(f"the embedded model {name!r} is not shipped in this build (expected {path})")
        m = _load_folder(path, dt)
        m.family = name
    else:
        path = Path(name).expanduser()
        if not path.exists():
            raise SdknobsError(f"--model {name!r}: no such folder or file (embedded models: {', '.join(EMBEDDED)})")
        if path.is_dir():
            m = _load_folder(path, dt)
        else:
            from sdknobs.single_file import load_single_file

            m = load_single_file(path, dtype=dt, config=config, prediction_type=prediction_type or None)
    if prediction_type and m.prediction_type != prediction_type:
        m.scheduler_config = {**m.scheduler_config, "prediction_type": prediction_type}
        m.extra["prediction_type_source"] = "--prediction-type"
    m.source = name
    m.extra["jit"] = bool(jit)
    if m.device != dev:
        m.to(dev)
    for module in m.components().values():
        module.eval().requires_grad_(False)
    return m


def _model_index(path: Path) -> dict:
    """A folder's model_index.json ({} when absent: older sdknobs folders and hand-made ones have none)."""
    f = path / "model_index.json"
    if not f.is_file():
        return {}
    return _json_object(f, f"model folder {path}: model_index.json is not readable JSON",
                        f"model folder {path}: model_index.json holds no JSON object")


def _json_object(path: Path, unreadable: str, not_object: str) -> dict:
    """A JSON file that must hold an object: SdknobsError `unreadable (reason)` or `not_object` otherwise."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise SdknobsError(f"{unreadable} ({' '.join(str(e).split())})") from None
    if not isinstance(data, dict):
        raise SdknobsError(not_object)
    return data


def _folder_family(path: Path, index: dict):
    """The family description of a diffusers folder: SDXL when model_index.json names text_encoder_2 (or the folder
    has one), else the one-encoder description. An SDXL refiner (text_encoder_2 only) is refused by name."""
    from sdknobs.families import SD1, SDXL

    def named(key):  # model_index.json lists a component as [library, class], or [null, null] / null when absent
        v = index.get(key)
        return bool(v[0] if isinstance(v, (list, tuple)) and v else v)

    two = named("text_encoder_2") if "text_encoder_2" in index else (path / "text_encoder_2").is_dir()
    if two and "text_encoder" in index and not named("text_encoder"):
        raise SdknobsError(f"model folder {path}: an SDXL refiner (text_encoder_2 only, model_index.json "
                           f"{index.get('_class_name', '?')}); sdknobs loads SDXL base models, not refiners")
    return SDXL if two else SD1


def _load_folder(path: Path, dtype: torch.dtype) -> Model:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    index = _model_index(path)
    spec = _folder_family(path, index)
    needed = (*spec.tokenizers, *spec.encoders, "unet", "vae", "scheduler")
    missing = [c for c in needed if not (path / c).is_dir()]
    if missing:
        raise SdknobsError(
            f"model folder {path} is missing component folder(s) {', '.join(missing)}; a diffusers "
            f"{'SDXL' if spec.two_encoders else 'Stable Diffusion'} folder needs {', '.join(needed)}"
        )
    for c in (*spec.encoders, "unet", "vae"):  # from_pretrained would unpickle .bin files: refuse them
        if not any((path / c).glob("*.safetensors")):
            pickled = sorted(p.name for p in (path / c).iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
            found = f"only pickled weights ({', '.join(pickled)})" if pickled else "no weights"
            raise SdknobsError(
                f"model folder {path}: {c}/ holds {found}; sdknobs reads only .safetensors (pickled files can run "
                f"code when loaded); convert it, e.g. with diffusers' save_pretrained(safe_serialization=True)")
    sched_file = path / "scheduler" / "scheduler_config.json"
    if not sched_file.exists():
        raise SdknobsError(f"model folder {path}: missing {sched_file.relative_to(path)}")
    try:
        tokenizer = CLIPTokenizer.from_pretrained(path / "tokenizer", local_files_only=True)
        text_encoder = CLIPTextModel.from_pretrained(path / "text_encoder", torch_dtype=dtype, local_files_only=True,
                                                     use_safetensors=True)
        tokenizer_2 = text_encoder_2 = None
        if spec.two_encoders:
            tokenizer_2 = CLIPTokenizer.from_pretrained(path / "tokenizer_2", local_files_only=True)
            text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(
                path / "text_encoder_2", torch_dtype=dtype, local_files_only=True, use_safetensors=True)
        unet = UNet2DConditionModel.from_pretrained(path / "unet", torch_dtype=dtype, local_files_only=True,
                                                    use_safetensors=True)
        vae = AutoencoderKL.from_pretrained(path / "vae", torch_dtype=dtype, local_files_only=True,
                                            use_safetensors=True)
    except (OSError, ValueError, EnvironmentError) as e:
        raise SdknobsError(f"model folder {path}: could not load a component: {str(e).splitlines()[0]}") from e
    try:
        scheduler_config = json.loads(sched_file.read_text())
    except (OSError, ValueError) as e:
        raise SdknobsError(f"model folder {path}: {sched_file.relative_to(path)} is not readable JSON ({e})") from e
    if not isinstance(scheduler_config, dict):
        raise SdknobsError(f"model folder {path}: {sched_file.relative_to(path)} holds no JSON object")
    family = spec.name if spec.two_encoders else detect_family(text_encoder.config.hidden_size)
    extra = {"force_zeros_for_empty_prompt": bool(index.get("force_zeros_for_empty_prompt",
                                                            spec.force_zeros_for_empty_prompt))}
    return Model(tokenizer, text_encoder, unet, vae, scheduler_config, family=family, source=str(path),
                 settings=read_settings(path), extra=extra, tokenizer_2=tokenizer_2, text_encoder_2=text_encoder_2)


def save_model(m: Model, path: str | Path) -> Path:
    """Write `m` as a diffusers folder that `StableDiffusionPipeline.from_pretrained` loads.

    Written to a temporary sibling folder and renamed (`atomic.atomic_folder`), so a failure never
    leaves half a model. Check the target first with `atomic.check_out_path(path, folder=True)`.
    """
    import diffusers

    from sdknobs.atomic import atomic_folder

    def write(tmp: Path) -> None:
        from sdknobs.te_layout import save_text_encoder  # text_model. keys: transformers 4 and 5 load them

        for name, tok, enc in zip(m.text_encoder_names, m.tokenizers, m.text_encoders):
            tok.save_pretrained(tmp / name.replace("text_encoder", "tokenizer"))
            save_text_encoder(enc, tmp / name)
        m.unet.save_pretrained(tmp / "unet", safe_serialization=True)
        m.vae.save_pretrained(tmp / "vae", safe_serialization=True)
        (tmp / "scheduler").mkdir()
        sched = {"_class_name": m.scheduler_config.get("_class_name", "DDIMScheduler"), **m.scheduler_config}
        (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched, indent=2))
        index = {
            "_class_name": m.spec.pipeline_class,
            "_diffusers_version": diffusers.__version__,
            "feature_extractor": [None, None],
            "requires_safety_checker": False,
            "safety_checker": [None, None],
            "scheduler": ["diffusers", sched["_class_name"]],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
        }
        if m.text_encoder_2 is not None:  # StableDiffusionXLPipeline's components
            for k in ("feature_extractor", "safety_checker", "requires_safety_checker"):
                index.pop(k)
            index.update(image_encoder=[None, None], feature_extractor=[None, None],
                         text_encoder_2=["transformers", "CLIPTextModelWithProjection"],
                         tokenizer_2=["transformers", "CLIPTokenizer"],
                         force_zeros_for_empty_prompt=bool(m.extra.get("force_zeros_for_empty_prompt", True)))
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2))
        if m.settings:  # the recommended settings travel with the weights
            (tmp / SETTINGS_FILE).write_text(json.dumps(m.settings, indent=2))

    return atomic_folder(path, write)
