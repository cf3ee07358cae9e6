"""`sdknobs ti trace-step`: one textual-inversion training step, printed.

Shows the caption as the text encoder sees it (pseudo-tokens expanded), the shape of every tensor of
the diffusion step, and the point of the restore: autograd gives a non-zero gradient to EVERY row of
the embedding matrix whose token is in the batch (the caption's words, BOS, EOS and the padding,
which is EOS again), the AdamW step moves all of those rows (and weight decay all rows), and the
restore puts every row back except the new token's. On SDXL the same is shown for both tables (CLIP-L's and
OpenCLIP bigG's), which train together."""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path


@dataclass
class TraceReport:
    captions: list[str]
    ids: list[list[int]]  # token ids of each caption up to its first EOS
    tokens: list[list[str]]
    shapes: dict
    loss: float
    lr: float
    matrix: tuple[int, int]
    new_ids: list[int]
    grad_rows: list[tuple[int, str, float]]  # (row, token, |grad row|) with non-zero gradient
    moved_rows: list[int]  # rows the optimizer step changed, before the restore
    changed_rows: list[int]  # rows changed after the step and the restore (= the new ids)
    others: list = None  # SDXL: the same for the second table, dicts with the keys above plus "name"


def trace(model, *, data_dir: str, token: str = "<trace-shape>", init_word: str = "shape", vectors: int = 1,
          template: str = "captions", caption_word: str = "shape", batch_size: int = 1, learning_rate: float = 5e-3,
          seed: int = 0, model_name: str = "shapes", run_dir: str = "") -> TraceReport:
    from sdknobs.text import tokenize
    from sdknobs.ti.train import TIMethod, TITrainConfig
    from sdknobs.training.trainer import trace_step

    tmp = run_dir or tempfile.mkdtemp(prefix="sdknobs-trace-")
    cfg = TITrainConfig(data_dir=data_dir, out=str(Path(tmp) / "learned_embeds.safetensors"), run_dir=tmp,
                        model=model_name, token=token, init_word=init_word, init="word" if init_word else "random",
                        vectors=vectors, template=template, caption_word=caption_word, steps=1, batch_size=batch_size,
                        learning_rate=learning_rate, seed=seed, validate_every=0, checkpoint_every=0, progress=False)
    method = TIMethod(cfg)
    method.record_moved = True
    tr, extra = trace_step(model, method, cfg)
    ids, _ = tokenize(model.tokenizer, extra["captions"])
    eos = model.tokenizer.eos_token_id
    id_lists = []
    for row in ids.tolist():
        id_lists.append(row[: row.index(eos) + 1] if eos in row else row)
    from sdknobs.ti.tokens import ENCODER_NAMES, encoders

    tables = []
    for i, ((tok, _), name) in enumerate(zip(encoders(model), extra["grads"])):
        g, rows, conv = extra["grads"][name], extra["nonzero_grad_rows"][name], tok.convert_ids_to_tokens
        moved = method.moved_rows_by_encoder[i] if method.moved_rows_by_encoder else method.moved_rows
        tables.append({"name": ENCODER_NAMES[i] if i else name, "matrix": tuple(g.shape),
                       "new_ids": method.ids_by_encoder[i], "grad_rows": [(r, conv(r), float(g[r].norm())) for r in rows],
                       "moved_rows": moved, "changed_rows": extra["changed_rows"][name]})
    conv = model.tokenizer.convert_ids_to_tokens
    t0 = tables[0]
    return TraceReport(
        extra["captions"], id_lists, [conv(r) for r in id_lists], tr.shapes(), extra["loss"], extra["lr"],
        t0["matrix"], t0["new_ids"], t0["grad_rows"], t0["moved_rows"], t0["changed_rows"], tables[1:])


def format_trace(r: TraceReport) -> list[str]:
    out = ["one textual-inversion step (first micro-batch of step 0)"]
    for c, ids, toks in zip(r.captions, r.ids, r.tokens):
        out.append(f"caption: {c!r}")
        out.append(f"  ids ({len(ids)} of the 77-token window, then EOS padding): {ids}")
        out.append(f"  tokens: {' '.join(toks)}")
    out.append("tensors:")
    out += [f"  {k:<22} {tuple(v)}" for k, v in r.shapes.items()]
    out.append(f"loss {r.loss:.5f}, learning rate {r.lr:g}")
    tables = [{"name": "", "matrix": r.matrix, "new_ids": r.new_ids, "grad_rows": r.grad_rows,
               "moved_rows": r.moved_rows, "changed_rows": r.changed_rows}] + list(r.others or [])
    for t in tables:
        which = f" of the second text encoder ({t['name']})" if t["name"] else ""
        out.append(f"trainable tensor: the whole embedding matrix{which} {t['matrix'][0]} x {t['matrix'][1]}; "
                   f"new rows {t['new_ids']}")
        out.append(f"rows with a non-zero gradient before the restore: {len(t['grad_rows'])}")
        for row, tok, n in t["grad_rows"]:
            out.append(f"  row {row:>6}  {tok:<22} |grad| {n:.3e}" + ("   <- new token" if row in t["new_ids"] else ""))
        out.append(f"rows the AdamW step moved (gradient and weight decay), before the restore: {len(t['moved_rows'])}")
        out.append(f"rows changed after the restore: {t['changed_rows']} (only the new token's)")
    return out
