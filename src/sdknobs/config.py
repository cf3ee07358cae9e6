"""Configs for the commands: dataclasses with help text and validation. The CLI builds its flags
from these fields (`cli.add_config_args`), and the Python API takes the same names."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from sdknobs.errors import SdknobsError
from sdknobs.images import SEAM_STRENGTH, check_multiple
from sdknobs.loop import SCHEDULERS, check_seed, check_strength


def _f(default, help, **kw):
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


# Sampling defaults left unset (None) come from the model: its folder's sdknobs.json, else its family's usual values
# (`model.SAMPLING_DEFAULTS`); --help shows this text for them.
MODEL_DEFAULT = "the model's: its sdknobs.json, else its family's usual value; e.g. {}"
MASK_BLUR_DEFAULT = "1/128 of the picture's shorter side: 4 px at 512 px, 0.25 px at 32 px"

MAX_BATCH = 1024  # pictures in one sampling call (each is a file); memory is checked against the model later


def check_numbers(cfg) -> None:
    """Every float field (and list of floats) of a config is finite: NaN and inf are refused by name; every
    text field is valid Unicode (bytes that are not UTF-8 reach Python as lone surrogates)."""
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        for x in v if isinstance(v, (list, tuple)) else [v]:
            if isinstance(x, float) and not math.isfinite(x):
                raise SdknobsError(f"--{f.name.replace('_', '-')} must be a finite number, got {x}")
            if isinstance(x, str):
                try:
                    x.encode("utf-8")
                except UnicodeEncodeError as e:
                    raise SdknobsError(f"--{f.name.replace('_', '-')} is not valid UTF-8 text (byte "
                                       f"{x[e.start:e.end].encode('utf-8', 'surrogateescape')!r} at position {e.start})"
                                       ) from None


@dataclass
class SampleConfig:
    """Options every sampling command shares."""

    prompt: str = _f("", "what to draw. AUTOMATIC1111's syntax: (word:1.2) weights, (word) x1.1, [word] /1.1, \\( for a "
                           "literal bracket, BREAK starts a new 75-token chunk (longer prompts are encoded in chunks, "
                           "not cut), <lora:NAME:WEIGHT[:WINDOW]> from --lora-dir, <embedding:NAME> from --embedding-dir")
    negative_prompt: str = _f("", "what to steer away from (the unconditional branch of guidance); the same syntax as "
                                   "--prompt")
    model: str = _f("shapes", "a diffusers folder, a single-file .safetensors checkpoint, or an embedded name (shapes)")
    model_config: str = _f("", "for a single-file checkpoint of another architecture: a diffusers folder with its configs")
    prediction_type: str = _f("", "epsilon or v_prediction, over the model's (an SD2.x single file's is guessed: file "
                                  "metadata, training step, else AUTOMATIC1111's test run of its U-Net)",
                              shown="the model's")
    seed: int = _f(0, "random seed; the same seed and settings give the same picture; -1 draws one (recorded in the PNG)")
    steps: int | None = _f(None, "number of sampler steps (img2img runs int(steps * strength) of them)", type=int,
                           shown=MODEL_DEFAULT.format("30 for shapes and SD1.x/SD2.x"))
    guidance: float | None = _f(None, "classifier-free guidance scale; 1.0 skips the unconditional pass", type=float,
                                shown=MODEL_DEFAULT.format("3 for shapes, 7.5 for SD1.5, 5 for SDXL"))
    scheduler: str | None = _f(None, f"sampler: {', '.join(SCHEDULERS)}", type=str,
                               shown=MODEL_DEFAULT.format("ddim for shapes and SD1.x/SD2.x, euler for SDXL"))
    width: int = _f(0, "output width in px, a multiple of 8 (0: the model's or the image's size)")
    height: int = _f(0, "output height in px, a multiple of 8 (0: the model's or the image's size)")
    batch: int = _f(1, "images per prompt (1..1024), sampled together; image i uses seed + i and records it")
    batch_count: int = _f(1, "A1111's batch count: runs of --batch images, one after another (image j of them all uses "
                             "seed + j)")
    grid: bool = _f(True, "with more than one image, also write NAME-grid.png (a row per --batch-count run)")
    from_png: str = _f("", "re-render from a PNG's parameters (prompt, negative prompt, seed, steps, CFG scale, sampler, "
                           "size, denoising strength, mask blur); flags given as well override them")
    out: str = _f("out/image.png", "output PNG path (with --batch N: NAME-0.png ... NAME-{N-1}.png); an existing file is "
                                   "an error unless --overwrite")
    overwrite: bool = _f(False, "replace existing output files")
    device: str = _f("", "cpu, cuda, cuda:1 ... (default: cuda if available, else cpu)")
    dtype: str = _f("", "fp32, fp16 or bf16 (default: fp32 on CPU, fp16 on CUDA)")
    jit: bool = _f(False, "sample with a TorchScript-frozen U-Net: ~20%% faster per step on CPU after a one-off trace of "
                          "a few seconds (pays off for many images; see sdknobs.fast)")
    embedding: list = _f([], "a textual-inversion embedding file (.safetensors or A1111 .pt) whose token the prompt "
                             "may use; repeatable; FILE=TOKEN renames its token", type=str, repeatable=True)
    lora: list = _f([], "a LoRA file to apply, FILE[:WEIGHT][@WINDOW]; repeatable. WINDOW: START-END fraction of the "
                        "steps (@0.6-1 = the last 40 percent) or a timestep bound (@t<400)", type=str, repeatable=True)
    lora_dir: str = _f("", "folder of NAME.safetensors LoRAs for <lora:NAME:WEIGHT[:WINDOW]> in prompts, applied on top "
                          "of --lora (default: $XDG_DATA_HOME/sdknobs/loras, else ~/.local/share/sdknobs/loras)")
    embedding_dir: str = _f("", "folder of embedding files for <embedding:NAME> in prompts, NAME = the file name "
                               "without its suffix (default: $XDG_DATA_HOME/sdknobs/embeddings)")
    original_size: list = _f([], "SDXL size conditioning: the original picture size W H the model is told",
                             type=int, nargs=2, metavar=("W", "H"), shown="the output size, as A1111 and diffusers")
    crop_top_left: list = _f([], "SDXL size conditioning: the crop's top-left corner X Y", type=int, nargs=2,
                             metavar=("X", "Y"), shown="0 0, uncropped")
    target_size: list = _f([], "SDXL size conditioning: the target size W H", type=int, nargs=2, metavar=("W", "H"),
                           shown="the output size")

    def __post_init__(self):
        check_numbers(self)
        from sdknobs.model import resolve_device_dtype

        check_seed(self.seed)
        resolve_device_dtype(self.device or None, self.dtype or None)
        from sdknobs.model import PREDICTION_TYPES

        if self.prediction_type and self.prediction_type not in PREDICTION_TYPES:
            raise SdknobsError(f"--prediction-type {self.prediction_type!r} is not known; choose one of "
                               f"{', '.join(PREDICTION_TYPES)}")
        if self.steps is not None and self.steps < 1:
            raise SdknobsError(f"--steps must be >= 1, got {self.steps}")
        if not 1 <= self.batch <= MAX_BATCH:
            raise SdknobsError(f"--batch must be in 1..{MAX_BATCH} pictures, got {self.batch}")
        if not 1 <= self.batch * self.batch_count <= MAX_BATCH or self.batch_count < 1:
            raise SdknobsError(f"--batch-count must be >= 1 with --batch x --batch-count <= {MAX_BATCH} pictures, got "
                               f"{self.batch_count}")
        if self.guidance is not None and self.guidance < 0:
            raise SdknobsError(f"--guidance must be >= 0, got {self.guidance}")
        from sdknobs.lora.spec import parse_spec

        for spec in self.lora:
            parse_spec(spec)  # syntax only; the file is read when the model is loaded
        from sdknobs.prompt import check_prompt

        for flag in ("prompt", "negative_prompt"):  # weights and <lora:...> names, before any work
            check_prompt(getattr(self, flag), self.lora_dir or None, self.embedding_dir or None, "--" + flag.replace("_", "-"))
        if self.scheduler is not None and self.scheduler not in SCHEDULERS:
            raise SdknobsError(f"--scheduler {self.scheduler!r} is not known; choose one of {', '.join(SCHEDULERS)}")
        for name in ("width", "height"):
            if getattr(self, name):  # 0 = the model's or the image's own size
                check_multiple(f"--{name}", getattr(self, name), 8)
        for name, least in (("original_size", 1), ("crop_top_left", 0), ("target_size", 1)):  # before the model loads
            v = getattr(self, name)
            if v and (len(v) != 2 or min(v) < least):
                raise SdknobsError(f"--{name.replace('_', '-')} takes two whole numbers >= {least} "
                                   f"({'X Y' if not least else 'W H'}), got {' '.join(map(str, v))}")

    def sample_kwargs(self) -> dict:
        return dict(negative_prompt=self.negative_prompt, steps=self.steps, guidance=self.guidance,
                    scheduler=self.scheduler, seed=self.seed, width=self.width or None,
                    height=self.height or None, batch=self.batch, lora_dir=self.lora_dir or None,
                    embedding_dir=self.embedding_dir or None, original_size=self.original_size or None,
                    crop_top_left=self.crop_top_left or None, target_size=self.target_size or None)


@dataclass
class Img2ImgConfig(SampleConfig):
    image: str = _f("", "input image (required)", required=True)
    strength: float = _f(0.75, "how much to change: 0 returns the image, 1 ignores it (start step = steps - int(steps*strength))")

    def __post_init__(self):
        super().__post_init__()
        check_strength(self.strength)


@dataclass
class InpaintConfig(SampleConfig):
    image: str = _f("", "input image (required)", required=True)
    mask: str = _f("", "mask image, white = repaint (required)", required=True)
    strength: float = _f(1.0, "1 repaints the masked area from noise; lower keeps more of it")
    mask_blur: float | None = _f(None, "Gaussian radius in px of the feathered paste-back (0 = hard edge)", type=float,
                                 shown=MASK_BLUR_DEFAULT)
    only_masked: bool = _f(False, "inpaint only the mask's bounding box (+ padding) at full resolution, then paste it back")
    padding: int = _f(32, "padding in px around the mask for --only-masked")
    resize_mask: bool = _f(False, "resize a mask whose size differs from the image instead of failing")

    def __post_init__(self):
        super().__post_init__()
        check_strength(self.strength)
        if self.mask_blur is not None and self.mask_blur < 0:
            raise SdknobsError(f"--mask-blur must be >= 0, got {self.mask_blur}")


@dataclass
class OutpaintConfig(SampleConfig):
    image: str = _f("", "input image (required)", required=True)
    left: int = _f(0, "px to add on the left")
    right: int = _f(0, "px to add on the right")
    top: int = _f(0, "px to add at the top")
    bottom: int = _f(0, "px to add at the bottom")
    overlap: int | None = _f(None, "px either side of each old edge that the second pass (--seam-strength) repaints, "
                                   "so the seam blends; 0 skips that pass",
                             type=int, shown="1/8 of the image's width (left/right) or height (top/bottom), in whole "
                                             "latent cells: 4 px on a 32 px shapes picture, 64 px at 512 px")
    fill: str = _f("edge", "what the new area starts as (A1111's 'masked content'): fill = the mean colour of the "
                           "image's outer border (A1111's fill); edge = the edge pixels repeated outwards; latent-noise "
                           "(or noise) = pure latent noise, needs --strength 1 (A1111's latent noise). At --strength 1 "
                           "the new area starts from latent noise with any fill, and the fill only sets what the VAE sees "
                           "beside the seam (A1111's 'original' has nothing to keep in a new area, and its 'latent "
                           "nothing' is latent noise at strength 1)")
    strength: float = _f(1.0, "denoising strength in the new area (first pass; the original is kept whole)")
    seam_strength: float = _f(SEAM_STRENGTH, "denoising strength of the second pass over the seam band (--overlap px either side "
                                   "of each old edge), from the first pass's picture: blends the seam without drawing a "
                                   "cut shape again; 0 skips it")
    mask_blur: float | None = _f(None, "Gaussian radius in px of the feathered paste-back", type=float,
                                 shown="1/128 of the extended canvas's shorter side: 4 px at 512 px")

    def __post_init__(self):
        super().__post_init__()
        check_strength(self.strength)
        for name in ("left", "right", "top", "bottom", "overlap"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise SdknobsError(f"--{name} must be >= 0, got {getattr(self, name)}")
        if self.left + self.right + self.top + self.bottom == 0:
            raise SdknobsError("nothing to extend: give --left, --right, --top or --bottom (px)")
        from sdknobs.images import check_fill

        check_fill(self.fill)
        if not 0 <= self.seam_strength <= 1:  # also refuses NaN
            raise SdknobsError(f"--seam-strength must be in [0, 1], got {self.seam_strength}")


@dataclass
class SweepConfig(SampleConfig):
    image: str = _f("", "input image (required)", required=True)
    strengths: list = _f([0.0, 0.2, 0.4, 0.6, 0.8, 1.0], "strengths across the grid", type=float)
    seeds: list = _f([0, 1, 2], "seeds down the grid", type=int)
    scale: int = _f(4, "upscale each cell this many times (nearest) so small images are visible")

    def __post_init__(self):
        super().__post_init__()
        for s in self.strengths:
            check_strength(s)
        if not self.strengths or not self.seeds:
            raise SdknobsError("--strengths and --seeds need at least one value each")
        for seed in self.seeds:
            check_seed(seed)
        if self.scale < 1 or self.scale > 64:
            raise SdknobsError(f"--scale must be in 1..64, got {self.scale}")
