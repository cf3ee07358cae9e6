"""Textual inversion: a new word for a concept, learned as new rows of the token-embedding matrix
while every model weight stays frozen (Gal et al. 2022, "An Image is Worth One Word").

- `tokens`: pseudo-tokens, adding rows, the restore-rows guard;
- `files`: diffusers / kohya / A1111 embedding files;
- `load_embedding`: put a file's token into a loaded model (prompts then use it, see `text.py`);
- `verify`, `nearest`: prove nothing else changed; show where the learned vectors lie;
- `train`: the training method for the shared trainer (`sdknobs train-ti`).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sdknobs.errors import SdknobsError
from sdknobs.ti.files import EmbeddingFile, default_filename, read_embedding, save_embedding
from sdknobs.ti.tokens import add_pseudo_tokens, add_pseudo_tokens_all, vector_names  # noqa: F401


@dataclass
class LoadedEmbedding:
    token: str
    names: list[str]  # tokenizer entries: token, token_1, ...
    ids: list[int]  # their rows in the (first) text encoder's embedding matrix
    format: str
    path: Path | None
    sha256: str = ""  # of the file, filled in by file_hashes
    ids_by_encoder: list = None  # SDXL: [rows in clip_l's matrix, rows in clip_g's]; else [ids]


def file_hashes(model) -> str:
    """'token: <first 12 hex digits of the file's sha256>, ...' for the loaded embeddings (A1111's 'TI hashes')."""
    import hashlib

    out = []
    for e in model.extra.get("embeddings", []):
        if not e.sha256 and e.path is not None and Path(e.path).is_file():
            e.sha256 = hashlib.sha256(Path(e.path).read_bytes()).hexdigest()
        if e.sha256:
            out.append(f"{e.token}: {e.sha256[:12]}")
    return ", ".join(out)


def load_embedding(model, source: str | Path | EmbeddingFile, token: str | None = None) -> LoadedEmbedding:
    """Add an embedding (a file path, or an already-read EmbeddingFile) to `model` in place.

    Afterwards any prompt may say `token`; prompts without it give bit-identical results. Errors: the
    width differs from the text encoder's, or the token is already in the vocabulary."""
    from sdknobs.ti.files import check_width

    emb = source if isinstance(source, EmbeddingFile) else read_embedding(source, token)
    if token and isinstance(source, EmbeddingFile):
        emb.token = token.lower()
    check_width(emb, model)
    where = f"embedding file {emb.path}: token" if emb.path else "embedding token"
    try:
        ids = add_pseudo_tokens_all(model, emb.token, emb.parts, what=where)  # one row set in each text encoder
    except SdknobsError as e:
        trained = str(emb.metadata.get("token", "")) if emb.path else ""
        if not trained or trained == emb.token:
            raise
        # kohya/A1111/SDXL files take their trigger from the file name; this one was trained as another token
        raise SdknobsError(f"{str(e).split('; choose a new name')[0]}; the file was trained as {trained!r} (its metadata) and is read as {emb.token!r} "
                           f"after its name, as A1111 and kohya read it: rename it to "
                           f"{Path(default_filename(trained, 'kohya')).stem}{Path(emb.path).suffix} or give "
                           f"--embedding {emb.path}={trained}") from None
    loaded = LoadedEmbedding(emb.token, vector_names(emb.token, emb.n_vectors), ids[0], emb.format, emb.path,
                             ids_by_encoder=ids)
    model.extra.setdefault("embeddings", []).append(loaded)
    return loaded


def split_embedding_arg(arg: str) -> tuple[str, str | None]:
    """`FILE` or `FILE=TOKEN` (the CLI's --embedding): a path that exists is taken whole."""
    if Path(arg).exists() or "=" not in arg:
        return arg, None
    path, token = arg.rsplit("=", 1)
    return path, token or None


def load_embedding_arg(model, arg: str) -> LoadedEmbedding:
    """load_embedding for a `FILE` or `FILE=TOKEN` argument."""
    return load_embedding(model, *split_embedding_arg(arg))


def ensure_embeddings(model, args) -> None:
    """Load each `FILE` / `FILE=TOKEN` unless its token is already loaded with the same vectors (the
    pipelines' `embeddings=`); the same token with other vectors is an error."""
    import torch

    from sdknobs.errors import SdknobsError

    for arg in args:
        path, token = split_embedding_arg(str(arg))
        emb = read_embedding(path, token)
        have = {e.token: e for e in model.extra.get("embeddings", [])}.get(emb.token)
        if have is None:
            load_embedding(model, emb)
            continue
        from sdknobs.ti.tokens import embedding_matrix

        same = len(emb.parts) == len(have.ids_by_encoder or [have.ids])
        for i, (ids, v) in enumerate(zip(have.ids_by_encoder or [have.ids], emb.parts)):
            rows = embedding_matrix(model, i).detach()[ids].float().cpu()
            same = same and rows.shape == v.shape and torch.equal(rows, v.to(rows.dtype))
        if not same:
            raise SdknobsError(f"embedding file {path}: token {emb.token!r} is already loaded with other vectors "
                               f"(from {have.path}); pass FILE=<another-token> to load both")


def load_embeddings(model, paths) -> list[LoadedEmbedding]:
    """`load_embedding` for each path (the CLI's repeatable --embedding)."""
    return [load_embedding_arg(model, str(p)) for p in paths or []]


__all__ = ["EmbeddingFile", "LoadedEmbedding", "ensure_embeddings", "load_embedding", "load_embeddings", "read_embedding",
           "save_embedding"]
