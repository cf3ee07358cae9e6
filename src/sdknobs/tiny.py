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


# SDXL's schedule as stabilityai/stable-diffusion-xl-base-1.0 ships it (EulerDiscreteScheduler, leading spacing).
SDXL_SCHEDULER_CONFIG = {
    "_class_name": "EulerDiscreteScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "interpolation_type": "linear",
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "use_karras_sigmas": False,
}


def build_sdxl_model(
    seed: int = 0,
    sample_size: int = 8,
    vae_channels: tuple[int, ...] = (16, 32, 32),
    unet_channels: tuple[int, ...] = (32, 64),
    text_widths: tuple[int, int] = (32, 64),
    projection_dim: int = 32,
    text_layers: int = 2,
    heads: int = 2,
    transformer_layers: tuple[int, ...] = (1, 2),
    time_embed_dim: int = 8,
) -> Model:
    """A randomly initialised SDXL-shaped model, after diffusers' own tiny SDXL test model
    (tests/pipelines/stable_diffusion_xl): two CLIP text encoders of different widths (the second with a
    projection, whose pooled output joins the six size/crop ids in the U-Net's "text_time" added embedding),
    cross-attention over both widths concatenated, a first down block without attention and two transformer
    blocks in the second, as SDXL has."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tok1, tok2 = load_tokenizer(), load_tokenizer()
    tok2.pad_token = "!"  # SDXL's second tokenizer pads with "!" (id 0), as OpenCLIP does

    def clip(width, tok, projection=None):
        return CLIPTextConfig(vocab_size=len(tok), hidden_size=width, intermediate_size=width * 4,
                              num_hidden_layers=text_layers, num_attention_heads=heads, max_position_embeddings=77,
                              bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=1,
                              projection_dim=projection or width, hidden_act="gelu")

    te1 = CLIPTextModel(clip(text_widths[0], tok1))
    te2 = CLIPTextModelWithProjection(clip(text_widths[1], tok2, projection_dim))
    n = len(unet_channels)
    unet = UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, block_out_channels=unet_channels, layers_per_block=2,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (n - 1) + ("UpBlock2D",),
        attention_head_dim=tuple(max(1, c // 16) for c in unet_channels), use_linear_projection=True,
        transformer_layers_per_block=transformer_layers, cross_attention_dim=sum(text_widths),
        addition_embed_type="text_time", addition_time_embed_dim=time_embed_dim,
        projection_class_embeddings_input_dim=6 * time_embed_dim + projection_dim,
        norm_num_groups=min(32, unet_channels[0] // 2),
    )
    m = len(vae_channels)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=vae_channels,
        down_block_types=("DownEncoderBlock2D",) * m, up_block_types=("UpDecoderBlock2D",) * m, layers_per_block=1,
        norm_num_groups=min(32, vae_channels[0] // 2), sample_size=sample_size * 2 ** (m - 1),
        scaling_factor=0.13025, force_upcast=True,  # SDXL's VAE values
    )
    model = Model(tok1, te1, unet, vae, dict(SDXL_SCHEDULER_CONFIG), family="sdxl", source="tiny-sdxl",
                  extra={"force_zeros_for_empty_prompt": True}, tokenizer_2=tok2, text_encoder_2=te2)
    for module in model.components().values():
        module.eval()
    return model


def write_tiny_sdxl_model(path: str | Path, **kwargs) -> Path:
    """Build a tiny random SDXL model and save it as a diffusers folder at `path`."""
    return save_model(build_sdxl_model(**kwargs), path)


def main(argv: list[str] | None = None) -> int:
    """`python -m sdknobs.tiny [--sdxl] [--seed N] [--overwrite] OUT`: write a tiny random model folder (for trying
    commands)."""
    import argparse
    import sys

    from sdknobs.atomic import check_out_path
    from sdknobs.errors import SdknobsError

    p = argparse.ArgumentParser(prog="python -m sdknobs.tiny", description=main.__doc__)
    p.add_argument("out", help="the model folder to write (must not exist, or be empty)")
    p.add_argument("--sdxl", action="store_true", help="an SDXL-shaped model (two text encoders, size conditioning)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights (default: 0)")
    p.add_argument("--overwrite", action="store_true", help="replace a model folder already at OUT")
    a = p.parse_args(argv)
    try:
        check_out_path(a.out, "OUT", a.overwrite, folder=True)
        print((write_tiny_sdxl_model if a.sdxl else write_tiny_model)(a.out, seed=a.seed))
    except SdknobsError as e:
        print(f"sdknobs.tiny: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
