"""Pseudo-tokens: new words in CLIP's vocabulary, each backed by one new row of the text encoder's
token-embedding matrix E [V, D].

Adding a token `<t>` with N vectors appends N rows: E' = [E; e_1; ...; e_N], with the N names
`<t>`, `<t>_1`, ..., `<t>_{N-1}` added to the tokenizer (diffusers' convention; `text.expand_prompt`
rewrites `<t>` to all N names in prompts). Rows 0..V-1 are untouched, so every prompt without the
token maps to the same ids and the same vectors as before: its image is bit-identical.

Training makes the whole matrix E' the optimized tensor (as diffusers' textual_inversion.py does:
the embedding layer has one weight) and `RowGuard.restore` copies rows 0..V-1 back after every
optimizer step, so gradients that reach other rows (every token in the caption, BOS and EOS/padding
get some), weight decay and Adam's moments never move them.

SDXL has two text encoders, each with its own table (CLIP-L's E1 [V, 768] and OpenCLIP bigG's E2 [V, 1280]):
a token gets one new row set in EACH, under the same names in both tokenizers (`add_pseudo_tokens_all`), and
both are trained together (one RowGuard per table). `encoder=i` picks the table elsewhere.
"""
from __future__ import annotations

import re

import torch

from sdknobs.errors import SdknobsError

MAX_VECTORS = 8


def vector_names(token: str, n: int) -> list[str]:
    """The tokenizer entries of a token with n vectors: `<t>`, `<t>_1`, ..., `<t>_{n-1}`."""
    return [token] + [f"{token}_{i}" for i in range(1, n)]


def encoders(model) -> list[tuple[object, torch.nn.Module]]:
    """(tokenizer, text encoder) of each of the model's text encoders: one for SD1.x/SD2.x, two for SDXL."""
    toks = getattr(model, "tokenizers", None) or [model.tokenizer]
    encs = getattr(model, "text_encoders", None) or [model.text_encoder]
    return list(zip(toks, encs))


ENCODER_NAMES = ("clip_l", "clip_g")  # SDXL's two tables, as kohya, A1111 and ComfyUI name them in files


def embedding_matrix(model, encoder: int = 0) -> torch.nn.Parameter:
    """The token-embedding weight E [rows, D] of text encoder `encoder` (0: the first, or only, one)."""
    return encoders(model)[encoder][1].get_input_embeddings().weight


def _vocab_id(tokenizer, name: str) -> int | None:
    """The id of `name` if the tokenizer already has it as one entry (an added token, a BPE piece, or a
    whole word, which CLIP stores with a `</w>` end-of-word mark)."""
    vocab = tokenizer.get_vocab()
    for key in (name, name + "</w>"):
        if key in vocab:
            return vocab[key]
    return None


def check_token(tokenizer, token: str, n_vectors: int = 1, what: str = "--token") -> None:
    """A new pseudo-token must be a lowercase string without whitespace that is not in the vocabulary
    yet (nor are its `_1`... names)."""
    if not 1 <= n_vectors <= MAX_VECTORS:
        raise SdknobsError(f"--vectors must be between 1 and {MAX_VECTORS}, got {n_vectors}")
    if not token or re.search(r"\s", token):
        raise SdknobsError(f"{what} {token!r} must be one word without spaces, e.g. '<my-shape>'")
    if token != token.lower():
        raise SdknobsError(f"{what} {token!r} has capital letters; CLIP lowercases every prompt before matching "
                           f"tokens, so it could never be used; choose {token.lower()!r}")
    if re.search(r"_\d+$", token):
        raise SdknobsError(f"{what} {token!r} ends in _<number>, which is how extra vectors are named "
                           f"({token}_1, ...); choose a name without it")
    for name in vector_names(token, n_vectors):
        found = _vocab_id(tokenizer, name)
        if found is not None:
            loaded = name in tokenizer.added_tokens_encoder and name not in tokenizer.all_special_tokens
            hint = ("it is already loaded (an embedding with this token)" if loaded else
                    "it is an existing word of the vocabulary, and textual inversion adds a new one")
            raise SdknobsError(f"{what} {token!r}: {name!r} is already in the tokenizer (id {found}): {hint}; "
                               f"choose a new name such as '<{token.strip('<>')}-ti>'")


def _pieces(tokenizer, word: str) -> list[str]:
    return [p.replace("</w>", "") for p in tokenizer.tokenize(word)]


def init_word_id(tokenizer, word: str) -> int:
    """The id of a single-token initialization word; otherwise an error showing how it splits and
    suggesting single-token words."""
    if not word or re.search(r"\s", word.strip()):
        raise SdknobsError(f"--init-word {word!r} must be one word")
    ids = tokenizer(word, add_special_tokens=False).input_ids
    if len(ids) == 1:
        return ids[0]
    pieces = _pieces(tokenizer, word)
    suggestions = []
    for p in pieces:  # whole-word pieces that are one token on their own
        if len(p) >= 4 and len(tokenizer(p, add_special_tokens=False).input_ids) == 1 and p not in suggestions:
            suggestions.append(p)
    w = word.lower()
    vocab = [k[:-4] for k in tokenizer.get_vocab() if k.endswith("</w>") and k[:-4].isalpha()]
    for n in range(len(w), 2, -1):  # whole-word vocabulary entries sharing the longest prefix
        close = sorted(v for v in vocab if v.startswith(w[:n]) and v not in suggestions)[:4]
        if close:
            suggestions += close
            break
    hint = f"single-token alternatives: {', '.join(suggestions[:6])}, or --init random" if suggestions else "use a common English word, or --init random"
    raise SdknobsError(f"--init-word {word!r} is {len(ids)} tokens ({' + '.join(pieces)}), it must be exactly one; {hint}")


