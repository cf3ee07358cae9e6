"""--save-every N (usable LoRA / embedding files in the run folder, kohya's NAME-000200 names, equal to the
weights at that step) and --sample-prompts FILE (kohya's per-line options, pictures at every validation, bad
lines refused by file and line before anything is written)."""
import json

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from sdknobs import SdknobsError, load_model
from sdknobs.cli import main
from sdknobs.lora.train import LoraTrainConfig, train_lora
from sdknobs.pipelines import generate
from sdknobs.shapes import world
from sdknobs.ti.train import TITrainConfig, train_ti
from sdknobs.training.samples import SamplePrompt, parse_line, read_sample_prompts


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return world.write_dataset(tmp_path_factory.mktemp("se") / "hearts", 4, seed=0, kinds=("heart",), p_two=0)


def lora_cfg(data, tmp_path, **kw):
    base = dict(data_dir=str(data), out=str(tmp_path / "out" / "x.safetensors"), steps=4, batch_size=2, rank=2,
                learning_rate=5e-3, instance_token="sks", class_word="shape", validate_every=0, checkpoint_every=0,
                progress=False, cache_latents=True)
    return LoraTrainConfig(**{**base, **kw})


def tensors_meta(path):
    with safe_open(str(path), "pt") as f:
        return load_file(str(path)), f.metadata()


