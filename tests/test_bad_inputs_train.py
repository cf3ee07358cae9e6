"""Bad input to the training commands (train-lora, train-ti, pretrain, lora/ti trace-step), table-driven and
in-process: every case exits 2 with one line naming what is wrong, no traceback, nothing written and nothing
deleted anywhere under the test's folder (and nothing inside the installed package). A valid run's files keep
the umask's modes."""
import os
import shutil
from pathlib import Path

import pytest

import sdknobs
from sdknobs.cli import main

PKG = Path(sdknobs.__file__).resolve().parent
BIG_SEED, LOW_SEED = str(2**64), str(-(2**63) - 1)


def lora(*extra, data="{data}"):
    return ["train-lora", data, "--model", "{tiny}", "--out", "{tmp}/o/w.safetensors", "--steps", "2",
            "--validate-every", "0", "--no-progress", *extra]


def ti(*extra, data="{data}"):
    return ["train-ti", data, "--model", "{tiny}", "--token", "<bad-case>", "--init-word", "shape", "--steps", "2",
            "--validate-every", "0", "--no-progress", "--out", "{tmp}/o/e.safetensors", *extra]


def pretrain(*extra):
    return ["pretrain", "--out", "{tmp}/m", "--run-dir", "{tmp}/r", "--image-size", "16", "--vae-channels", "8,16,16",
            "--unet-channels", "16,32", "--layers-per-block", "1", "--text-width", "16", "--vae-steps", "2",
            "--unet-steps", "2", "--latent-pool", "8", "--val-size", "4", "--sample-steps", "0", "--threads", "1",
            "--no-progress", *extra]


# --- set-ups: each makes what the case needs under tmp (the user's files, checked untouched afterwards) ---
def images(tmp, n=2, caption=lambda i: f"a red shape {i}".encode(), jsonl=None):
    from PIL import Image

    d = tmp / "d"
    d.mkdir(exist_ok=True)
    for i in range(n):
        Image.new("RGB", (32, 32), (200, 30, 30)).save(d / f"img{i}.png")
        if caption(i) is not None:
            (d / f"img{i}.txt").write_bytes(caption(i))
    if jsonl is not None:
        (d / "metadata.jsonl").write_bytes(jsonl)


def bad_caption(raw):
    return lambda tmp: images(tmp, caption=lambda i: raw if i == 1 else b"a red shape")


def out_is(kind):
    def setup(tmp):
        (tmp / "o").mkdir()
        if kind == "folder":
            (tmp / "o" / "w.safetensors").mkdir()
            (tmp / "o" / "w.safetensors" / "mine.txt").write_text("the user's")
        elif kind == "file":
            (tmp / "o" / "w.safetensors").write_bytes(b"the user's own file")
        elif kind == "readonly":
            os.chmod(tmp / "o", 0o555)
    return setup


def parent_file(tmp):
    (tmp / "o").write_text("a file where a folder should be")


def copy_run(finished, with_out=True):
    def setup(tmp):
        shutil.copytree(finished, tmp / "o")
        if not with_out:
            (tmp / "o" / "w.safetensors").unlink()
    return setup


