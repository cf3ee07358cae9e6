"""Text encoding: prompt -> CLIP token ids -> embeddings the U-Net attends to.

Sampling (`encode_prompt`) follows AUTOMATIC1111: the prompt's attention weights and BREAKs are
parsed (`prompt.parse_weights`), its tokens are cut into chunks of 75 (a chunk that fills up within
20 tokens of a comma ends after that comma; BREAK ends one early), each chunk is encoded as its own
77-token window (BOS + 75 + EOS/padding), and the hidden states are concatenated along the sequence
axis ([B, 77 * chunks, D]). In a chunk with weights, each token's hidden state is multiplied by its
weight, then the chunk is rescaled so its mean is what it was. Prompts with fewer chunks than the
longest of the call (cond and uncond alike) are padded with the empty prompt's encoding. A prompt
without weights and within 75 tokens is one plain window: the same ids and embeddings as diffusers.
Training (`embed_text`) keeps the one 77-token window, as captions are plain text.

Textual-inversion pseudo-tokens expand here: a token learned with N vectors lives in the vocabulary
as N added tokens `<t>`, `<t>_1`, ..., `<t>_{N-1}` (diffusers' convention), and a prompt that says
`<t>` is rewritten to `<t> <t>_1 ... <t>_{N-1}` before tokenizing, so each vector takes one slot of
the window (and the N slots stay in one chunk).

Two text encoders (SDXL): each encoder gets its own tokenizer's windows (the same chunks: both use CLIP's BPE; the
second pads with "!"), its own weighting and mean restoration (A1111 weights each of SDXL's embedders alike), and
the hidden states its family names (`Family.hidden_layer`: SDXL's penultimate); they are concatenated along the
width ([B, 77 * chunks, 768 + 1280]). The pooled output (`PromptEmbeds.cond_pooled`) is the projected one of the
second encoder on each prompt's first chunk, unweighted, as in A1111 and diffusers. An empty negative prompt is a
zero embedding and zero pooled output where the model says `force_zeros_for_empty_prompt` (diffusers' SDXL
default; A1111 zeroes an all-empty negative prompt for SDXL too)."""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import torch

from sdknobs.errors import SdknobsError

log = logging.getLogger(__name__)


@dataclass
class PromptEmbeds:
    cond: torch.Tensor  # [batch, 77 * chunks, text_width]
    uncond: torch.Tensor | None  # same shape, or None when guidance 1.0 skips the unconditional pass
    truncated: list[str]  # words dropped, per prompt: always "" now that long prompts are chunked
    cond_pooled: torch.Tensor | None = None  # [batch, projection] for families with a pooled output (SDXL), else None
    uncond_pooled: torch.Tensor | None = None

    def added_cond(self, model, width: int, height: int, **size) -> tuple[dict | None, dict | None]:
        """`loop.denoise`'s added_cond for these embeddings: (uncond's, cond's) U-Net added_cond_kwargs at this output
        size (size: original_size, crop_top_left, target_size as `Family.added_cond`); (None, None) for SD1/SD2."""
        spec = model.spec
        return (spec.added_cond(self.uncond_pooled, width, height, **size) if self.uncond is not None else None,
                spec.added_cond(self.cond_pooled, width, height, **size))


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


def embed_text_pooled(model, prompts: list[str], *, warn: bool = True):
    """(hidden states [B, 77, D], pooled output [B, P] or None, dropped text) for prompts in one window each, with
    autograd. D is the sum of the encoders' widths (SDXL concatenates both encoders' penultimate states); the
    pooled output is that of the encoder the family names (`Family.pooled_from`), None for SD1/SD2."""
    spec = model.spec
    hidden, pooled, dropped = [], None, []
    for i, (tok, enc) in enumerate(zip(model.tokenizers, model.text_encoders)):
        ids, d = tokenize(tok, prompts)
        dropped = dropped or d
        h, p = spec.run_encoder(enc, ids.to(enc.device))
        hidden.append(h)
        if i == spec.pooled_from:
            pooled = p
    if warn:
        for p, d in zip(prompts, dropped):
            if d:
                log.warning("prompt is longer than the %d-token window; dropped: %r (from %r)",
                            model.tokenizer.model_max_length, d, p)
    return (hidden[0] if len(hidden) == 1 else torch.cat(hidden, dim=-1)), pooled, dropped


