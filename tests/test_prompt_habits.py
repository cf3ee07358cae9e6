"""Bad input for the A1111 habits (prompt weights and tags), run
through the CLI as tests/test_bad_inputs.py does: exit 2, one line naming the flag or file, nothing written."""
import shlex

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from test_bad_inputs import _lora, run_cli, snapshot

G = 'generate --steps 1 --out {d}/out/x.png --lora-dir {d}/loras --embedding-dir {d}/embeddings --prompt'

CASES = [
    ("lora-unknown-name", f'{G} "a <lora:nope:0.8> circle"', ["--prompt", "<lora:nope>", "it has: style"]),
    ("lora-dir-missing", f'{G} "a <lora:style>" --lora-dir {{d}}/none', ["--prompt", "--lora-dir", "does not exist"]),
    ("lora-tag-weight-word", f'{G} "<lora:style:strong>"', ["--prompt", "weight 'strong'"]),
    ("lora-tag-window", f'{G} "<lora:style:1:0.9-0.1>"', ["--prompt", "window"]),
    ("negative-lora-unknown", f'{G} a --negative-prompt "<lora:gone>"', ["--negative-prompt", "<lora:gone>"]),
    ("embedding-unknown-name", f'{G} "a <embedding:nope>"', ["--prompt", "<embedding:nope>", "it has: star"]),
    ("weight-nan", f'{G} "a (red:nan) circle"', ["--prompt", "weight 'nan'", "finite"]),
    ("weight-inf", f'{G} "a (red:-inf) circle"', ["--prompt", "weight '-inf'"]),
    ("weight-two-dots", f'{G} "a (red:1.2.3) circle"', ["--prompt", "'1.2.3'"]),
    ("negative-weight-nan", f'{G} a --negative-prompt "(grey:nan)"', ["--negative-prompt", "'nan'"]),
]


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    d = tmp_path_factory.mktemp("habits")
    (d / "loras").mkdir()
    g = torch.Generator().manual_seed(0)
    _lora(d / "loras" / "style.safetensors", torch.randn(4, 64, generator=g) * 0.01, torch.randn(64, 4, generator=g) * 0.01)
    (d / "embeddings").mkdir()
    save_file({"<star>": torch.randn(1, 64, generator=g)}, str(d / "embeddings" / "star.safetensors"))
    Image.new("RGB", (32, 32), "white").save(d / "plain.png")  # no parameters
    return d


@pytest.mark.parametrize("argv,words", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input(argv, words, fixtures, capsys, monkeypatch):
    monkeypatch.chdir(fixtures)
    before = snapshot(fixtures)
    rc, _, err = run_cli(shlex.split(argv.format(d=fixtures)), capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err
    for w in words:
        assert w in lines[0], f"{w!r} not in: {lines[0]}"
    assert snapshot(fixtures) == before, "files were written, changed or deleted"


def test_unclosed_bracket_is_lenient_as_in_a1111(fixtures, capsys, tmp_path):
    """'(red circle' weights everything after '(' by 1.1, as '(red circle)' does: the same picture."""
    pics = []
    for i, prompt in enumerate(["a (red circle", "a (red circle)"]):
        out = tmp_path / f"{i}.png"
        rc, _, err = run_cli(["generate", "--steps", "2", "--prompt", prompt, "--out", str(out)], capsys)
        assert rc == 0, err
        pics.append(np.asarray(Image.open(out)))
    assert np.array_equal(*pics)


def test_pseudo_token_without_embedding_warns(fixtures, capsys, caplog, tmp_path):
    rc, _, err = run_cli(["generate", "--steps", "1", "--prompt", "a <star-shape>", "--out", str(tmp_path / "a.png")], capsys)
    assert rc == 0 and "<star-shape>" in caplog.text and "no embedding" in caplog.text, err
    caplog.clear()
    rc, _, err = run_cli(["generate", "--steps", "1", "--prompt", "a <embedding:star>", "--embedding-dir",
                          str(fixtures / "embeddings"), "--out", str(tmp_path / "b.png")], capsys)
    assert rc == 0 and "no embedding" not in caplog.text, err

