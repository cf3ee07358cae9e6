"""txt2img, img2img, inpainting and outpainting: each checks its inputs, prepares latents and
text, calls the one denoising loop (`loop.denoise`), decodes, and pastes back. Same argument names
everywhere; the CLI mirrors them."""
from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import math
import os
from dataclasses import dataclass, field

import torch
from PIL import Image

from sdknobs import images as im
from sdknobs.errors import SdknobsError
from sdknobs.fast import sampling_unet
from sdknobs.loop import SCHEDULERS, SEED_MAX, StartInfo, check_steps, denoise, make_scheduler, resolve_seed, start_index
from sdknobs.model import available_memory
from sdknobs.text import encode_prompt

log = logging.getLogger(__name__)


@dataclass
class Result:
    images: list[Image.Image]
    parameters: list[str]  # A1111-style `parameters` text, one per image
    start: StartInfo | None = None
    extra: dict = field(default_factory=dict)  # e.g. the inpainted image before paste-back


def _sampling(model, steps, guidance, scheduler) -> tuple[int, float, str]:
    """steps, guidance, scheduler: each given one, else the model's default (`Model.sampling_defaults`)."""
    s = model.sampling(guidance=guidance, steps=steps, scheduler=scheduler)
    if s["scheduler"] not in SCHEDULERS:
        raise SdknobsError(f"--scheduler {s['scheduler']!r} is not known; choose one of {', '.join(SCHEDULERS)}")
    return s["steps"], s["guidance"], s["scheduler"]


def _check_common(model, steps, guidance, batch, width, height):
    check_steps(steps, model.scheduler_config)
    if batch < 1:
        raise SdknobsError(f"--batch must be >= 1, got {batch}")
    if not (math.isfinite(guidance) and guidance >= 0):
        raise SdknobsError(f"--guidance must be a finite number >= 0, got {guidance}")
    im.check_size(width, height, model.size_multiple)
    check_memory(model, width, height, batch, cfg=guidance > 1)


