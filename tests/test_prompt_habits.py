"""Bad input for the A1111 habits (prompt weights and tags, seeds and batch counts, PNG parameters), run
through the CLI as tests/test_bad_inputs.py does: exit 2, one line naming the flag or file, nothing written."""
import re
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


# ---------------------------------------------------------------- seeds, batch count, grid, PNG parameters

@pytest.mark.parametrize("kind,scheduler", [("txt2img", "euler-a"), ("img2img", "ddim"), ("inpaint", "ddpm")])
def test_image_i_of_a_batch_is_seed_plus_i_alone(tiny, photo, half_mask, kind, scheduler):
    """Every draw of image i (start noise, VAE sample, an ancestral sampler's fresh noise) comes from seed + i."""
    from sdknobs.pipelines import _run

    kw = dict(steps=3, guidance=3.0, scheduler=scheduler, width=32, height=32, progress=False)
    more = {"txt2img": {}, "img2img": dict(image=photo, strength=0.6), "inpaint": dict(image=photo, mask=half_mask, strength=0.8)}[kind]
    batch, _ = _run(tiny, "a red circle", "", seed=7, batch=3, **more, **kw)
    for i in range(3):
        alone, _ = _run(tiny, "a red circle", "", seed=7 + i, batch=1, **more, **kw)
        torch.testing.assert_close(batch[i : i + 1], alone, atol=1e-4, rtol=0)  # batched vs alone: float rounding


def test_batch_count_files_seeds_and_grid(tiny_dir, capsys, tmp_path):
    out = tmp_path / "x.png"
    rc, stdout, err = run_cli(["generate", "--model", str(tiny_dir), "--prompt", "a", "--steps", "2", "--seed", "5",
                               "--batch", "2", "--batch-count", "2", "--out", str(out)], capsys)
    assert rc == 0, err
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["x-0.png", "x-1.png", "x-2.png", "x-3.png", "x-grid.png"]
    seeds = [Image.open(tmp_path / f"x-{i}.png").info["parameters"].split("Seed: ")[1].split(",")[0] for i in range(4)]
    assert seeds == ["5", "6", "7", "8"]
    assert Image.open(tmp_path / "x-grid.png").size == (2 * 36 + 4, 2 * 36 + 4)  # 2 runs down, 2 images across
    rc, _, err = run_cli(["generate", "--model", str(tiny_dir), "--prompt", "a", "--steps", "2", "--batch-count", "2",
                          "--out", str(out)], capsys)  # x-0.png, x-1.png and the grid exist
    assert rc == 2 and "x-0.png" in err and "--overwrite" in err


def test_png_info_and_from_png_re_render_one_image(tiny_dir, capsys, tmp_path):
    base = ["--model", str(tiny_dir), "--steps", "2"]
    rc, _, err = run_cli(["generate", *base, "--prompt", "a (red:1.3) circle", "--negative-prompt", "grey", "--seed", "11",
                          "--batch", "3", "--guidance", "2.5", "--scheduler", "euler", "--out", str(tmp_path / "b.png")], capsys)
    assert rc == 0, err
    rc, text, _ = run_cli(["png-info", str(tmp_path / "b-2.png")], capsys)
    assert rc == 0 and text.startswith("a (red:1.3) circle\nNegative prompt: grey\n") and "Seed: 13" in text
    rc, _, err = run_cli(["generate", "--model", str(tiny_dir), "--from-png", str(tmp_path / "b-2.png"),
                          "--out", str(tmp_path / "again.png")], capsys)
    assert rc == 0, err
    again, orig = Image.open(tmp_path / "again.png"), Image.open(tmp_path / "b-2.png")
    assert np.abs(np.asarray(again, dtype=int) - np.asarray(orig, dtype=int)).max() <= 1  # batched vs alone: float noise
    assert again.info["parameters"] == re.sub(r", Batch size: 3, Batch pos: 2", "", orig.info["parameters"])
    rc, _, err = run_cli(["generate", "--model", str(tiny_dir), "--from-png", str(tmp_path / "b-2.png"), "--seed", "1",
                          "--prompt", "a square", "--out", str(tmp_path / "other.png")], capsys)
    params = Image.open(tmp_path / "other.png").info["parameters"]
    assert rc == 0 and params.startswith("a square\nNegative prompt: grey\n") and "Seed: 1," in params and "Euler" in params


HABIT_FILES = [
    ("png-info-no-parameters", "png-info {d}/plain.png", ["plain.png", "no 'parameters'"]),
    ("png-info-missing", "png-info {d}/gone.png", ["gone.png", "no such file"]),
    ("png-info-not-a-picture", "png-info {d}/loras/style.safetensors", ["style.safetensors", "not a readable picture"]),
    ("from-png-missing", "generate --from-png {d}/gone.png --out {d}/out/x.png", ["--from-png", "gone.png", "no such file"]),
    ("from-png-no-parameters", "generate --from-png {d}/plain.png --out {d}/out/x.png", ["--from-png", "no 'parameters'"]),
    ("batch-count-0", "generate --prompt a --batch-count 0 --out {d}/out/x.png", ["--batch-count"]),
    ("prompt-or-from-png", "generate --out {d}/out/x.png", ["--prompt", "required", "--from-png"]),
]


@pytest.mark.parametrize("argv,words", [c[1:] for c in HABIT_FILES], ids=[c[0] for c in HABIT_FILES])
def test_bad_files(argv, words, fixtures, capsys, monkeypatch):
    test_bad_input(argv, words, fixtures, capsys, monkeypatch)


def test_from_png_names_lora_flags_it_does_not_re_apply(tiny_dir, capsys, caplog, tmp_path):
    from test_lora import random_lora

    from sdknobs import load_model
    from sdknobs.lora.files import write_lora

    m = load_model(tiny_dir)
    (tmp_path / "loras").mkdir()
    flag = write_lora(random_lora(m), tmp_path / "flag.safetensors")
    write_lora(random_lora(m, seed=1), tmp_path / "loras" / "tagged.safetensors")
    base = ["generate", "--model", str(tiny_dir), "--steps", "1", "--lora-dir", str(tmp_path / "loras")]
    rc, _, err = run_cli([*base, "--prompt", "a <lora:tagged:0.5>", "--lora", f"{flag}:0.7", "--out", str(tmp_path / "a.png")],
                         capsys)
    assert rc == 0, err
    rc, _, err = run_cli([*base, "--from-png", str(tmp_path / "a.png"), "--out", str(tmp_path / "b.png")], capsys)
    assert rc == 0, err
    assert f"--lora {flag}:0.7, which --from-png does not re-apply" in caplog.text and "tagged" not in caplog.text
    assert "Lora hashes: \"tagged: " in Image.open(tmp_path / "b.png").info["parameters"]  # the tag is re-applied
