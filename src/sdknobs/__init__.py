"""sdknobs: the three knobs of Stable Diffusion customization (LoRA, img2img/inpainting,
textual inversion), on real SD checkpoints or the embedded tiny shapes-world model."""

from sdknobs.errors import SdknobsError
from sdknobs.model import Model, load_model

__all__ = ["Model", "SdknobsError", "load_model"]
__version__ = "0.1.0"
