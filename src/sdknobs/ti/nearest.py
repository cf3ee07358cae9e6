"""Where learned vectors lie among the vocabulary: for each vector v the top-k rows e_i of the
original embedding matrix by cosine similarity cos(v, e_i) = v.e_i / (|v| |e_i|), and the init word's
similarity and rank for comparison. A vector whose best cosine is well below 1 is a new point, not
a copy of any existing word. `word_neighbours` does the same for any single-token word of the
vocabulary (its own row left out), so the table can be explored before anything is trained.
`encoder=i` searches text encoder i's table (SDXL: 0 = clip_l, 1 = clip_g; each part of an SDXL embedding
lives in its own encoder's space)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Neighbours:
    name: str  # the tokenizer entry of this vector (<t>, <t>_1, ...)
    norm: float  # |v|
    top: list[tuple[str, int, float]]  # (word, id, cosine), best first
    init_word: str = ""
    init_cosine: float | None = None
    init_rank: int | None = None  # 1 = the nearest row
    extra: dict = field(default_factory=dict)


def vocab_rows(model, encoder: int = 0) -> tuple[torch.Tensor, list[int]]:
    """The original vocabulary's embedding rows [V, D] (added tokens and special tokens left out) and their ids."""
    from sdknobs.ti.tokens import encoders

    tok, enc = encoders(model)[encoder]
    skip = set(tok.added_tokens_encoder.values()) | set(tok.all_special_ids)
    E = enc.get_input_embeddings().weight.detach().float().cpu()
    ids = [i for i in range(min(E.shape[0], len(tok.get_vocab()))) if i not in skip]
    return E[ids], ids


def word(tokenizer, i: int) -> str:
    return tokenizer.convert_ids_to_tokens(i).replace("</w>", "")


@torch.no_grad()
def nearest(model, vectors: torch.Tensor, names: list[str], *, k: int = 10, init_word: str = "",
            encoder: int = 0) -> list[Neighbours]:
    """Top-k vocabulary neighbours of each vector [N, D] by cosine similarity, in text encoder `encoder`'s table."""
    from sdknobs.errors import SdknobsError
    from sdknobs.ti.tokens import encoders, init_word_id

    tok = encoders(model)[encoder][0]
    E, ids = vocab_rows(model, encoder)
    if vectors.shape[-1] != E.shape[1]:
        raise SdknobsError(f"ti nearest: the vectors are {vectors.shape[-1]} wide but text encoder {encoder + 1}'s table "
                           f"is {E.shape[1]} wide")
    En = torch.nn.functional.normalize(E, dim=1)
    init_id = init_word_id(tok, init_word) if init_word else None
    median_norm = float(E.norm(dim=1).median())
    out = []
    for name, v in zip(names, vectors.float().cpu()):
        cos = En @ torch.nn.functional.normalize(v, dim=0)  # [V]
        vals, idx = cos.topk(min(k, len(ids)))
        top = [(word(tok, ids[j]), ids[j], float(c)) for c, j in zip(vals, idx.tolist())]
        n = Neighbours(name, float(v.norm()), top, extra={"vocab_median_norm": median_norm})
        if init_id is not None and init_id in ids:
            j = ids.index(init_id)
            n.init_word, n.init_cosine = init_word, float(cos[j])
            n.init_rank = int((cos > cos[j]).sum()) + 1
        out.append(n)
    return out


def format_neighbours(rows: list[Neighbours]) -> list[str]:
    lines = []
    for n in rows:
        lines.append(f"{n.name}: |v| = {n.norm:.3f} (median vocabulary row {n.extra['vocab_median_norm']:.3f})")
        for rank, (w, i, c) in enumerate(n.top, 1):
            lines.append(f"  {rank:>3}. {w:<20} id {i:<6} cos {c:+.4f}")
        if n.init_word:
            lines.append(f"  init word {n.init_word!r}: cos {n.init_cosine:+.4f}, rank {n.init_rank}")
    return lines


@torch.no_grad()
def word_neighbours(model, word: str, *, k: int = 10, encoder: int = 0) -> Neighbours:
    """Top-k vocabulary neighbours by cosine of the row of `word` (one token; otherwise the error says how
    it splits), the word's own row left out. Pseudo-tokens loaded into the model count as words too."""
    from sdknobs.errors import SdknobsError
    from sdknobs.ti.tokens import embedding_matrix, encoders

    tok = encoders(model)[encoder][0]
    added = {t.lower(): i for t, i in tok.added_tokens_encoder.items() if i not in tok.all_special_ids}
    wid = added.get(word.lower())
    if wid is None:
        ids = tok(word, add_special_tokens=False).input_ids if word.strip() else []
        if len(ids) != 1:
            pieces = " + ".join(p.replace("</w>", "") for p in tok.tokenize(word)) or "nothing"
            raise SdknobsError(f"--word {word!r} is {len(ids)} tokens ({pieces}); a word's row is one token: "
                               f"give a single-token word, or one of the pieces")
        wid = ids[0]
    v = embedding_matrix(model, encoder).detach()[wid].float().cpu()[None]
    n = nearest(model, v, [word], k=k + 1, encoder=encoder)[0]
    n.top = [row for row in n.top if row[1] != wid][:k]
    n.extra["id"] = wid
    return n


def embedding_lines(model, emb, *, k: int = 10, init_word: str = "") -> list[str]:
    """`ti nearest FILE`: the neighbours of each vector, in each text encoder's table for an SDXL embedding
    (its clip_l part among CLIP-L's rows, its clip_g part among OpenCLIP bigG's)."""
    from sdknobs.ti.tokens import ENCODER_NAMES, vector_names

    names, parts, lines = vector_names(emb.token, emb.n_vectors), emb.parts, []
    for i, v in enumerate(parts):
        if len(parts) > 1:
            lines.append(f"{ENCODER_NAMES[i]} (text encoder {i + 1}, {v.shape[1]} wide):")
        lines += format_neighbours(nearest(model, v, names, k=k, init_word=init_word, encoder=i))
    return lines


def word_lines(model, word_: str, *, k: int = 10) -> list[str]:
    """`ti nearest --word WORD`: the word's neighbours in each text encoder's table (one for SD1.x/SD2.x)."""
    from sdknobs.ti.tokens import ENCODER_NAMES, encoders

    n, lines = len(encoders(model)), []
    for i in range(n):
        row = word_neighbours(model, word_, k=k, encoder=i)
        where = f" in {ENCODER_NAMES[i]}'s table (text encoder {i + 1})" if n > 1 else ""
        lines.append(f"word {word_!r}: vocabulary row {row.extra['id']}{where}")
        lines += format_neighbours([row])
    return lines
