"""Model families: what SD1.x, SD2.x and SDXL differ in, kept in one place so pipelines, trainer and
file formats stay family-blind. The loader picks a `Family` (by the folder's components or a file's key
layout) and everything else asks it:

- text encoders: which of the Model's encoders (`encoders`, attribute names), which hidden state the U-Net
  attends to (`hidden_layer`: None = the last one after the final layer norm, SD1/SD2 as diffusers ship them;
  -2 = the penultimate, without the norm, SDXL), and whose projected pooled output feeds added conditioning
  (`pooled_from`);
- added conditioning: SDXL's U-Net takes `added_cond_kwargs = {"text_embeds": pooled, "time_ids": ...}` with
  time ids (original H, W, crop top, left, target H, W) (`added_cond`);
- defaults: `force_zeros_for_empty_prompt` (diffusers' SDXL rule: an empty negative prompt
  is a zero embedding, not the encoded empty string), the diffusers pipeline class a saved folder names;
- single-file layout: the key prefixes of its text encoders in the original (LDM / SGM) layout.
Sampling defaults per family (guidance, steps, scheduler) are `model.SAMPLING_DEFAULTS`, beside the sdknobs.json
reader that overrides them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from sdknobs.errors import SdknobsError


@dataclass(frozen=True)
class Family:
    name: str  # Model.family
    encoders: tuple[str, ...] = ("text_encoder",)  # Model attributes of the text encoders, in concat order
    tokenizers: tuple[str, ...] = ("tokenizer",)
    hidden_layer: int | None = None  # None: last_hidden_state; -2: hidden_states[-2] (penultimate, no final norm)
    pooled_from: int | None = None  # index into `encoders` of the one whose projected pooled output is used
    size_conditioning: bool = False  # U-Net takes added_cond_kwargs {"text_embeds", "time_ids"}
    force_zeros_for_empty_prompt: bool = False  # default when the folder does not say
    pipeline_class: str = "StableDiffusionPipeline"
    ldm_text_prefixes: tuple[str, ...] = ("cond_stage_model.",)

    @property
    def two_encoders(self) -> bool:
        return len(self.encoders) > 1

    def run_encoder(self, encoder, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(hidden states [B, 77, D] the U-Net attends to, projected pooled output [B, P] or None) of one
        encoder on token ids, as diffusers' pipelines take them."""
        if self.hidden_layer is None:
            out = encoder(ids)
            hidden = out[0]
        else:
            out = encoder(ids, output_hidden_states=True)
            hidden = out.hidden_states[self.hidden_layer]
        pooled = getattr(out, "text_embeds", None)  # CLIPTextModelWithProjection only
        return hidden, pooled

    def time_ids(self, width: int, height: int, original_size=None, crop_top_left=(0, 0), target_size=None) -> list[int]:
        """SDXL's six size/crop numbers, in SGM's order: original (H, W), crop (top, left), target (H, W).
        Sizes are given as (W, H) and the crop as (X, Y), as A1111 names them; None = the output size."""
        ow, oh = original_size or (width, height)
        tw, th = target_size or (width, height)
        x, y = crop_top_left or (0, 0)
        return [int(oh), int(ow), int(y), int(x), int(th), int(tw)]

    def added_cond(self, pooled: torch.Tensor | None, width: int, height: int, *, original_size=None,
                   crop_top_left=(0, 0), target_size=None) -> dict | None:
        """The U-Net's `added_cond_kwargs` for a batch of pooled text outputs; None for families without."""
        if not self.size_conditioning:
            return None
        if pooled is None:
            raise SdknobsError(f"{self.name}: the U-Net needs the pooled text output, but none was computed")
        ids = torch.tensor([self.time_ids(width, height, original_size, crop_top_left, target_size)],
                           dtype=pooled.dtype, device=pooled.device)
        return {"text_embeds": pooled, "time_ids": ids.repeat(pooled.shape[0], 1)}


SD1 = Family("SD1.x")
SD2 = Family("SD2.x")
SDXL = Family(
    "sdxl", encoders=("text_encoder", "text_encoder_2"), tokenizers=("tokenizer", "tokenizer_2"), hidden_layer=-2,
    pooled_from=1, size_conditioning=True, force_zeros_for_empty_prompt=True, pipeline_class="StableDiffusionXLPipeline",
    ldm_text_prefixes=("conditioner.embedders.0.transformer.", "conditioner.embedders.1.model."))
FAMILIES = {f.name: f for f in (SD1, SD2, SDXL)}


def family_of(name: str, two_encoders: bool = False) -> Family:
    """The description of Model.family `name`; a one-encoder family for "shapes", "custom" and other SD1-like
    names, SDXL's for any model with two encoders."""
    if name in FAMILIES:
        return FAMILIES[name]
    return SDXL if two_encoders else SD1