DATA_CASES = [
    ("data-missing", lora(data="{tmp}/nope"), ["no such folder"], None),
    ("data-is-file", lora(data="{tmp}/f.png"), ["is a file; expected a folder"], lambda t: (t / "f.png").write_bytes(b"x")),
    ("data-empty", lora(data="{tmp}/d"), ["no images found"], lambda t: (t / "d").mkdir()),
    ("data-unreadable-image", lora(data="{tmp}/d"), ["img0.png", "not a readable image"],
     lambda t: (images(t), (t / "d" / "img0.png").write_bytes(b"not a png"))),
    ("caption-binary", lora(data="{tmp}/d"), ["img1.txt", "not a text file", "byte offset 2"], bad_caption(b"ab\x00\x01")),
    ("caption-latin1", lora(data="{tmp}/d"), ["img1.txt", "not UTF-8", "byte offset 5"], bad_caption("a red\xe9".encode("latin-1"))),
    ("caption-missing", lora(data="{tmp}/d"), ["img1.png", "has no caption", "img1.txt"],
     lambda t: images(t, caption=lambda i: None if i == 1 else b"a shape")),
    ("jsonl-binary", lora(data="{tmp}/d"), ["metadata.jsonl", "not a text file", "byte offset 0"],
     lambda t: images(t, jsonl=b"\x00\x01\x02")),
    ("jsonl-not-utf8", lora(data="{tmp}/d"), ["metadata.jsonl", "not UTF-8", "byte offset 15"],
     lambda t: images(t, jsonl=b'{"file_name": "\xff"}')),
    ("jsonl-bad-json", lora(data="{tmp}/d"), ["metadata.jsonl line 1", "not valid JSON"], lambda t: images(t, jsonl=b"{oops")),
    ("jsonl-twice", lora(data="{tmp}/d"), ["lines 1 and 2 both caption 'img0.png'"],
     lambda t: images(t, jsonl=b'{"file_name": "img0.png", "text": "a"}\n{"file_name": "img0.png", "text": "b"}')),
    ("class-data-missing", lora("--class-data-dir", "{tmp}/nope"), ["--class-data-dir", "no such folder"], None),
    ("repeats-huge", lora("--repeats", "1000000000"), ["--repeats 1000000000 x 2 images", "at most 10,000,000"], None),
    ("validation-split-too-big", lora("--validation-split", "9", "--validate-every", "1"),
     ["--validation-split 9 leaves no training images"], None),
    ("ti-data-missing", ti(data="{tmp}/nope"), ["no such folder"], None),
]

NUMBER_CASES = [
    ("lr-nan", lora("--learning-rate", "nan"), ["--learning-rate", "finite"], None),
    ("lr-inf", lora("--learning-rate", "inf"), ["--learning-rate", "finite"], None),
    ("lr-overflow", lora("--learning-rate", "1e999"), ["--learning-rate", "finite"], None),
    ("lr-zero", lora("--learning-rate", "0"), ["--learning-rate must be > 0, got 0.0"], None),
    ("lr-negative", lora("--learning-rate=-1e-4"), ["--learning-rate must be > 0"], None),
    ("alpha-nan", lora("--alpha", "nan"), ["--alpha", "finite"], None),
    ("alpha-negative", lora("--alpha=-2"), ["--alpha must be >= 0"], None),
    ("rank-zero", lora("--rank", "0"), ["--rank must be >= 1, got 0"], None),
    ("rank-above-layers", lora("--rank", "100000"), ["--rank 100000 is above the size of every target layer"], None),
    ("validation-steps-huge", lora("--validation-prompts", "a red circle", "--validation-steps", "100000",
                                   "--validate-every", "1"), ["--validation-steps", "1..1000"], None),
    ("steps-zero", lora("--steps", "0"), ["--steps must be >= 1, got 0"], None),
    ("steps-negative", lora("--steps=-3"), ["--steps must be >= 1, got -3"], None),
    ("batch-zero", lora("--batch-size", "0"), ["--batch-size must be >= 1, got 0"], None),
    ("batch-huge", lora("--batch-size", "100000000000"), ["--batch-size 100000000000", "GiB of memory"], None),
    ("grad-accum-zero", lora("--grad-accum", "0"), ["--grad-accum must be >= 1"], None),
    ("seed-too-big", lora("--seed", BIG_SEED), ["--seed", "outside the seeds torch accepts", "18446744073709551615"], None),
    ("seed-too-small", lora(f"--seed={LOW_SEED}"), ["--seed", "-9223372036854775808 to 18446744073709551615"], None),
    ("validation-seed-too-big", lora("--validation-seeds", BIG_SEED), ["--validation-seeds", "outside the seeds"], None),
    ("caption-dropout-one", lora("--caption-dropout", "1"), ["--caption-dropout must be in [0, 1)"], None),
    ("caption-dropout-nan", lora("--caption-dropout", "nan"), ["--caption-dropout", "finite"], None),
    ("weight-decay-inf", lora("--weight-decay", "inf"), ["--weight-decay", "finite"], None),
    ("grad-norm-nan", lora("--max-grad-norm", "nan"), ["--max-grad-norm", "finite"], None),
    ("noise-offset-inf", lora("--noise-offset=-inf"), ["--noise-offset", "finite"], None),
    ("min-snr-negative", lora("--min-snr-gamma=-1"), ["--min-snr-gamma must be >= 0"], None),
    ("text-encoder-lr-nan", lora("--text-encoder-lr", "nan"), ["--text-encoder-lr", "finite"], None),
    ("resolution-not-multiple", lora("--resolution", "30"), ["--resolution 30 is not a multiple of 8"], None),
    ("resolution-huge", lora("--resolution", "100000"), ["--resolution 100000 is above 4096"], None),
    ("ti-vectors-zero", ti("--vectors", "0"), ["--vectors must be between 1 and 8, got 0"], None),
    ("ti-vectors-nine", ti("--vectors", "9"), ["--vectors must be between 1 and 8, got 9"], None),
    ("ti-lr-nan", ti("--learning-rate", "nan"), ["--learning-rate", "finite"], None),
    ("ti-seed-too-big", ti("--seed", BIG_SEED), ["--seed", "outside the seeds torch accepts"], None),
    ("pretrain-lr-nan", pretrain("--unet-lr", "nan"), ["--unet-lr", "finite"], None),
    ("pretrain-kl-inf", pretrain("--vae-kl-weight", "inf"), ["--vae-kl-weight", "finite"], None),
    ("pretrain-seed-too-big", pretrain("--seed", BIG_SEED), ["--seed", "outside the seeds torch accepts"], None),
    ("pretrain-steps-zero", pretrain("--vae-steps", "0"), ["--vae-steps must be > 0"], None),
    ("pretrain-threads-huge", pretrain("--threads", "100000"), ["--threads 100000: at most"], None),
    ("pretrain-image-huge", pretrain("--image-size", "65536"), ["GiB of memory", "--image-size"], None),
    ("pretrain-channels-huge", pretrain("--unet-channels", "1000000,1000000"), ["GiB of memory", "--unet-channels"], None),
    ("pretrain-pool-huge", pretrain("--latent-pool", "100000000000"), ["GiB of memory", "--latent-pool"], None),
    ("lora-trace-rank-zero", ["lora", "trace-step", "--model", "{tiny}", "--rank", "0"], ["--rank must be >= 1"], None),
    ("lora-trace-lr-inf", ["lora", "trace-step", "--model", "{tiny}", "--learning-rate", "inf"],
     ["--learning-rate", "finite"], None),
    ("ti-trace-vectors-zero", ["ti", "trace-step", "--model", "{tiny}", "--vectors", "0"], ["--vectors"], None),
]

