"""Where learned vectors lie among the vocabulary: for each vector v the top-k rows e_i of the
original embedding matrix by cosine similarity cos(v, e_i) = v.e_i / (|v| |e_i|), and the init word's
similarity and rank for comparison. A vector whose best cosine is well below 1 is a new point, not
a copy of any existing word. `word_neighbours` does the same for any single-token word of the
vocabulary (its own row left out), so the table can be explored before anything is trained."""
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


def vocab_rows(model) -> tuple[torch.Tensor, list[int]]:
    """The original vocabulary's embedding rows [V, D] (added tokens and special tokens left out) and their ids."""
    tok = model.tokenizer
    skip = set(tok.added_tokens_encoder.values()) | set(tok.all_special_ids)
    E = model.text_encoder.get_input_embeddings().weight.detach().float().cpu()
    ids = [i for i in range(min(E.shape[0], len(tok.get_vocab()))) if i not in skip]
    return E[ids], ids


def word(tokenizer, i: int) -> str:
    return tokenizer.convert_ids_to_tokens(i).replace("</w>", "")


@torch.no_grad()
def nearest(model, vectors: torch.Tensor, names: list[str], *, k: int = 10, init_word: str = "") -> list[Neighbours]:
    """Top-k vocabulary neighbours of each vector [N, D] by cosine similarity."""
    from sdknobs.ti.tokens import init_word_id

    E, ids = vocab_rows(model)
    En = torch.nn.functional.normalize(E, dim=1)
    init_id = init_word_id(model.tokenizer, init_word) if init_word else None
    median_norm = float(E.norm(dim=1).median())
    out = []
    for name, v in zip(names, vectors.float().cpu()):
        cos = En @ torch.nn.functional.normalize(v, dim=0)  # [V]
        vals, idx = cos.topk(min(k, len(ids)))
        top = [(word(model.tokenizer, ids[j]), ids[j], float(c)) for c, j in zip(vals, idx.tolist())]
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
def word_neighbours(model, word: str, *, k: int = 10) -> Neighbours:
    """Top-k vocabulary neighbours by cosine of the row of `word` (one token; otherwise the error says how
    it splits), the word's own row left out. Pseudo-tokens loaded into the model count as words too."""
    from sdknobs.errors import SdknobsError
    from sdknobs.ti.tokens import embedding_matrix

    tok = model.tokenizer
    added = {t.lower(): i for t, i in tok.added_tokens_encoder.items() if i not in tok.all_special_ids}
    wid = added.get(word.lower())
    if wid is None:
        ids = tok(word, add_special_tokens=False).input_ids if word.strip() else []
        if len(ids) != 1:
            pieces = " + ".join(p.replace("</w>", "") for p in tok.tokenize(word)) or "nothing"
            raise SdknobsError(f"--word {word!r} is {len(ids)} tokens ({pieces}); a word's row is one token: "
                               f"give a single-token word, or one of the pieces")
        wid = ids[0]
    v = embedding_matrix(model).detach()[wid].float().cpu()[None]
    n = nearest(model, v, [word], k=k + 1)[0]
    n.top = [row for row in n.top if row[1] != wid][:k]
    n.extra["id"] = wid
    return n
