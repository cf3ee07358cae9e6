"""Text encoding: prompt -> CLIP token ids (77-token window) -> embeddings the U-Net attends to.

Textual-inversion pseudo-tokens expand here: a token learned with N vectors lives in the vocabulary
as N added tokens `<t>`, `<t>_1`, ..., `<t>_{N-1}` (diffusers' convention), and a prompt that says
`<t>` is rewritten to `<t> <t>_1 ... <t>_{N-1}` before tokenizing, so each vector takes one slot of
the window."""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)


@dataclass
class PromptEmbeds:
    cond: torch.Tensor  # [batch, 77, text_width]
    uncond: torch.Tensor | None  # same shape, or None when guidance 1.0 skips the unconditional pass
    truncated: list[str]  # words dropped beyond the window, per prompt ("" when none)


def pseudo_tokens(tokenizer) -> dict[str, list[str]]:
    """Multi-vector pseudo-tokens in the tokenizer: {"<t>": ["<t>", "<t>_1", ...]} for every added
    token `<t>` that has a `<t>_1` (single-vector tokens need no expansion and are left out)."""
    added = tokenizer.added_tokens_encoder
    out = {}
    for tok in added:
        if f"{tok}_1" in added and not re.search(r"_\d+$", tok):
            names, i = [tok], 1
            while f"{tok}_{i}" in added:
                names.append(f"{tok}_{i}")
                i += 1
            out[tok] = names
    return out


def expand_prompt(tokenizer, prompt: str) -> str:
    """`<t>` -> `<t> <t>_1 ... <t>_{N-1}` for each multi-vector pseudo-token (case-insensitive, as
    CLIP lowercases prompts; an occurrence already followed by `_<digit>` is left alone)."""
    for tok, names in pseudo_tokens(tokenizer).items():
        expanded = " ".join(names)
        prompt = re.sub(re.escape(tok) + r"(?!_\d)", lambda _: expanded, prompt, flags=re.IGNORECASE)
    return prompt


def tokenize(tokenizer, prompts: list[str]) -> tuple[torch.Tensor, list[str]]:
    """Token ids padded/cut to the model's window, and the text that did not fit, per prompt.
    Pseudo-tokens are expanded first."""
    prompts = [expand_prompt(tokenizer, p) for p in prompts]
    window = tokenizer.model_max_length
    ids = tokenizer(prompts, padding="max_length", max_length=window, truncation=True, return_tensors="pt").input_ids
    dropped = []
    for p in prompts:
        full = tokenizer(p, truncation=False).input_ids  # [BOS, ..., EOS]
        extra = full[window - 1 : -1]
        dropped.append(tokenizer.decode(extra) if extra else "")
    return ids, dropped


def embed_text(model, prompts: list[str], *, warn: bool = True) -> tuple[torch.Tensor, list[str]]:
    """Text-encoder hidden states [B, 77, D] for prompts, with autograd (training needs gradients to
    reach the token-embedding rows; sampling calls `encode_text`, which does not record them)."""
    ids, dropped = tokenize(model.tokenizer, prompts)
    if warn:
        for p, d in zip(prompts, dropped):
            if d:
                log.warning("prompt is longer than the %d-token window; dropped: %r (from %r)",
                            model.tokenizer.model_max_length, d, p)
    emb = model.text_encoder(ids.to(model.text_encoder.device))[0]
    return emb, dropped


@torch.no_grad()
def encode_text(model, prompts: list[str]) -> tuple[torch.Tensor, list[str]]:
    emb, dropped = embed_text(model, prompts)
    return emb.to(model.dtype), dropped


def encode_prompt(model, prompt: str | list[str], negative_prompt: str | list[str] | None = None,
                  guidance: float = 7.5, batch: int = 1) -> PromptEmbeds:
    """Encode prompts for classifier-free guidance: eps = eps_uncond + g (eps_cond - eps_uncond).

    The unconditional branch uses the negative prompt (empty by default); guidance <= 1.0 skips it."""
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    prompts = [p for p in prompts for _ in range(batch)]
    cond, dropped = encode_text(model, prompts)
    uncond = None
    if guidance > 1.0:
        neg = negative_prompt if negative_prompt is not None else ""
        negs = [neg] * len(prompts) if isinstance(neg, str) else [n for n in neg for _ in range(batch)]
        if len(negs) != len(prompts):
            from sdknobs.errors import SdknobsError

            raise SdknobsError(f"negative_prompt: {len(negs) // batch} given for {len(prompts) // batch} prompts")
        uncond, _ = encode_text(model, negs)
    return PromptEmbeds(cond, uncond, dropped)