def add_pseudo_tokens(model, token: str, vectors: torch.Tensor, what: str = "--token", encoder: int = 0) -> list[int]:
    """Add `token` with vectors [N, D] to text encoder `encoder` of the model (its tokenizer + N new embedding
    rows); returns their ids.

    The matrix is rebuilt from the old one plus the new rows (no random initialisation runs, so no
    global RNG state is consumed), and keeps its dtype and device; the old rows are the same bits."""
    tokenizer, text_encoder = encoders(model)[encoder]
    vectors = vectors.reshape(-1, vectors.shape[-1]) if vectors.dim() == 1 else vectors
    n, d = vectors.shape
    check_token(tokenizer, token, n, what)
    emb = text_encoder.get_input_embeddings()
    old = emb.weight
    if d != old.shape[1]:
        raise SdknobsError(f"{what} {token!r}: vectors are {d} wide but the text encoder is {old.shape[1]} wide")
    names = vector_names(token, n)
    tokenizer.add_tokens(names)
    ids = tokenizer.convert_tokens_to_ids(names)
    rows = max(old.shape[0], max(ids) + 1)
    with torch.no_grad():
        weight = torch.empty(rows, d, dtype=old.dtype, device=old.device)
        weight[: old.shape[0]] = old
        weight[ids] = vectors.to(old.dtype).to(old.device)
    new = torch.nn.Embedding(rows, d, padding_idx=emb.padding_idx, _weight=weight, _freeze=True,
                             device=old.device, dtype=old.dtype)
    text_encoder.set_input_embeddings(new)
    text_encoder.config.vocab_size = rows
    return list(ids)


def add_pseudo_tokens_all(model, token: str, parts: list[torch.Tensor], what: str = "--token") -> list[list[int]]:
    """Add `token` to every text encoder of the model, parts[i] [N, D_i] into encoder i (SDXL: clip_l, clip_g),
    under the same names in each tokenizer; checked in all of them before any is changed. Returns ids per encoder."""
    encs = encoders(model)
    if len(parts) != len(encs):
        raise SdknobsError(f"{what} {token!r}: {len(parts)} vector set(s) for a model with {len(encs)} text encoder(s)")
    for (tok, enc), v in zip(encs, parts):
        check_token(tok, token, v.reshape(-1, v.shape[-1]).shape[0], what)
        width = enc.get_input_embeddings().weight.shape[1]
        if v.shape[-1] != width:
            raise SdknobsError(f"{what} {token!r}: vectors are {v.shape[-1]} wide but that text encoder is {width} wide")
    return [add_pseudo_tokens(model, token, v, what, encoder=i) for i, v in enumerate(parts)]


def initial_vectors(model, n: int, init: str = "word", init_word: str = "", seed: int = 0,
                    encoder: int = 0) -> torch.Tensor:
    """Starting vectors [n, D] in text encoder `encoder`'s table: copies of the init word's row, or (init
    "random") draws with the per-dimension mean and standard deviation of the vocabulary rows (from a local
    generator; another stream per encoder)."""
    E = embedding_matrix(model, encoder).detach().float().cpu()
    if init == "word":
        return E[init_word_id(encoders(model)[encoder][0], init_word)].expand(n, -1).clone()
    if init == "random":
        g = torch.Generator().manual_seed(seed + encoder)
        return E.mean(0) + E.std(0) * torch.randn(n, E.shape[1], generator=g)
    raise SdknobsError(f"--init {init!r} is not known; choose word or random")


class RowGuard:
    """Keeps every row of the embedding matrix except `ids` at its original value.

    restore(): E[keep] <- E_orig[keep], called after every optimizer step. `keep` is all rows but the
    trainable ids; E_orig is a copy taken when the guard is made."""

    def __init__(self, weight: torch.Tensor, ids: list[int]):
        self.weight = weight
        self.ids = list(ids)
        self.keep = torch.ones(weight.shape[0], dtype=torch.bool, device=weight.device)
        self.keep[self.ids] = False
        self.original = weight.detach().clone()

    @torch.no_grad()
    def restore(self) -> None:
        self.weight[self.keep] = self.original[self.keep]

    @torch.no_grad()
    def changed_rows(self) -> list[int]:
        """Rows that differ from the copy (after restore: at most the trainable ids)."""
        diff = (self.weight != self.original).any(dim=1)
        return torch.nonzero(diff).flatten().tolist()

    def trained(self) -> torch.Tensor:
        """The trainable rows [N, D] (a detached copy)."""
        return self.weight.detach()[self.ids].clone()
