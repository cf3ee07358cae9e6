"""`sdknobs dataset`: the docs' training folders, identical to the data the results pages were measured on.

References: the results scripts' own data calls (`lora/results.py`, `ti/results.py`: `world.write_dataset`,
`class_images`' prompts sampled with `shapes.bench.sample`), run here beside ours."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdknobs.cli import main
from sdknobs.shapes import world


def run(argv, cwd, capsys):
    old = os.getcwd()
    os.chdir(cwd)
    try:
        rc = main(["dataset", *argv])
    finally:
        os.chdir(old)
    out, err = capsys.readouterr()
    return rc, out, err


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def same_folder(ours: Path, ref: Path, *, caption=lambda s: s):
    """Every picture bit-identical, every caption equal (after `caption` on ours), the same file names."""
    a, b = files(ours), files(ref)
    pics = sorted(n for n in b if n.endswith(".png"))
    assert sorted(n for n in a if n.endswith(".png")) == pics and pics
    for n in pics:
        assert np.array_equal(np.asarray(Image.open(ours / n)), np.asarray(Image.open(ref / n))), n
        t = n[:-4] + ".txt"
        assert caption(a[t].decode()) == b[t].decode(), t


def test_style_and_subject_sets_are_the_results_data(tmp_path, capsys):
    from sdknobs.ti.results import TOKEN, datasets

    ref = tmp_path / "ref"
    ti_star, ti_striped = datasets(ref, 20, 0)  # ti/results.py's two concepts (seed 0 -> 11, 12)
    lora_style = world.write_dataset(ref / "outline", 100, seed=1, styles=("outline",))  # lora/results.py style_data
    lora_subject = world.write_dataset(ref / "hearts", 16, seed=1, kinds=("heart",), p_two=0)  # run_subject

    for argv, reference, fix in (
        (["style", "--out", "outline"], lora_style, None),
        (["style", "--style", "striped", "--out", "striped"], ti_striped, None),
        (["subject", "--out", "hearts"], lora_subject, None),
        (["subject", "--kind", "star", "--token", TOKEN, "--out", "stars-token"], ti_star, None),
        # plain "shape" captions: train-ti --template captions --caption-word shape puts the token there
        (["subject", "--kind", "star", "--out", "stars"], ti_star, lambda s: s.replace("shape", TOKEN)),
    ):
        rc, out, err = run(argv, tmp_path, capsys)
        assert rc == 0, err
        folder = tmp_path / argv[-1]
        n = len(list(reference.glob("*.png")))
        assert out.strip() == f"wrote {n} images (32x32 px) and {n} captions (.txt beside each) to {argv[-1]}"
        assert "picture" in err  # the progress bar
        same_folder(folder, reference, **({"caption": fix} if fix else {}))
        ours, theirs = world.read_truth(folder), world.read_truth(reference)  # scenes for the analyzers
        assert [{**r, "caption": (fix or str)(r["caption"])} for r in ours] == theirs
    assert "outlined" in (tmp_path / "outline" / "00000.txt").read_text()
    assert all(" shape" in p.read_text() and "heart" not in p.read_text() for p in (tmp_path / "hearts").glob("*.txt"))


def test_seed_count_and_the_trainers_reader(tmp_path, capsys):
    from sdknobs.training.data import read_folder

    for name, seed in (("a", "5"), ("b", "5"), ("c", "6")):
        rc, _, err = run(["shapes", "--count", "12", "--seed", seed, "--size", "16", "--no-progress", "--out", name],
                         tmp_path, capsys)
        assert rc == 0 and err == ""
    a, b, c = (files(tmp_path / n) for n in "abc")
    assert a == b and a != c
    assert len([n for n in a if n.endswith(".png")]) == 12 and len([n for n in a if n.endswith(".txt")]) == 12
    ex = read_folder(tmp_path / "a", resolution=16)  # what train-lora / train-ti read
    assert len(ex) == 12 and [e.caption for e in ex] == [a[Path(e.path).stem + ".txt"].decode().strip() for e in ex]
    assert Image.open(tmp_path / "a" / "00000.png").size == (16, 16)
    # --overwrite replaces a folder this command wrote, and only such a folder
    rc, out, _ = run(["shapes", "--count", "3", "--seed", "5", "--size", "16", "--overwrite", "--out", "a"], tmp_path, capsys)
    assert rc == 0 and len(list((tmp_path / "a").glob("*.png"))) == 3
    assert files(tmp_path / "a")["00000.png"] == b["00000.png"]


def test_class_set_is_the_models_own_pictures(tmp_path, capsys):
    from sdknobs.lora.results import captions, prompt_scenes
    from sdknobs.model import load_model
    from sdknobs.shapes.bench import sample

    rc, out, err = run(["class", "--count", "3", "--steps", "2", "--out", "class"], tmp_path, capsys)
    assert rc == 0, err
    assert out.strip() == "wrote 3 images (the model's size) and 3 captions (.txt beside each) to class"
    scenes = prompt_scenes(24, 99, ("heart",))[:3]  # lora/results.py class_images: 24 prompts, sampler seed 100
    caps = captions(scenes)
    ref = sample(load_model("shapes", device="cpu", dtype="fp32"), caps, steps=2, guidance=3.0, seed=100, progress=False)
    for i, (im, cap) in enumerate(zip(ref, caps)):
        assert np.array_equal(np.asarray(Image.open(tmp_path / "class" / f"{i:05d}.png")), np.asarray(im))
        assert (tmp_path / "class" / f"{i:05d}.txt").read_text() == cap + "\n"
        assert " shape " in cap and "heart" not in cap


@pytest.mark.parametrize("argv, words", [
    (["bogus", "--out", "x"], "invalid choice: 'bogus'"),
    (["style", "--style", "dotted", "--out", "x"], "--style 'dotted'"),
    (["subject", "--kind", "dragon", "--out", "x"], "--kind 'dragon'"),
    (["shapes", "--count", "0", "--out", "x"], "--count must be in 1..100000"),
    (["shapes", "--seed", "-1", "--out", "x"], "--seed must be an integer >= 0"),
    (["shapes", "--size", "30", "--out", "x"], "--size 30 is not a multiple of 8"),
    (["shapes", "--two-shapes", "1.5", "--out", "x"], "--two-shapes must be a fraction"),
    (["shapes", "--two-shapes", "nan", "--out", "x"], "not a finite number"),
    (["style", "--steps", "2", "--out", "x"], "--steps applies to the class set only"),
    (["style", "--token", "sks", "--out", "x"], "--token applies to the subject set only"),
    (["class", "--size", "64", "--out", "x"], "--size does not apply to the class set"),
    (["class", "--count", "500", "--out", "x"], "at most 180 distinct prompts"),
    (["class", "--model", "no/such/model", "--out", "x"], "no/such/model"),
    (["shapes", "--out", "full"], "is a folder that is not empty"),
    (["shapes", "--out", "full", "--overwrite"], "holds files sdknobs dataset did not write"),
    (["shapes", "--out", "afile"], "is a file"),
    (["shapes"], "--out"),
])
def test_bad_inputs_exit_2_one_line_nothing_written(tmp_path, capsys, argv, words):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "mine.jpg").write_bytes(b"the user's own")
    (tmp_path / "afile").write_text("keep")
    before = {p: p.read_bytes() if p.is_file() else None for p in tmp_path.rglob("*")}
    try:
        rc, out, err = run(argv, tmp_path, capsys)
    except SystemExit as e:  # argparse's own refusals
        rc, (out, err) = e.code, capsys.readouterr()
    assert rc == 2
    assert len(err.strip().splitlines()) == 1 and words in err, err
    assert {p: p.read_bytes() if p.is_file() else None for p in tmp_path.rglob("*")} == before
