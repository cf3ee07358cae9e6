"""The TI commands end to end on a tiny model; every bad input is one line on stderr and exit 2."""
import pytest
import torch
from PIL import Image

from sdknobs.cli import main
from sdknobs.ti import read_embedding, save_embedding


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from sdknobs.shapes import world

    return world.write_dataset(tmp_path_factory.mktemp("ticli") / "stars", 3, seed=5, kinds=("star",))


def test_train_generate_verify_nearest(capsys, tiny_dir, data, tmp_path):
    out = tmp_path / "emb" / "learned_embeds.safetensors"
    code, so, err = run(capsys, "train-ti", data, "--token", "<my-shape>", "--init-word", "shape", "--vectors", "2",
                        "--template", "captions", "--caption-word", "shape", "--model", tiny_dir, "--steps", "2",
                        "--out", out, "--validate-every", "0", "--no-progress")
    assert code == 0, err
    assert "use it with --embedding" in so and out.exists()
    assert read_embedding(out).n_vectors == 2
    code, so, err = run(capsys, "generate", "--model", tiny_dir, "--steps", "2", "--prompt", "a red <my-shape>",
                        "--embedding", out, "--out", tmp_path / "g.png")
    assert code == 0, err
    assert "a red <my-shape>" in Image.open(tmp_path / "g.png").text["parameters"]
    code, so, err = run(capsys, "ti", "verify", out, "--model", tiny_dir, "--steps", "2")
    assert code == 0, err
    assert so.count("identical") == 5 and "all unchanged" in so and so.strip().endswith("OK")
    code, so, err = run(capsys, "ti", "nearest", out, "--model", tiny_dir, "--k", "3")
    assert code == 0, err
    assert "<my-shape>_1:" in so and "init word 'shape': cos" in so and so.count("cos +") + so.count("cos -") >= 8


def test_repeatable_embedding_flag_and_rename(capsys, tiny_dir, tmp_path, photo):
    a = save_embedding(tmp_path / "a", "<aa>", torch.randn(1, 32))
    b = save_embedding(tmp_path / "b.safetensors", "<bb>", torch.randn(3, 32), format="kohya")
    photo.save(tmp_path / "in.png")
    code, _, err = run(capsys, "img2img", "--model", tiny_dir, "--steps", "2", "--image", tmp_path / "in.png",
                       "--prompt", "<aa> and <cc>", "--embedding", a, "--embedding", f"{b}=<cc>",
                       "--out", tmp_path / "o.png")
    assert code == 0, err


def test_trace_step_command(capsys, tiny_dir, data):
    code, so, err = run(capsys, "ti", "trace-step", "--model", tiny_dir, "--data-dir", data)
    assert code == 0, err
    assert "encoder_hidden_states" in so and "<- new token" in so and "rows changed after the restore: [49408]" in so


@pytest.mark.parametrize("argv,msg", [
    (["generate", "--prompt", "x", "--embedding", "{missing}"], "no such file"),
    (["generate", "--prompt", "x", "--embedding", "{wide}"], "768 wide, SD1.x"),
    (["ti", "verify", "{evil}"], "refused, it needs arbitrary unpickling"),
    (["ti", "nearest", "{ok}", "--k", "0"], "--k must be >= 1"),
    (["train-ti", "{data}", "--token", "star", "--init-word", "shape"], "already in the tokenizer"),
    (["train-ti", "{data}", "--token", "<t>", "--init-word", "heartshape"], "is 2 tokens (heart + shape)"),
    (["train-ti", "{data}", "--token", "<t>", "--init-word", "shape", "--vectors", "9"], "--vectors must be between 1 and 8"),
    (["train-ti", "--token", "<t>", "--init-word", "shape"], "--data-dir is required"),
    (["train-ti", "{data}", "--token", "<t>", "--init", "random", "--template", "captions"], "has no caption"),
])
def test_errors_are_one_line_exit_2(capsys, tiny_dir, data, tmp_path, argv, msg):
    torch.save({"name": "x", "payload": Image.new("L", (1, 1))}, tmp_path / "evil.pt")
    subst = {"{missing}": tmp_path / "missing.safetensors", "{data}": data, "{evil}": tmp_path / "evil.pt",
             "{wide}": save_embedding(tmp_path / "w", "<w>", torch.zeros(1, 768)),
             "{ok}": save_embedding(tmp_path / "ok", "<ok>", torch.zeros(1, 32))}
    if argv[0] == "train-ti":
        argv = argv + ["--steps", "1", "--out", tmp_path / "t.safetensors", "--no-progress"]
    if argv[0] == "train-ti" and "{data}" in argv and "random" in argv:  # images without .txt captions
        bare = tmp_path / "bare"
        bare.mkdir()
        Image.new("RGB", (32, 32)).save(bare / "a.png")
        subst["{data}"] = bare
    code, so, err = run(capsys, *[subst.get(a, a) for a in argv], "--model", tiny_dir)
    assert code == 2, (so, err)
    assert err.count("\n") == 1 and err.startswith("sdknobs: error: ") and msg in err, err
    assert not (tmp_path / "t.safetensors").exists()
