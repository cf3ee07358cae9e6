"""`sdknobs ti verify`: prove that loading an embedding changes nothing but what its token touches.

1. hash every weight of the model (sha256 of each state_dict tensor's bytes);
2. render prompts that do not contain the token (fixed seeds);
3. load the embedding (new tokenizer entries, new rows appended to the embedding matrix);
4. render the same prompts again: every image must be bit-identical to step 2;
5. hash again: every tensor must match, the embedding matrix on its original rows 0..V-1;
6. render one prompt with the token, to show the embedding does change what it is asked to.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
import torch

from sdknobs.errors import SdknobsError

DEFAULT_PROMPTS = (
    "a large red circle in the centre, white background",
    "a small blue square on the left, black background",
    "a large green shape at the top, gray background",
    "a photo of a cat",
    "",
)


def weight_hashes(model, rows: int | list[int] | None = None) -> dict[str, str]:
    """{component/param: sha256} over every state_dict tensor; each token-embedding matrix (SDXL: both) is hashed
    on its first `rows` rows only (an int, or one per text encoder; None: all), so added rows can be left out."""
    from sdknobs.ti.tokens import encoders

    out = {}
    tables = [enc.get_input_embeddings().weight for _, enc in encoders(model)]
    cut = {} if rows is None else {w.data_ptr(): r for w, r in zip(tables, rows if isinstance(rows, list) else [rows])}
    for cname, module in model.components().items():
        for key, t in module.state_dict().items():
            t = t.detach()
            if t.data_ptr() in cut and cname.startswith("text_encoder"):
                t = t[:cut[t.data_ptr()]]
            b = t.contiguous().cpu().view(torch.uint8).numpy().tobytes() if t.numel() else b""
            out[f"{cname}/{key}"] = hashlib.sha256(b + str(tuple(t.shape)).encode() + str(t.dtype).encode()).hexdigest()
    return out


@dataclass
class VerifyReport:
    token: str
    n_vectors: int
    prompts: list[str]
    identical: list[bool]  # per prompt: image bit-identical with and without the embedding
    weights_checked: int
    weights_changed: list[str]  # names of tensors whose hash changed (should be empty)
    new_rows: list[int]
    token_prompt: str = ""
    token_change: float = 0.0  # mean |pixel difference| (0-255) the token makes in token_prompt
    extra: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return all(self.identical) and not self.weights_changed

    def lines(self) -> list[str]:
        per = self.extra.get("rows_by_encoder") or [self.new_rows]
        added = f"rows {self.new_rows}" if len(per) == 1 else \
            ", ".join(f"rows {r} in {n}'s table" for r, n in zip(per, ("clip_l", "clip_g")))
        out = [f"embedding {self.token!r}: {self.n_vectors} vector(s), {added} added"]
        for p, same in zip(self.prompts, self.identical):
            out.append(f"  {'identical' if same else 'DIFFERENT'}  {p!r}")
        out.append(f"weights: {self.weights_checked} tensors hashed, "
                   + (f"all unchanged (embedding matri{'x' if len(per) == 1 else 'ces'} compared on {'its' if len(per) == 1 else 'their'} original rows)" if not self.weights_changed
                      else f"CHANGED: {', '.join(self.weights_changed)}"))
        if self.token_prompt:
            out.append(f"with the token: {self.token_prompt!r} differs from the same prompt without the token "
                       f"by {self.token_change:.1f}/255 per pixel on average")
        out.append("OK" if self.ok else "FAILED")
        return out


def _render(model, prompts, steps, seed, guidance):
    """All prompts as one batch through the pipelines' loop (the same call with and without the embedding)."""
    from sdknobs.pipelines import _run, decode

    side = model.default_size
    latents, _ = _run(model, list(prompts), "", steps=steps, guidance=guidance, scheduler="ddim", seed=seed,
                      width=side, height=side, batch=1, progress=False)
    with torch.inference_mode():
        return [np.asarray(im) for im in decode(model, latents)]


def verify(model, source, *, prompts=None, steps: int = 10, seed: int = 0, guidance: float = 7.5,
           token: str | None = None) -> VerifyReport:
    """Run the checks above on `model` (the embedding stays loaded in it afterwards)."""
    from sdknobs.ti import load_embedding
    from sdknobs.ti.files import EmbeddingFile, read_embedding

    emb = source if isinstance(source, EmbeddingFile) else read_embedding(source, token)
    prompts = list(prompts if prompts is not None else DEFAULT_PROMPTS)
    bad = [p for p in prompts if emb.token in p.lower()]
    if bad:
        raise SdknobsError(f"--prompts must not contain the token {emb.token!r} (found in {bad[0]!r}): "
                           f"they are the prompts that must stay unchanged")
    from sdknobs.ti.tokens import encoders

    rows = [enc.get_input_embeddings().weight.shape[0] for _, enc in encoders(model)]
    before = weight_hashes(model)
    without = _render(model, prompts, steps, seed, guidance)
    # a prompt with the token: the first non-empty prompt with the token appended
    base = next((p for p in prompts if p.strip()), "a photo")
    token_prompt = f"{base}, {emb.token}"
    loaded = load_embedding(model, emb)
    with_ = _render(model, prompts, steps, seed, guidance)
    after = weight_hashes(model, rows=rows)
    changed = sorted(k for k in before if before[k] != after.get(k))
    pair = _render(model, [token_prompt], steps, seed, guidance)[0]
    return VerifyReport(
        emb.token, emb.n_vectors, prompts, [bool(np.array_equal(a, b)) for a, b in zip(without, with_)],
        len(before), changed, loaded.ids, token_prompt,
        float(np.abs(pair.astype(np.float32) - without[prompts.index(base)].astype(np.float32)).mean())
        if base in prompts else 0.0, extra={"rows_by_encoder": loaded.ids_by_encoder},
    )
