"""`sdknobs ti nearest --word WORD`: any word's neighbours in the embedding table, no embedding file needed."""
import pytest
import torch

from sdknobs.cli import main


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def reference_top(model, word, k):
    """Top-k by cosine computed here from the raw matrix (the word's own row, special and added tokens left out)."""
    tok = model.tokenizer
    wid = tok(word, add_special_tokens=False).input_ids[0]
    E = model.text_encoder.get_input_embeddings().weight.detach().float()[: len(tok.get_vocab())]
    cos = torch.nn.functional.cosine_similarity(E, E[wid][None], dim=1)
    cos[[wid, *tok.all_special_ids, *tok.added_tokens_encoder.values()]] = -2
    vals, idx = cos.topk(k)
    return wid, idx.tolist(), vals.tolist(), float(E[wid].norm())


def test_word_neighbours_match_a_direct_computation(tiny):
    from sdknobs.ti.nearest import word_neighbours

    wid, ids, cos, norm = reference_top(tiny, "circle", 5)
    n = word_neighbours(tiny, "circle", k=5)
    assert n.extra["id"] == wid and n.norm == pytest.approx(norm)
    assert [i for _, i, _ in n.top] == ids
    assert [c for _, _, c in n.top] == pytest.approx(cos, abs=1e-5)
    assert wid not in [i for _, i, _ in n.top]  # its own row (cos 1) is left out


def test_cli_word_without_file(capsys, tiny_dir, tiny):
    wid, ids, _, _ = reference_top(tiny, "circle", 3)
    code, so, err = run(capsys, "ti", "nearest", "--word", "circle", "--model", tiny_dir, "--k", "3")
    assert code == 0, err
    assert f"vocabulary row {wid}" in so and "|v| = " in so
    assert [int(line.split(" id ")[1].split()[0]) for line in so.splitlines() if " id " in line] == ids


@pytest.mark.parametrize("argv,msg", [
    (["ti", "nearest"], "give an embedding FILE or --word WORD"),
    (["ti", "nearest", "x.safetensors", "--word", "circle"], "give an embedding FILE or --word WORD"),
    (["ti", "nearest", "--word", "xqzcircle"], "is 4 tokens (x + q + z + circle)"),
    (["ti", "nearest", "--word", "circle", "--k", "0"], "--k must be >= 1"),
])
def test_cli_bad_input(capsys, tiny_dir, argv, msg):
    code, so, err = run(capsys, *argv, "--model", tiny_dir)
    assert code == 2 and msg in err and "Traceback" not in err and so == ""