def embed_text(model, prompts: list[str], *, warn: bool = True) -> tuple[torch.Tensor, list[str]]:
    """Text-encoder hidden states [B, 77, D] for prompts, with autograd (training needs gradients to
    reach the token-embedding rows; sampling calls `encode_text`, which does not record them)."""
    emb, _, dropped = embed_text_pooled(model, prompts, warn=warn)
    return emb, dropped


@torch.no_grad()
def encode_text(model, prompts: list[str]) -> tuple[torch.Tensor, list[str]]:
    emb, dropped = embed_text(model, prompts)
    return emb.to(model.dtype), dropped


COMMA_BACKTRACK = 20  # A1111's default: a chunk full within this many tokens of a comma breaks after it


def prompt_chunks(tokenizer, prompt: str) -> list[tuple[list[int], list[float]]]:
    """The prompt's token ids and weights in chunks of at most window - 2 (75) tokens, by A1111's rules
    (see the module docstring). Pseudo-tokens are expanded first and a multi-vector one is never split."""
    from sdknobs.prompt import parse_weights

    size = tokenizer.model_max_length - 2
    runs = parse_weights(expand_prompt(tokenizer, prompt))
    texts = [t for t, w in runs if w is not None]
    tokenized = iter(tokenizer(texts, add_special_tokens=False, truncation=False, verbose=False).input_ids)
    comma = tokenizer.convert_tokens_to_ids(",</w>")
    units = {ids[0]: ids for ids in (tokenizer.convert_tokens_to_ids(n) for n in pseudo_tokens(tokenizer).values())}
    chunks: list[tuple[list[int], list[float]]] = []
    ids, weights, last_comma = [], [], -1

    def close():
        nonlocal ids, weights, last_comma
        chunks.append((ids, weights))
        ids, weights, last_comma = [], [], -1

    for _, weight in runs:
        if weight is None:  # BREAK
            close()
            continue
        toks, pos = next(tokenized), 0
        while pos < len(toks):
            if toks[pos] == comma:
                last_comma = len(ids)
            elif len(ids) == size and last_comma >= 0 and size - last_comma <= COMMA_BACKTRACK:
                keep = last_comma + 1  # the words after the comma move on to the next chunk
                moved = ids[keep:], weights[keep:]
                ids, weights = ids[:keep], weights[:keep]
                close()
                ids, weights = list(moved[0]), list(moved[1])
            if len(ids) == size:
                close()
            unit = units.get(toks[pos])
            n = len(unit) if unit and toks[pos : pos + len(unit)] == unit else 1
            if len(ids) + n > size:
                close()
            ids += toks[pos : pos + n]
            weights += [weight] * n
            pos += n
    if ids or not chunks:
        close()
    return chunks


def _window(tokenizer, ids: list[int], weights: list[float]) -> tuple[list[int], list[float]]:
    """One chunk as a full window: BOS + ids + EOS, then padding (EOS in SD1, '!' in SD2's tokenizer)."""
    pad = tokenizer.model_max_length - 2 - len(ids)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return ([tokenizer.bos_token_id, *ids, tokenizer.eos_token_id] + [pad_id] * pad,
            [1.0, *weights, 1.0] + [1.0] * pad)


@torch.no_grad()
def encode_chunked(model, prompts: list[str], chunks: int = 0, parsed: dict | None = None) -> torch.Tensor:
    """Hidden states [B, 77 * n, D] of prompts in A1111's chunks, n = max(chunks, the longest prompt's).
    parsed: {prompt: prompt_chunks(...)} already computed (for the first tokenizer)."""
    return encode_chunked_pooled(model, prompts, chunks, parsed)[0]


@torch.no_grad()
def encode_chunked_pooled(model, prompts: list[str], chunks: int = 0, parsed: dict | None = None):
    """(hidden states [B, 77 * n, D], pooled [B, P] or None): each encoder on its own tokenizer's chunks, weighted
    by A1111's rule, concatenated along the width; the pooled output from each prompt's first chunk."""
    spec = model.spec
    hidden, pooled = [], None
    for i, (tok, enc) in enumerate(zip(model.tokenizers, model.text_encoders)):
        given = (parsed or {}) if i == 0 else {}
        per = [given[p] if p in given else prompt_chunks(tok, p) for p in prompts]
        n = max([chunks, *map(len, per)])
        z, p = _encode_windows(spec, tok, enc, prompts, per, n)
        hidden.append(z)
        if i == spec.pooled_from:
            pooled = p
    z = hidden[0] if len(hidden) == 1 else torch.cat(hidden, dim=-1)
    return z.to(model.dtype), None if pooled is None else pooled.to(model.dtype)


