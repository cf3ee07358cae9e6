import logging
import os
import signal

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# One thread: the test models are tiny, and on a shared 2-core machine a second OpenMP thread next to
# another busy process spin-waits for its core (a tiny U-Net call went from 10 ms to 2 s).
torch.set_num_threads(1)
# Ctrl-C as in a terminal: a shell's background job (CI) starts Python with SIGINT ignored, and then no
# KeyboardInterrupt is ever raised, so the tests that press Ctrl-C in-process would test nothing.
signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A tiny random SD-shaped model (32x32 px, 8x8 latents) saved as a diffusers folder."""
    from sdknobs.tiny import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("models") / "tiny", seed=0)


@pytest.fixture(scope="session")
def tiny(tiny_dir):
    from sdknobs import load_model

    return load_model(tiny_dir)


@pytest.fixture(scope="session")
def pipes(tiny_dir):
    """diffusers' own pipelines on the same weights: the independent reference."""
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline, StableDiffusionPipeline

    logging.getLogger("diffusers").setLevel(logging.ERROR)
    base = StableDiffusionPipeline.from_pretrained(tiny_dir, safety_checker=None, requires_safety_checker=False)
    base.set_progress_bar_config(disable=True)
    parts = {k: getattr(base, k) for k in ("vae", "text_encoder", "tokenizer", "unet", "scheduler")}
    i2i = StableDiffusionImg2ImgPipeline(**parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    inp = StableDiffusionInpaintPipeline(**parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    for p in (i2i, inp):
        p.set_progress_bar_config(disable=True)
    return {"txt2img": base, "img2img": i2i, "inpaint": inp}


@pytest.fixture
def photo():
    """A deterministic 32x32 RGB test picture (gradient + a square)."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:32, 0:32]
    a = np.stack([x * 8, y * 8, (x + y) * 4], -1).astype(np.uint8)
    a[8:20, 10:22] = (220, 40, 40)
    return Image.fromarray(a)


@pytest.fixture
def half_mask():
    from PIL import Image, ImageDraw

    m = Image.new("L", (32, 32), 0)
    ImageDraw.Draw(m).rectangle([16, 0, 31, 31], fill=255)
    return m


@pytest.fixture(scope="session")
def tiny_xl_dir(tmp_path_factory):
    """A tiny random SDXL-shaped model (two text encoders 32 and 64 wide, 32x32 px) saved as a diffusers folder."""
    from sdknobs.tiny import write_tiny_sdxl_model

    return write_tiny_sdxl_model(tmp_path_factory.mktemp("models") / "tiny-sdxl", seed=0)


@pytest.fixture(scope="module")
def xl_dir(tiny_xl_dir):
    return tiny_xl_dir


@pytest.fixture(scope="module")
def xl(tiny_xl_dir):
    """The tiny SDXL model loaded once per test module (tests may add LoRAs or embeddings to it)."""
    from sdknobs import load_model

    return load_model(tiny_xl_dir, device="cpu", dtype="fp32")