SETTING_CASES = [
    ("targets-unknown", lora("--targets", "nonsense["), ["--targets", "neither a preset"], None),
    ("targets-match-nothing", lora("--targets", "no_such_layer"), ["--targets", "matches no"], None),
    ("subject-half", lora("--instance-token", "sks"), ["--instance-token", "--class-word"], None),
    ("ti-token-spaces", ti("--token", "my shape"), ["--token 'my shape' must be one word"], None),
    ("ti-token-capitals", ti("--token", "<MyShape>"), ["--token '<MyShape>' has capital letters"], None),
    ("ti-token-known", ti("--token", "shape"), ["--token 'shape'", "already in the tokenizer"], None),
    ("ti-init-word-two", ti("--init-word", "red shape"), ["--init-word 'red shape' must be one word"], None),
    ("ti-trace-data-missing", ["ti", "trace-step", "--model", "{tiny}", "--data-dir", "{tmp}/nope"], ["no such folder"], None),
    ("lora-trace-data-missing", ["lora", "trace-step", "{tmp}/nope", "--model", "{tiny}"], ["no such folder"], None),
    ("fp16-on-cpu", lora("--mixed-precision", "fp16", "--device", "cpu"), ["--mixed-precision fp16 needs a GPU"], None),
    ("device-unknown", lora("--device", "tpu9"), ["--device 'tpu9'"], None),
    ("device-mps", lora("--device", "mps"), ["--device 'mps'", "cpu or cuda"], None),
    ("pretrain-device-mps", pretrain("--device", "mps"), ["--device 'mps'"], None),
]