def estimate_memory(model, width: int, height: int, batch: int) -> int:
    """A lower bound on the activation bytes of one sampling run: the largest feature map of the VAE
    decoder (full resolution, down to the latent) and of the U-Net (on `batch` latents), four live
    at once (input, normalised, convolved, residual)."""
    item = torch.empty((), dtype=model.dtype).element_size()
    vae_ch = model.vae.config.block_out_channels
    vae = max(c * (width >> i) * (height >> i) for i, c in enumerate(vae_ch))
    f = model.vae_scale_factor
    unet = batch * max(c * ((width // f) >> i) * ((height // f) >> i)
                       for i, c in enumerate(model.unet.config.block_out_channels))
    return 4 * item * max(vae, unet)


def check_memory(model, width: int, height: int, batch: int, cfg: bool = True) -> None:
    """SdknobsError, before any allocation, for a size or batch whose activations cannot fit (classifier-free
    guidance runs the U-Net on 2 * batch latents)."""
    need, have = estimate_memory(model, width, height, batch * (2 if cfg else 1)), available_memory(model.device)
    if have is not None and need > have:
        raise SdknobsError(f"{width}x{height} px at batch {batch} needs at least {need / 2**30:.1f} GiB for activations, "
                           f"but {have / 2**30:.1f} GiB is free on {model.device}; use a smaller --width/--height "
                           f"or --batch")


def _size_conditioning(model, width, height, original_size=None, crop_top_left=None, target_size=None) -> dict:
    """SDXL's size/crop conditioning (the U-Net's time ids), checked: {} for families without it (where giving any
    is an error naming the flag); else original_size/target_size as (W, H) (default: the output size) and
    crop_top_left as (X, Y) (default 0 0), as diffusers' and A1111's defaults."""
    given = {"--original-size": original_size, "--crop-top-left": crop_top_left, "--target-size": target_size}
    if not model.spec.size_conditioning:
        flag = next((f for f, v in given.items() if v), None)
        if flag:
            raise SdknobsError(f"{flag} is SDXL's size conditioning; the {model.family} model {model.source!r} takes none")
        return {}
    out = {}
    for (flag, v), least in zip(given.items(), (1, 0, 1)):
        name = flag[2:].replace("-", "_")
        if not v:
            out[name] = (width, height) if least else (0, 0)
            continue
        v = tuple(v)
        if len(v) != 2 or any(isinstance(x, bool) or not isinstance(x, int) or x < least for x in v):
            raise SdknobsError(f"{flag} takes two whole numbers >= {least} ({'X Y' if not least else 'W H'}), got "
                               f"{' '.join(map(str, v))}")
        out[name] = v
    return out


def _size_params(size: dict) -> dict:
    """The PNG parameters of SDXL's size conditioning (read back by `prompt.png_settings`)."""
    if not size:
        return {}
    return {"Original size": "{}x{}".format(*size["original_size"]), "Crop top left": "{}x{}".format(*size["crop_top_left"]),
            "Target size": "{}x{}".format(*size["target_size"])}


def _params(model, prompt, negative_prompt, *, steps, guidance, scheduler, seed, width, height, batch, size=None,
            **more):
    return [
        im.a1111_parameters(
            prompt, negative_prompt or "", Steps=steps, Sampler=SCHEDULERS[scheduler][2], **{"CFG scale": guidance},
            Seed=seed + i, Size=f"{width}x{height}", Model=model.source or model.family,
            **{"Batch size": batch if batch > 1 else None, "Batch pos": i if batch > 1 else None},
            **_size_params(size or {}), **more,
            **_lora_params(model), **_ti_params(model),
        )
        for i in range(batch)
    ]


def _lora_params(model) -> dict:
    """A1111's 'Lora hashes' field, plus our specs (weights and windows), when LoRAs are applied."""
    s = model.extra.get("lora")
    if s is None or not s.entries:
        return {}
    return {"Lora hashes": f'"{s.a1111_hashes()}"', "Lora": f'"{s.describe()}"'}


def _with_lora(fn):
    """Adds `lora=[...]` (FILE[:WEIGHT][@WINDOW] strings) to a pipeline: those LoRAs are applied, on top of any
    already applied to the model, for this call only."""

    @functools.wraps(fn)
    def call(model, *args, lora=None, **kwargs):
        if not lora:
            return fn(model, *args, **kwargs)
        from sdknobs.lora.layers import applied

        with applied(model, [lora] if isinstance(lora, str) else lora):
            return fn(model, *args, **kwargs)

    return call


def _with_embeddings(fn):
    """Adds `embeddings=[...]` (textual-inversion files, or FILE=TOKEN) to a pipeline: each is loaded into the
    model unless its token already is. They stay loaded: a new token changes no prompt that does not use it."""

    @functools.wraps(fn)
    def call(model, *args, embeddings=None, **kwargs):
        if embeddings:
            from sdknobs.ti import ensure_embeddings

            ensure_embeddings(model, [embeddings] if isinstance(embeddings, (str, os.PathLike)) else embeddings)
        return fn(model, *args, **kwargs)

    return call


def _with_prompt_tags(fn):
    """Adds `lora_dir=` / `embedding_dir=` to a pipeline: `<lora:NAME:W[:WINDOW]>` and `<embedding:NAME>` in the
    prompt or negative prompt are found there (`sdknobs.prompt.extract_tags`), applied through `lora=` /
    `embeddings=` on top of those given, and taken out of the text the encoder sees; the PNG parameters keep
    the prompts as written, so they re-render with the same tags."""
    index = list(inspect.signature(fn).parameters).index("prompt") - 1  # in *args, after the model

    @functools.wraps(fn)
    def call(model, *args, lora=None, embeddings=None, lora_dir=None, embedding_dir=None, **kwargs):
        from sdknobs.prompt import extract_tags

        args = list(args)
        prompt = args[index] if len(args) > index else kwargs["prompt"]
        neg = kwargs.get("negative_prompt") or ""
        lora = [lora] if isinstance(lora, str) else list(lora or [])
        embeddings = [embeddings] if isinstance(embeddings, (str, os.PathLike)) else list(embeddings or [])
        if isinstance(prompt, str) and isinstance(neg, str) and "<" in prompt + neg:
            p, n = extract_tags(prompt, lora_dir, embedding_dir), extract_tags(neg, lora_dir, embedding_dir, "negative prompt")
            lora += p.loras + n.loras
            embeddings += p.embeddings + n.embeddings
            if len(args) > index:
                args[index] = p.text
            else:
                kwargs["prompt"] = p.text
            kwargs["negative_prompt"] = n.text
            res = fn(model, *args, lora=lora or None, embeddings=embeddings or None, **kwargs)
            res.parameters = [im.a1111_parameters(prompt, neg) + q.rsplit("\n", 1)[-1] for q in res.parameters]
            return res
        return fn(model, *args, lora=lora or None, embeddings=embeddings or None, **kwargs)

    return call


def _ti_params(model) -> dict:
    """A1111's 'TI hashes' field (token: first 12 hex digits of the file's sha256) when embeddings are loaded."""
    from sdknobs.ti import file_hashes

    h = file_hashes(model)
    return {"TI hashes": f'"{h}"'} if h else {}


@contextlib.contextmanager
def vae_dtype(model):
    """The dtype to run the VAE in: the model's, except fp16 for a VAE whose config says `force_upcast` (SDXL's
    overflows in fp16 and decodes to black or NaN): then fp32 for the call, as diffusers' SDXL pipelines do."""
    if model.vae.dtype != torch.float16 or not getattr(model.vae.config, "force_upcast", False):
        yield model.vae.dtype
        return
    log.info("the VAE runs in fp32 (its config says force_upcast: SDXL's VAE overflows in fp16)")
    model.vae.to(torch.float32)
    try:
        yield torch.float32
    finally:
        model.vae.to(torch.float16)


def encode_image(model, image: Image.Image, generator) -> torch.Tensor:
    """x_0 = scaling_factor * sample of q(z | image), as diffusers does: one draw per generator for a list."""
    with vae_dtype(model) as dt:
        x = im.to_tensor(image).to(model.device, dt)
        dist = model.vae.encode(x).latent_dist
        z = torch.cat([dist.sample(g) for g in (generator if isinstance(generator, list) else [generator])])
    return (z * model.latent_scale).to(model.dtype)


def decode(model, latents: torch.Tensor) -> list[Image.Image]:
    with vae_dtype(model) as dt:
        return im.to_pil(model.vae.decode((latents / model.latent_scale).to(dt), return_dict=False)[0])


@torch.inference_mode()
def _run(model, prompt, negative_prompt, *, steps, guidance, scheduler, seed, width, height, batch,
         image=None, strength=1.0, mask=None, callback=None, progress=True, size=None):
    """Prepare text, starting latent and mask; run the loop; return latents and start info.
    size: SDXL's size conditioning (`_size_conditioning`); None = its defaults for this output size."""
    sched = make_scheduler(scheduler, model.scheduler_config)
    size = _size_conditioning(model, width, height) if size is None else size
    emb = encode_prompt(model, prompt, negative_prompt, guidance, batch)
    added = emb.added_cond(model, width, height, **size)  # (None, None) for SD1/SD2
    if added[1] is not None and model.extra.get("jit"):
        log.warning("--jit: the frozen U-Net takes no added conditioning (%s's pooled text and size ids); "
                    "sampling with the eager U-Net", model.family)
    f = model.vae_scale_factor
    shape = (emb.cond.shape[0], model.unet.config.in_channels, height // f, width // f)
    if seed + shape[0] - 1 > SEED_MAX:
        raise SdknobsError(f"--seed {seed}: image {shape[0] - 1} of the batch would use seed + {shape[0] - 1}, past {SEED_MAX}")
    generator = [torch.Generator(device=model.device).manual_seed(seed + i) for i in range(shape[0])]  # image i: seed + i
    lat_mask = None if mask is None else im.latent_mask(mask, shape[2:]).to(model.device, model.dtype)
    # The image latent is needed where it is kept (mask) or where denoising starts from it (strength < 1).
    needs_x0 = image is not None and (strength < 1.0 or (lat_mask is not None and lat_mask.min() < 1))
    x0 = None
    if needs_x0:
        x0 = encode_image(model, image, generator)
        x0 = x0.expand(shape[0], -1, -1, -1)
    if lat_mask is not None and x0 is None:
        lat_mask = None  # full mask at strength 1: nothing is kept, so this is txt2img
    loras = model.extra.get("lora")  # LoRA timestep windows: adapters switched before each U-Net call
    windows = loras.before_step if loras is not None and loras.has_windows else None
    try:
        latents, info = denoise(
            sampling_unet(model) if added[1] is None else model.unet,  # the frozen U-Net takes no added_cond_kwargs
            sched, emb.cond, emb.uncond, steps=steps, guidance=guidance, shape=shape,
            generator=generator, x0=x0, strength=strength if image is not None else 1.0, mask=lat_mask,
            callback=callback, progress=progress, before_step=windows, added_cond=added,
        )
    finally:
        if windows is not None:
            loras.reset()
    return latents, info


@_with_prompt_tags
@_with_embeddings
@_with_lora
def generate(model, prompt, *, negative_prompt="", steps=None, guidance=None, scheduler=None, seed=0,
             width=None, height=None, batch=1, callback=None, progress=True, original_size=None, crop_top_left=None,
             target_size=None) -> Result:
    """txt2img: the loop at strength 1 from pure noise. steps, guidance, scheduler: None = the model's
    (`Model.sampling_defaults`: its sdknobs.json, else its family's usual values).
    original_size, target_size (W, H), crop_top_left (X, Y): SDXL's size conditioning; None = the output size, 0 0."""
    steps, guidance, scheduler = _sampling(model, steps, guidance, scheduler)
    seed = resolve_seed(seed)
    width, height = width or model.default_size, height or model.default_size
    _check_common(model, steps, guidance, batch, width, height)
    size = _size_conditioning(model, width, height, original_size, crop_top_left, target_size)
    kw = dict(steps=steps, guidance=guidance, scheduler=scheduler, seed=seed, width=width, height=height, batch=batch,
              size=size)
    latents, info = _run(model, prompt, negative_prompt, callback=callback, progress=progress, **kw)
    with torch.inference_mode():
        pics = decode(model, latents)
    return Result(pics, _params(model, prompt, negative_prompt, **kw), info)


def _prepare_image(model, image, width, height, what="--image"):
    """The picture at the sampling size: --width/--height if given, else its own size, rounded to the
    nearest multiple the model takes (with a notice)."""
    if isinstance(image, (str, bytes)) or hasattr(image, "__fspath__"):
        image = im.load_image(image, what)
    if not width or not height:
        k = model.size_multiple
        w, h = width or max(k, round(image.width / k) * k), height or max(k, round(image.height / k) * k)
        if (w, h) != image.size:
            log.warning("%s is %dx%d px, not a multiple of %d: resized to %dx%d (pass --width/--height to choose)",
                        what, image.width, image.height, k, w, h)
        width, height = w, h
    if image.size != (width, height):
        image = image.resize((width, height), Image.LANCZOS)
    return image, width, height


@_with_prompt_tags
@_with_embeddings
@_with_lora
def img2img(model, image, prompt, *, strength=0.75, negative_prompt="", steps=None, guidance=None,
            scheduler=None, seed=0, width=None, height=None, batch=1, callback=None, progress=True,
            original_size=None, crop_top_left=None, target_size=None) -> Result:
    """img2img: start from the image's latent noised to the start timestep that `strength` picks.
    steps, guidance, scheduler: None = the model's. original_size, crop_top_left, target_size: as `generate`."""
    steps, guidance, scheduler = _sampling(model, steps, guidance, scheduler)
    seed = resolve_seed(seed)
    image, width, height = _prepare_image(model, image, width, height)
    _check_common(model, steps, guidance, batch, width, height)
    i0 = start_index(steps, strength)  # validates strength
    size = _size_conditioning(model, width, height, original_size, crop_top_left, target_size)
    kw = dict(steps=steps, guidance=guidance, scheduler=scheduler, seed=seed, width=width, height=height, batch=batch,
              size=size)
    params = _params(model, prompt, negative_prompt, **kw, **{"Denoising strength": strength})
    if i0 == steps:  # strength 0 (or too small to run one step): the input, untouched
        return Result([image.copy() for _ in range(batch)], params, StartInfo(steps, 0, 0.0, 1.0))
    latents, info = _run(model, prompt, negative_prompt, image=image, strength=strength,
                         callback=callback, progress=progress, **kw)
    with torch.inference_mode():
        pics = decode(model, latents)
    return Result(pics, params, info)


@_with_prompt_tags
@_with_embeddings
@_with_lora
def inpaint(model, image, mask, prompt, *, strength=1.0, mask_blur=None, only_masked=False, padding=32,
            resize_mask=False, negative_prompt="", steps=None, guidance=None, scheduler=None, seed=0,
            width=None, height=None, batch=1, callback=None, progress=True, original_size=None, crop_top_left=None,
            target_size=None) -> Result:
    """Inpainting: repaint where the mask is white; keep the rest on the original's noise path.

    only_masked: inpaint the mask's bounding box (+padding) at full model resolution, then paste back.
    mask_blur: Gaussian radius (px) of the feathered paste-back, 0 = hard edge; None = `images.default_mask_blur`
    of the picture (a fixed fraction of its shorter side).
    steps, guidance, scheduler: None = the model's.
    `extra["raw"]` holds the decoded images before paste-back."""
    steps, guidance, scheduler = _sampling(model, steps, guidance, scheduler)
    seed = resolve_seed(seed)
    image, width, height = _prepare_image(model, image, width, height)
    if mask_blur is None:
        mask_blur = im.default_mask_blur(width, height)
    if isinstance(mask, (str, bytes)) or hasattr(mask, "__fspath__"):
        mask = im.load_image(mask, "--mask", mode="L")
    mask = mask.convert("L")
    if mask.size != image.size:
        if not resize_mask:
            raise SdknobsError(f"--mask is {mask.width}x{mask.height} but the image is {image.width}x{image.height}; "
                               f"pass --resize-mask to resize it")
        mask = mask.resize(image.size, Image.NEAREST)
    if not (math.isfinite(mask_blur) and mask_blur >= 0):
        raise SdknobsError(f"--mask-blur must be a finite number >= 0, got {mask_blur}")
    if only_masked and padding < 0:
        raise SdknobsError(f"--padding must be >= 0, got {padding}")
    i0 = start_index(steps, strength)  # validates strength
    sizes = dict(original_size=original_size, crop_top_left=crop_top_left, target_size=target_size)
    size = _size_conditioning(model, width, height, **sizes)
    kw = dict(steps=steps, guidance=guidance, scheduler=scheduler, seed=seed, width=width, height=height, batch=batch,
              size=size)
    params = _params(model, prompt, negative_prompt, **kw, **{"Denoising strength": strength, "Mask blur": mask_blur})
    if im.mask_array(mask).max() < 0.5 or i0 == steps:  # nothing to repaint (strength 0, or too small for one step, as img2img)
        _check_common(model, steps, guidance, batch, width, height)
        return Result([image.copy() for _ in range(batch)], params, None, {"raw": []})
    if only_masked:
        box = im.mask_crop_box(mask, padding, width / height)
        crop, crop_mask = image.crop(box), mask.crop(box)
        sub = inpaint(model, crop.resize((width, height), Image.LANCZOS), crop_mask.resize((width, height), Image.NEAREST),
                      prompt, strength=strength, mask_blur=0, negative_prompt=negative_prompt, steps=steps,
                      guidance=guidance, scheduler=scheduler, seed=seed, batch=batch, callback=callback, progress=progress,
                      **sizes)
        pasted = []
        for raw in sub.extra["raw"]:
            canvas = image.copy()
            canvas.paste(raw.resize(crop.size, Image.LANCZOS), box[:2])
            pasted.append(im.paste_back(image, canvas, mask, mask_blur))
        return Result(pasted, params, sub.start, {"raw": sub.extra["raw"], "box": box})
    _check_common(model, steps, guidance, batch, width, height)
    latents, info = _run(model, prompt, negative_prompt, image=image, strength=strength, mask=mask,
                         callback=callback, progress=progress, **kw)
    with torch.inference_mode():
        raw = decode(model, latents)
    return Result([im.paste_back(image, r, mask, mask_blur) for r in raw], params, info, {"raw": raw})


@_with_prompt_tags
@_with_embeddings
@_with_lora
def outpaint(model, image, prompt, *, left=0, right=0, top=0, bottom=0, overlap=None, fill="edge",
             strength=1.0, seam_strength=im.SEAM_STRENGTH, mask_blur=None, **kwargs) -> Result:
    """Outpainting in two inpainting passes on a canvas extended by the given pixels on each side (`images.extend_canvas`):
    1. the new area alone at `strength` (1: from pure latent noise), the whole original kept on its noise path;
    2. the seam band, `overlap` px either side of each old edge, at `seam_strength` from pass 1's picture: the seam
       blends, and a shape the old edge cuts keeps its outline instead of being drawn again beside it (0 skips it).
    fill: `images.FILLS` (noise = latent-noise). overlap: None = `images.default_overlap` (1/8 of the image's size
    across that side, in whole latent cells). mask_blur: None = that of the extended canvas. Both passes use the seed
    (image i of a batch: seed + i). extra: canvas, mask (all that may change: new area + band inside the original),
    new_mask, band_mask, first_pass (pass 1's pictures), raw (pass 1's before paste-back)."""
    image, _, _ = _prepare_image(model, image, None, None)
    fill = im.check_fill(fill)
    if not (math.isfinite(seam_strength) and 0 <= seam_strength <= 1):
        raise SdknobsError(f"--seam-strength must be a finite number in [0, 1], got {seam_strength}")
    if fill == "latent-noise" and strength != 1:
        raise SdknobsError(f"--fill latent-noise starts the new area from pure noise, which is --strength 1, got "
                           f"--strength {strength}; use --fill fill or edge to start from a filled canvas")
    if overlap is None:
        overlap = im.default_overlap(image.width, image.height, model.vae_scale_factor)
    size = im.canvas_size(image.size, left, right, top, bottom)
    for name, v in zip(("width", "height"), size):
        if v % model.size_multiple:
            raise SdknobsError(f"outpaint: the extended canvas {name} is {v}, not a multiple of {model.size_multiple}; "
                               f"change the extension by {(-v) % model.size_multiple} px")
    check_memory(model, *size, kwargs.get("batch", 1))  # before the canvas is built
    canvas, new, band = im.extend_canvas(image, left, right, top, bottom, overlap, fill)
    seed = resolve_seed(kwargs.pop("seed", 0))  # -1: drawn once, for both passes
    res = inpaint(model, canvas, new, prompt, strength=strength, mask_blur=mask_blur, seed=seed, **kwargs)
    first = list(res.images)
    if seam_strength > 0 and band.getbbox() is not None and strength > 0:
        kw = {k: v for k, v in kwargs.items() if k != "batch"}
        res.images = [inpaint(model, pic, band, prompt, strength=seam_strength, mask_blur=mask_blur, seed=seed + i,
                              **kw).images[0] for i, pic in enumerate(first)]
    o = overlap if isinstance(overlap, (tuple, list)) else (overlap, overlap)
    more = f", Outpaint fill: {fill}, Overlap: {o[0]} {o[1]}, Seam strength: {seam_strength}"
    res.parameters = [p + more for p in res.parameters]
    from PIL import ImageChops

    mask = ImageChops.lighter(new, band)
    res.extra.update(canvas=canvas, mask=mask, new_mask=new, band_mask=band, first_pass=first)
    return res


def batches(pipeline, model, *args, batch_count=1, seed=0, batch=1, **kwargs) -> Result:
    """A1111's batch count (n_iter): `batch_count` runs of `pipeline` with `batch` images each, one after another;
    image j of them all uses seed + j (-1 draws the seed once), so each re-renders alone from its parameters.
    `extra["grid"]` holds one row per run."""
    if isinstance(batch_count, bool) or not isinstance(batch_count, int) or batch_count < 1:
        raise SdknobsError(f"--batch-count must be an integer >= 1, got {batch_count!r}")
    seed = resolve_seed(seed)
    runs = [pipeline(model, *args, seed=seed + k * batch, batch=batch, **kwargs) for k in range(batch_count)]
    return Result([p for r in runs for p in r.images], [q for r in runs for q in r.parameters], runs[0].start,
                  {"runs": runs, "grid": im.grid([r.images for r in runs])})


def sweep_strength(model, image, prompt, *, strengths=(0.0, 0.25, 0.5, 0.75, 1.0), seeds=(0, 1), steps=None,
                   scale=4, **kwargs) -> tuple[Image.Image, list[list[StartInfo]]]:
    """A grid: strengths across, seeds down; each cell labelled with strength, start step and abar.
    steps (and guidance, scheduler in kwargs): None = the model's. A case of `sdknobs.grid` (the X/Y/Z plot)."""
    from sdknobs.grid import sweep_strength as sweep

    return sweep(model, image, prompt, strengths=strengths, seeds=seeds, steps=steps, scale=scale, **kwargs)


def strength_table(steps: int, strengths, scheduler="ddim", config=None) -> list[StartInfo]:
    """How each strength maps to a start step, timestep and abar for a scheduler (no model needed)."""
    from sdknobs.loop import prepare_timesteps
    from sdknobs.tiny import SD_SCHEDULER_CONFIG

    out = []
    for s in strengths:
        sched = make_scheduler(scheduler, config or SD_SCHEDULER_CONFIG)
        out.append(prepare_timesteps(sched, steps, s, "cpu")[1])
    return out
