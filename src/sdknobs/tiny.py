"""Tiny random Stable-Diffusion-shaped models, built from configs in seconds.

Tests build one in a temp folder and load it like any other folder; the same builder gives the
shapes model its architecture (`shapes/pretrain.py` chooses bigger sizes)."""
from __future__ import annotations

from pathlib import Path

import torch

from sdknobs.model import ASSETS, Model, save_model

# SD's noise schedule; clip_sample=False matters: with clipping a latent model produces noise.
SD_SCHEDULER_CONFIG = {
    "_class_name": "DDIMScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
}


def load_tokenizer():
    """CLIP's real BPE vocabulary (49,408 tokens), shipped in the package."""
    from transformers import CLIPTokenizer

    d = ASSETS / "clip_tokenizer"
    return CLIPTokenizer(str(d / "vocab.json"), str(d / "merges.txt"), model_max_length=77, pad_token="<|endoftext|>")


def build_model(
    seed: int = 0,
    sample_size: int = 8,
    vae_channels: tuple[int, ...] = (16, 32, 32),
    unet_channels: tuple[int, ...] = (32, 64),
    text_width: int = 32,
    text_layers: int = 2,
    heads: int = 2,
    layers_per_block: int = 1,
    max_position_embeddings: int = 77,
    prediction_type: str = "epsilon",
) -> Model:
    """A randomly initialised SD-shaped model. `sample_size` is the latent side; the image side is
    sample_size * 2**(len(vae_channels) - 1)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = load_tokenizer()
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=text_width,
            intermediate_size=text_width * 4,
            num_hidden_layers=text_layers,
            num_attention_heads=heads,
            max_position_embeddings=max_position_embeddings,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    n = len(unet_channels)
    unet = UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=unet_channels,
        layers_per_block=layers_per_block,
        down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1),
        cross_attention_dim=text_width,
        attention_head_dim=heads,
        norm_num_groups=min(32, unet_channels[0] // 2),
    )
    m = len(vae_channels)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=vae_channels,
        down_block_types=("DownEncoderBlock2D",) * m,
        up_block_types=("UpDecoderBlock2D",) * m,
        layers_per_block=1,
        norm_num_groups=min(32, vae_channels[0] // 2),
        sample_size=sample_size * 2 ** (m - 1),
    )
    sched = dict(SD_SCHEDULER_CONFIG, prediction_type=prediction_type)
    model = Model(tokenizer, text_encoder, unet, vae, sched, family="custom", source="tiny")
    for module in model.components().values():
        module.eval()
    return model


def write_tiny_model(path: str | Path, **kwargs) -> Path:
    """Build a tiny random model and save it as a diffusers folder at `path`."""
    return save_model(build_model(**kwargs), path)