PATH_CASES = [
    ("out-is-folder", lora(), ["--out", "is a folder"], out_is("folder")),
    ("out-exists", lora(), ["--out", "already exists", "--overwrite"], out_is("file")),
    ("out-parent-is-file", lora(), ["--out", "is a file, not a folder"], parent_file),
    ("out-folder-readonly", lora(), ["--out", "not writable", "/o"], out_is("readonly")),
    ("out-not-safetensors", lora("--out", "{tmp}/o/w.bin"), ["--out", "must end in .safetensors"], None),
    ("ti-out-exists", ti("--out", "{tmp}/o/w.safetensors"), ["--out", "already exists"], out_is("file")),
    ("run-dir-is-file", lora("--run-dir", "{tmp}/run"), ["--run-dir", "is a file; expected a folder"],
     lambda t: (t / "run").write_text("x")),
    ("resume-nothing", lora("--resume"), ["--resume: no checkpoint in --run-dir"], None),
    ("resume-overwrite-nothing", lora("--resume", "--overwrite"), ["--resume: no checkpoint in --run-dir"], None),
    ("keep-checkpoints-negative", lora("--keep-checkpoints=-1"), ["--keep-checkpoints must be >= 0"], None),
    ("finished-run-again", lora(), ["finished run", "--resume", "--overwrite"], "finished"),
    ("checkpoints-without-resume", lora(), ["already holds checkpoints", "--resume", "--overwrite"], "finished-no-out"),
    ("resume-other-batch", lora("--resume", "--batch-size", "3"), ["--resume: --batch-size was 1", "now 3"], "finished-no-out"),
    ("resume-fewer-steps", lora("--resume", "--steps", "1"), ["--resume", "at step 2, beyond --steps 1"], "finished-no-out"),
    ("pretrain-out-in-package", pretrain("--out", str(PKG / "assets" / "models" / "bad-case")),
     ["--out", "inside the installed sdknobs package"], None),
    ("pretrain-run-dir-in-package", pretrain("--run-dir", str(PKG / "bad-case-run")), ["--run-dir", "inside the installed"], None),
    ("pretrain-out-shipped-model", pretrain("--out", str(PKG / "assets" / "models" / "shapes"), "--overwrite"),
     ["inside the installed sdknobs package"], None),
    ("pretrain-out-not-empty", pretrain(), ["--out", "not empty"],
     lambda t: ((t / "m").mkdir(), (t / "m" / "mine.txt").write_text("the user's"))),
    ("pretrain-out-is-file", pretrain(), ["--out", "is a file"], lambda t: (t / "m").write_text("x")),
    ("pretrain-resume-nothing", pretrain("--resume"), ["--resume: no checkpoint"], None),
]

CASES = DATA_CASES + NUMBER_CASES + SETTING_CASES + PATH_CASES


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from sdknobs.shapes import world

    return world.write_dataset(tmp_path_factory.mktemp("bad") / "data", 2, seed=0)


@pytest.fixture(autouse=True)
def loaded_once(tiny_dir, monkeypatch):
    """train-lora / train-ti / lora trace-step get a copy of the tiny model loaded once (loading is not under test)."""
    import copy

    from sdknobs import load_model
    from sdknobs.lora import train as lora_train
    from sdknobs.model import Model
    from sdknobs.training import trainer

    if not _MODEL:
        _MODEL.append(load_model(tiny_dir, device="cpu", dtype="fp32"))
    def fresh(cfg):
        m = _MODEL[0]  # the weights copied, the tokenizer shared (no failing case gets to add a token)
        return Model(m.tokenizer, copy.deepcopy(m.text_encoder), copy.deepcopy(m.unet), copy.deepcopy(m.vae),
                     dict(m.scheduler_config), family=m.family, source=m.source)

    monkeypatch.setattr(lora_train, "load_base", fresh)
    monkeypatch.setattr(trainer, "load_for_training", fresh)


_MODEL: list = []


@pytest.fixture(scope="module")
def finished(data, tiny_dir, tmp_path_factory):
    """A finished 2-step LoRA run: o/w.safetensors and o/w-run/ckpt-train-0000002."""
    tmp = tmp_path_factory.mktemp("finished")
    assert main([a.format(data=data, tiny=tiny_dir, tmp=tmp) for a in lora()]) == 0
    return tmp / "o"


def _tree(root: Path) -> dict:
    """Every path under root with its mode, size and bytes' mtime: equal before and after = nothing written or deleted."""
    return {str(p.relative_to(root)): (p.stat().st_mode, p.stat().st_size if p.is_file() else 0, p.stat().st_mtime_ns)
            for p in root.rglob("*") if "__pycache__" not in p.parts}