def test_lora_save_every_equals_weights_at_that_step(data, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# comment\na red sks shape --d 7 --s 2 --l 2.5\n\na blue sks shape --n green --s 2 --w 32 --h 32\n")
    cfg = lora_cfg(data, tmp_path, save_every=2, sample_prompts=str(prompts), validate_every=2)
    res, _ = train_lora(cfg, log=lambda m: None)
    run = res.run_dir
    assert sorted(p.name for p in run.glob("x-*.safetensors")) == ["x-000002.safetensors", "x-000004.safetensors"]
    last, last_meta = tensors_meta(run / "x-000004.safetensors")
    final, final_meta = tensors_meta(res.out)
    assert last.keys() == final.keys() and all(torch.equal(last[k], final[k]) for k in final)
    assert last_meta == final_meta and final_meta["sdknobs.steps"] == "4"
    mid, mid_meta = tensors_meta(run / "x-000002.safetensors")
    assert mid_meta["sdknobs.steps"] == "2" and mid_meta["ss_network_dim"] == "2"
    assert not all(torch.equal(mid[k], final[k]) for k in final)
    # the step-2 file is the weights after 2 steps: a separate 2-step run ends with the same tensors
    res2, _ = train_lora(lora_cfg(data, tmp_path / "b", steps=2), log=lambda m: None)
    two = load_file(str(res2.out))
    assert all(torch.equal(two[k], mid[k]) for k in two)
    # usable with --lora, as the final file
    m = load_model("shapes")
    a = generate(m, "a sks shape", steps=2, seed=0, progress=False, lora=[str(run / "x-000002.safetensors")]).images[0]
    b = generate(m, "a sks shape", steps=2, seed=0, progress=False).images[0]
    assert a.tobytes() != b.tobytes()
    # sample pictures at steps 0, 2, 4, one per prompt line, with the line's options in their parameters
    pics = sorted(p.name for p in (run / "samples").iterdir())
    assert pics == [f"{s:06d}-{i:02d}.png" for s in (0, 2, 4) for i in (0, 1)]
    p0 = Image.open(run / "samples" / "000004-00.png").text["parameters"]
    p1 = Image.open(run / "samples" / "000004-01.png").text["parameters"]
    assert p0.startswith("a red sks shape\n") and "Seed: 7" in p0 and "CFG scale: 2.5" in p0 and "Steps: 2" in p0
    assert "Negative prompt: green" in p1 and "Training step: 4" in p1 and "prompts.txt line 4" in p1
    hist = json.loads((run / "history.json").read_text())
    assert hist["saved"] == ["x-000002.safetensors", "x-000004.safetensors"] and len(hist["samples"]) == 6


def test_ti_save_every(data, tmp_path):
    from sdknobs.ti.files import read_embedding

    cfg = TITrainConfig(data_dir=str(data), out=str(tmp_path / "e" / "h.safetensors"), token="<h>", init_word="shape",
                        template="captions", caption_word="shape", steps=2, batch_size=2, save_every=1,
                        validate_every=0, checkpoint_every=0, progress=False, cache_latents=True)
    res, _ = train_ti(cfg, log=lambda m: None)
    files = sorted(res.run_dir.glob("h-*.safetensors"))
    assert [p.name for p in files] == ["h-000001.safetensors", "h-000002.safetensors"]
    one, two, final = (read_embedding(str(p)) for p in (*files, res.out))
    assert torch.equal(two.vectors, final.vectors) and not torch.equal(one.vectors, final.vectors)
    assert one.token == "<h>" and one.metadata.get("steps") == "1"


def test_existing_save_every_file_is_refused(data, tmp_path):
    run = tmp_path / "out" / "x-run"
    run.mkdir(parents=True)
    theirs = run / "x-000002.safetensors"
    theirs.write_bytes(b"not ours")
    with pytest.raises(SdknobsError, match="x-000002.safetensors exists .* --overwrite"):
        train_lora(lora_cfg(data, tmp_path, save_every=2), log=lambda m: None)
    assert theirs.read_bytes() == b"not ours" and not (tmp_path / "out" / "x.safetensors").exists()
    assert sorted(p.name for p in run.iterdir()) == ["x-000002.safetensors"]


def test_parse_line_kohya_options():
    sp = parse_line("a red circle, white background --n blurry, dark --s 12 --l 3.5 --d 9 --w 64 --h 48", "f line 3")
    assert sp == SamplePrompt("a red circle, white background", 3, "blurry, dark", 12, 3.5, 9, 64, 48)
    assert parse_line("just a prompt", "f line 1") == SamplePrompt("just a prompt", 1)
    assert parse_line("upper case --S 5 --D 1", "f line 2").steps == 5  # kohya matches options case-insensitively


@pytest.mark.parametrize("line, words", [
    ("a cat --x 3", "line 2: unknown option --x"),
    ("a cat --s 0", "line 2: --s (steps) must be >= 1"),
    ("a cat --s five", "line 2: --s (steps) must be a whole number"),
    ("a cat --w 30", "line 2: --w (width) must be a multiple of 8"),
    ("a cat --l nan", "line 2: --l (guidance) must be a finite number"),
    ("a cat --d -1", "line 2: --d (seed) must be a whole number"),
    ("a cat --n", "line 2: --n needs a value"),
    ("a cat --s 2 --s 3", "line 2: --s given twice"),
    ("--s 3", "line 2: expected a prompt"),
])
def test_bad_lines_name_file_and_line(tmp_path, line, words):
    f = tmp_path / "p.txt"
    f.write_text(f"fine prompt --s 3\n{line}\n")
    with pytest.raises(SdknobsError, match="p.txt " + words.replace("(", r"\(").replace(")", r"\)")):
        read_sample_prompts(f)


def test_cli_bad_sample_prompts_exit_2_before_training(data, tmp_path, capsys):
    f = tmp_path / "p.txt"
    f.write_text("ok\nbad --q 1\n")
    out = tmp_path / "o" / "x.safetensors"
    for extra in ([], ["--validate-every", "0"]):
        code = main(["train-lora", str(data), "--out", str(out), "--sample-prompts", str(f), *extra])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and f"{f} line 2: unknown option --q" in err
    empty = tmp_path / "e.txt"
    empty.write_text("# only a comment\n")
    assert main(["train-lora", str(data), "--out", str(out), "--sample-prompts", str(empty)]) == 2
    assert "no prompts in it" in capsys.readouterr().err
    f.write_text("ok\n")
    assert main(["train-lora", str(data), "--out", str(out), "--sample-prompts", str(f), "--validate-every", "0"]) == 2
    assert "--validate-every 0 never validates" in capsys.readouterr().err
    assert main(["train-lora", str(data), "--out", str(out), "--save-every", "-1"]) == 2
    assert "--save-every must be >= 0" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
