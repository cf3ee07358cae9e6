"""The command line: every command runs on a tiny model, and every bad input gets a one-line error,
exit code 2, no traceback and nothing written."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image, PngImagePlugin

from sdknobs.cli import main


@pytest.fixture
def files(tmp_path, photo, half_mask):
    photo.save(tmp_path / "in.png")
    half_mask.save(tmp_path / "mask.png")
    half_mask.resize((16, 16)).save(tmp_path / "small_mask.png")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    (tmp_path / "out").mkdir()
    return tmp_path


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def common(tiny_dir, files, name="o.png"):
    return ["--model", tiny_dir, "--steps", "3", "--prompt", "a red circle", "--out", files / "out" / name]


def test_generate_writes_png_with_parameters(capsys, tiny_dir, files):
    code, out, err = run(capsys, "generate", *common(tiny_dir, files), "--seed", "9", "--guidance", "3")
    assert code == 0, err
    png = Image.open(files / "out" / "o.png")
    params = png.text["parameters"]
    assert params.startswith("a red circle\n") and "Seed: 9" in params and "Sampler: DDIM" in params
    assert "CFG scale: 3.0" in params and "Size: 32x32" in params


@pytest.mark.parametrize("cmd,extra", [
    ("img2img", ["--image", "{in}", "--strength", "0.5"]),
    ("inpaint", ["--image", "{in}", "--mask", "{mask}"]),
    ("inpaint", ["--image", "{in}", "--mask", "{small}", "--resize-mask"]),
    ("outpaint", ["--image", "{in}", "--right", "16", "--scheduler", "euler"]),
    ("sweep-strength", ["--image", "{in}", "--strengths", "0", "0.5", "1", "--seeds", "0", "1"]),
])
def test_commands_write_pictures(capsys, tiny_dir, files, cmd, extra):
    subst = {"{in}": files / "in.png", "{mask}": files / "mask.png", "{small}": files / "small_mask.png"}
    code, out, err = run(capsys, cmd, *common(tiny_dir, files), *[subst.get(e, e) for e in extra])
    assert code == 0, err
    assert Image.open(files / "out" / "o.png").size[0] >= 32
    if cmd == "sweep-strength":
        assert "strength 0.50: start step 2/3" in out


def test_info(capsys, tiny_dir):
    code, out, _ = run(capsys, "info", "--model", tiny_dir)
    assert code == 0
    assert "prediction type:  epsilon" in out and "attention layers: 8 (4 self, 4 cross)" in out
    assert "cross-attention projections (to_q/to_k/to_v/to_out.0): 16" in out


BAD = [
    (["img2img", "--image", "{missing}"], "--image", "no such file"),
    (["img2img", "--image", "{broken}"], "--image", "not a readable image"),
    (["inpaint", "--image", "{in}", "--mask", "{small}"], "--mask is 16x16 but the image is 32x32", "--resize-mask"),
    (["generate", "--width", "36"], "--width 36 is not a multiple of 8", "32 or 40"),
    (["generate", "--height", "20"], "--height 20", "16 or 24"),
    (["img2img", "--image", "{in}", "--strength", "1.5"], "--strength must be in [0, 1]", "1.5"),
    (["inpaint", "--image", "{in}", "--mask", "{mask}", "--strength", "-0.1"], "--strength", "-0.1"),
    (["generate", "--scheduler", "heun2"], "--scheduler 'heun2' is not known", "dpm++2m-karras"),
    (["generate", "--steps", "0"], "--steps must be >= 1", "0"),
    (["generate", "--out", "{outdir}/x.jpg"], "must end in .png", "x.jpg"),
]


@pytest.mark.parametrize("argv,msg1,msg2", BAD)
def test_bad_input_one_line_exit_2_nothing_written(capsys, tiny_dir, files, argv, msg1, msg2):
    subst = {"{missing}": files / "nope.png", "{broken}": files / "broken.png", "{in}": files / "in.png",
             "{mask}": files / "mask.png", "{small}": files / "small_mask.png", "{outdir}": files / "out"}
    argv = [str(subst.get(a, a)).replace("{outdir}", str(files / "out")) for a in argv]
    code, out, err = run(capsys, argv[0], *common(tiny_dir, files), *argv[1:])
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("sdknobs: error: ")
    assert msg1 in err and msg2 in err
    assert "Traceback" not in err
    assert list((files / "out").iterdir()) == []


def test_model_folder_missing_component(capsys, tiny_dir, files, tmp_path):
    broken = tmp_path / "broken_model"
    shutil.copytree(tiny_dir, broken)
    shutil.rmtree(broken / "vae")
    code, _, err = run(capsys, "generate", *common(broken, files))
    assert code == 2 and "missing component folder(s) vae" in err
    code, _, err = run(capsys, "generate", *common(tmp_path / "nothing_here", files))
    assert code == 2 and "no such folder or file" in err
    assert list((files / "out").iterdir()) == []


def test_console_script_exit_code(tiny_dir, tmp_path):
    exe = Path(sys.executable).with_name("sdknobs")
    r = subprocess.run([str(exe), "generate", "--model", str(tiny_dir), "--prompt", "x", "--width", "30"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "nearest valid: 24 or 32" in r.stderr and "Traceback" not in r.stderr


def test_single_file_checkpoint_via_cli(capsys, tiny_dir, tiny, files, tmp_path):
    """A single-file checkpoint loads with --model-config; one whose keys don't match is refused by name."""
    from safetensors.torch import load_file, save_file

    from sdknobs.single_file import save_single_file

    good = save_single_file(tiny, tmp_path / "tiny.safetensors")
    code, _, err = run(capsys, "generate", *common(good, files), "--model-config", tiny_dir)
    assert code == 0, err
    (files / "out" / "o.png").unlink()
    code, _, err = run(capsys, "generate", *common(good, files))
    assert code == 2 and "not a standard SD1.x" in err and "--model-config" in err
    sd = load_file(good)
    key = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    del sd[key]
    save_file(sd, tmp_path / "broken.safetensors")
    code, _, err = run(capsys, "generate", *common(tmp_path / "broken.safetensors", files), "--model-config", tiny_dir)
    assert code == 2 and key in err and err.count("\n") == 1
    assert list((files / "out").iterdir()) == []