@pytest.mark.parametrize("case, argv, words, setup", CASES, ids=[c[0] for c in CASES])
def test_bad_input(case, argv, words, setup, data, tiny_dir, finished, tmp_path, capsys):
    if setup in ("finished", "finished-no-out"):
        copy_run(finished, with_out=setup == "finished")(tmp_path)
    elif setup is not None:
        setup(tmp_path)
    before, pkg_before = _tree(tmp_path), _tree(PKG)
    capsys.readouterr()
    try:
        rc = main([a.format(data=data, tiny=tiny_dir, tmp=tmp_path) for a in argv])
    except SystemExit as e:  # argparse's own errors
        rc = e.code
    err = capsys.readouterr().err
    os.chmod(tmp_path, 0o755)
    for p in tmp_path.rglob("*"):
        if p.is_dir():
            os.chmod(p, p.stat().st_mode | 0o700)  # (a read-only case) so pytest can clean up
    assert rc == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("sdknobs") and "error:" in line]
    assert len(lines) == 1, err
    for w in words:
        assert w.format(tmp=tmp_path) in lines[0], (w, lines[0])
    after = _tree(tmp_path)
    for p, (mode, size, mtime) in before.items():  # the read-only folder got its write bit back above
        if case != "out-folder-readonly":
            assert after.get(p) == (mode, size, mtime), f"{p} changed or deleted"
    assert after.keys() == before.keys(), f"written: {sorted(set(after) - set(before))}"
    assert _tree(PKG) == pkg_before


def test_case_count():
    assert len(CASES) >= 40


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_a_valid_run_keeps_the_umask_modes(umask, data, tiny_dir, tmp_path, capsys):
    old = os.umask(umask)
    try:
        argv = [a.format(data=data, tiny=tiny_dir, tmp=tmp_path) for a in lora("--checkpoint-every", "1")]
        assert main(argv) == 0
    finally:
        os.umask(old)
    files = [p for p in (tmp_path / "o").rglob("*") if p.is_file()]
    dirs = [tmp_path / "o"] + [p for p in (tmp_path / "o").rglob("*") if p.is_dir()]
    assert len(files) >= 5 and len(dirs) >= 3  # out, log, history, loss curve, checkpoint files; o, run, checkpoints
    assert {oct(p.stat().st_mode & 0o777) for p in files} == {oct(0o666 & ~umask)}
    assert {oct(p.stat().st_mode & 0o777) for p in dirs} == {oct(0o777 & ~umask)}


def test_overwrite_replaces_a_finished_run(data, tiny_dir, finished, tmp_path, capsys):
    copy_run(finished)(tmp_path)
    (tmp_path / "o" / "mine.txt").write_text("the user's")
    argv = [a.format(data=data, tiny=tiny_dir, tmp=tmp_path) for a in lora("--steps", "1", "--overwrite")]
    assert main(argv) == 0
    run = tmp_path / "o" / "w-run"
    assert sorted(p.name for p in run.glob("ckpt-*")) == ["ckpt-train-0000001"]  # the old run's checkpoints are gone
    assert (tmp_path / "o" / "mine.txt").read_text() == "the user's"


def test_pretrain_default_out_is_a_new_folder_outside_the_package():
    from sdknobs.shapes.pretrain import PretrainConfig

    out = Path(PretrainConfig().out)
    assert out == Path("out/shapes-pretrain") and PKG not in out.resolve().parents


def test_a_full_disk_while_checkpointing_is_one_line_and_leaves_no_temp_folder(data, tiny_dir, tmp_path, capsys,
                                                                                 monkeypatch):
    import errno

    from sdknobs.training import checkpoint

    def full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "save_file", full)
    assert main([a.format(data=data, tiny=tiny_dir, tmp=tmp_path) for a in lora()]) == 2
    err = capsys.readouterr().err
    assert "cannot write the checkpoint" in err and "No space left on device" in err and "Traceback" not in err
    run = tmp_path / "o" / "w-run"
    assert not [p for p in run.iterdir() if p.name.startswith((".", "ckpt"))] and not (tmp_path / "o" / "w.safetensors").exists()