def _encode_windows(spec, tok, encoder, prompts, per, n):
    rows = [_window(tok, *c) for p in per for c in p + [([], [])] * (n - len(p))]  # pad: the empty prompt
    ids = torch.tensor([r[0] for r in rows], device=encoder.device)
    z, pooled = spec.run_encoder(encoder, ids)
    if pooled is not None:
        pooled = pooled.reshape(len(prompts), n, -1)[:, 0]  # A1111: the first chunk's
    w = torch.tensor([r[1] for r in rows], dtype=torch.float64, device=z.device)
    weighted = (w != 1).any(dim=1)
    if weighted.any():  # in float64: a chunk's mean is small next to its values, so the ratio amplifies rounding
        zw = z[weighted].double()
        before = zw.mean(dim=(1, 2), keepdim=True)
        zw = zw * w[weighted][:, :, None]
        zw = zw * (before / zw.mean(dim=(1, 2), keepdim=True))  # A1111 restores each chunk's mean
        if not torch.isfinite(zw).all():
            bad = sorted({prompts[i // n] for i in weighted.nonzero().flatten().tolist()})
            raise SdknobsError(f"prompt {bad[0]!r}: its weights make a chunk's mean hidden state 0, so it cannot be "
                               f"rescaled; change the weights (e.g. no weight of 0 on most words)")
        z = z.clone()
        z[weighted] = zw.to(z.dtype)
    return z.reshape(len(prompts), n * z.shape[1], z.shape[2]), pooled


def warn_unknown_tokens(tokenizer, prompts) -> None:
    """A `<word>` in a prompt that no loaded embedding provides is encoded as plain text: say so."""
    known = tokenizer.added_tokens_encoder
    for name in sorted({m.lower() for p in prompts for m in re.findall(r"<[^<>\s:()\[\]|]+>", p)} - set(known)):
        log.warning("prompt uses %s, but no embedding with that token is loaded: it is read as plain text "
                    "(load one with --embedding FILE or <embedding:NAME>)", name)


def encode_prompt(model, prompt: str | list[str], negative_prompt: str | list[str] | None = None,
                  guidance: float = 7.5, batch: int = 1) -> PromptEmbeds:
    """Encode prompts for classifier-free guidance: eps = eps_uncond + g (eps_cond - eps_uncond).

    The unconditional branch uses the negative prompt (empty by default); guidance <= 1.0 skips it.
    Prompt and negative prompt are encoded in A1111's chunks (see the module docstring), both padded
    to the same number of chunks."""
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    prompts = [p for p in prompts for _ in range(batch)]
    negs = []
    if guidance > 1.0:
        neg = negative_prompt if negative_prompt is not None else ""
        negs = [neg] * len(prompts) if isinstance(neg, str) else [n for n in neg for _ in range(batch)]
        if len(negs) != len(prompts):
            raise SdknobsError(f"negative_prompt: {len(negs) // batch} given for {len(prompts) // batch} prompts")
    warn_unknown_tokens(model.tokenizer, set(prompts) | set(negs))
    zero_neg = bool(negs) and all(n == "" for n in negs) and model.extra.get(
        "force_zeros_for_empty_prompt", model.spec.force_zeros_for_empty_prompt)
    texts = set(prompts) | (set() if zero_neg else set(negs))
    parsed = {p: prompt_chunks(model.tokenizer, p) for p in texts}
    n = max(map(len, parsed.values()))
    cond, cond_pooled = encode_chunked_pooled(model, prompts, n, parsed)
    uncond = uncond_pooled = None
    if zero_neg:  # diffusers' force_zeros_for_empty_prompt, A1111's zeroed all-empty SDXL negative prompt
        uncond = torch.zeros_like(cond)
        uncond_pooled = None if cond_pooled is None else torch.zeros_like(cond_pooled)
    elif negs:
        uncond, uncond_pooled = encode_chunked_pooled(model, negs, n, parsed)
    return PromptEmbeds(cond, uncond, [""] * len(prompts), cond_pooled, uncond_pooled)
