"""LoRA training (loss goes down, only A and B change) and the LoRA commands, including a two-process
`accelerate launch -m sdknobs train-lora` run."""
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from sdknobs import SdknobsError, load_model
from sdknobs.cli import main
from sdknobs.lora import layers as L
from sdknobs.lora.files import read_lora
from sdknobs.lora.train import ADAPTER, LoraMethod, LoraTrainConfig, train_lora
from sdknobs.shapes import world
from sdknobs.training.step import diffusion_loss, make_noise_scheduler


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return world.write_dataset(tmp_path_factory.mktemp("lora") / "stars", 4, seed=0, kinds=("star",))


def fixed_loss(model, data) -> float:
    """Denoising loss on the training images at fixed timesteps and noise (comparable before/after)."""
    from sdknobs.text import encode_text
    from sdknobs.training.data import read_folder

    ex = read_folder(data, resolution=32)
    x = torch.stack([e.image for e in ex])
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        x0 = model.vae.encode(x).latent_dist.mean * model.latent_scale
        c, _ = encode_text(model, [e.caption.replace("shape", "sks shape", 1) for e in ex])
        noise = torch.randn(x0.shape, generator=g)
        t = torch.tensor([100, 300, 500, 700])[: len(ex)]
        return float(diffusion_loss(model.unet, x0, c, make_noise_scheduler(model.scheduler_config), None,
                                    noise=noise, timesteps=t))


def test_training_lowers_loss_and_changes_only_lora(tiny_dir, data, tmp_path):
    m = load_model(tiny_dir)
    before = {f"{n}.{k}": v.clone() for n, mod in m.components().items() for k, v in mod.state_dict().items()}
    loss0 = fixed_loss(m, data)
    cfg = LoraTrainConfig(data_dir=str(data), out=str(tmp_path / "sks.safetensors"), model=str(tiny_dir), steps=30,
                          learning_rate=2e-2, batch_size=4, rank=4, text_encoder=True, instance_token="sks",
                          class_word="shape", cache_latents=True, validate_every=0, checkpoint_every=0, progress=False)
    res, method = train_lora(cfg, m, log=lambda s: None)
    loss1 = fixed_loss(m, data)
    assert loss1 < 0.9 * loss0, (loss0, loss1)
    trained = L.extract(m, ADAPTER)
    assert any(k.startswith("text_encoder.") for k in trained.layers)
    assert all(float(f.up.abs().max()) > 0 for f in trained.layers.values())  # every B moved off zero
    # the file holds exactly the trained factors, with kohya metadata
    w = read_lora(res.out)
    assert set(w.layers) == set(trained.layers)
    assert all(torch.equal(w.layers[k].up, trained.layers[k].up) for k in w.layers)
    meta = w.metadata
    assert meta["ss_network_dim"] == "4" and float(meta["ss_network_alpha"]) == 4.0
    assert meta["modelspec.trigger_phrase"] == "sks shape" and len(meta["ss_new_sd_model_hash"]) == 64
    assert meta["ss_resolution"] == "(32, 32)" and meta["sdknobs.steps"] == "30"
    # removing the adapter leaves every base weight bit-identical to before training
    L.remove(m, ADAPTER)
    after = {f"{n}.{k}": v for n, mod in m.components().items() for k, v in mod.state_dict().items()}
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    # and the file, applied to the base model, reproduces the trained model's loss
    L.apply_loras(m, [str(res.out)])
    assert fixed_loss(m, data) == pytest.approx(loss1, rel=1e-5)


def test_subject_captions():
    m = LoraMethod(LoraTrainConfig(data_dir="d", out="o.safetensors", instance_token="sks", class_word="shape"))
    inst, cls = SimpleNamespace(is_class=False), SimpleNamespace(is_class=True)
    assert m.caption("a large red shape on the left, white background", inst) == \
        "a large red sks shape on the left, white background"
    assert m.caption("a red circle", inst) == "sks shape, a red circle"
    assert m.caption("", inst) == "a sks shape"
    assert m.caption("a large red shape", cls) == "a large red shape"  # class images keep their caption
    with pytest.raises(SdknobsError, match="needs both --instance-token"):
        LoraTrainConfig(data_dir="d", out="o.safetensors", instance_token="sks")
    with pytest.raises(SdknobsError, match="must end in .safetensors"):
        LoraTrainConfig(data_dir="d", out="o.pt")
    from sdknobs.cli import build_parser
    from sdknobs.lora.cli import _train_config

    parse = build_parser().parse_args
    assert _train_config(parse(["train-lora", "d", "--out", "o.safetensors"])).targets == ["cross-attn"]
    assert _train_config(parse(["train-lora", "d", "--targets", "conv", "--targets", "te:q_proj"])).targets == \
        ["conv", "te:q_proj"]


# --- the commands ----------------------------------------------------------------------------------

def run(capsys, *argv):
    code = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


@pytest.fixture(scope="module")
def trained(tiny_dir, data, tmp_path_factory):
    """A LoRA trained through the CLI (2 steps, diffusers layout, subject mode)."""
    out = tmp_path_factory.mktemp("cli") / "subj.safetensors"
    code = main(["train-lora", str(data), "--model", str(tiny_dir), "--out", str(out), "--steps", "2",
                 "--learning-rate", "1e-2", "--instance-token", "sks", "--class-word", "shape", "--format", "diffusers",
                 "--validate-every", "0", "--no-progress", "--targets", "cross-attn", "--targets", "conv"])
    assert code == 0
    return out


def test_train_lora_writes_the_requested_layout(trained):
    keys = list(load_file(str(trained)))
    assert all(".lora_A." in k or ".lora_B." in k for k in keys)
    assert any(".resnets." in k for k in keys) and any(".attn2." in k for k in keys)
    assert (trained.parent / "subj-run" / "loss_curve.png").is_file()


def test_generate_with_lora_and_window(capsys, tiny_dir, trained, tmp_path):
    out = tmp_path / "g.png"
    code, stdout, err = run(capsys, "generate", "--model", tiny_dir, "--prompt", "a sks shape", "--steps", "2",
                            "--lora", f"{trained}:0.8@0.5-1", "--out", out)
    assert code == 0, err
    params = Image.open(out).text["parameters"]
    assert 'Lora hashes: "subj: ' in params and "subj.safetensors:0.8@0.5-1" in params


@pytest.mark.parametrize("argv,msg", [
    (["generate", "--prompt", "x", "--lora", "a.safetensors:heavy"], "weight 'heavy' is not a number"),
    (["generate", "--prompt", "x", "--lora", "missing.safetensors"], "no such file"),
    (["lora", "targets", "--preset", "zzz_nothing"], "matches no Linear or Conv2d layer"),
    (["lora", "merge", "a.safetensors@0.5-1", "--out", "m"], "cannot be merged"),
])
def test_cli_errors_are_one_line(capsys, tiny_dir, tmp_path, argv, msg):
    argv = [a if not a.endswith(".safetensors") else str(tmp_path / a) for a in argv]
    if argv[0] in ("generate", "lora") and argv[1] != "merge":
        argv += ["--model", str(tiny_dir)]
    if argv[0] == "generate":
        argv += ["--out", str(tmp_path / "o.png")]
    code, out, err = run(capsys, *argv)
    assert code == 2 and msg in err and err.count("\n") == 1, err
    assert not (tmp_path / "o.png").exists()


def test_lora_tools(capsys, tiny_dir, trained, tmp_path):
    code, out, _ = run(capsys, "lora", "targets", "--model", tiny_dir, "--preset", "conv", "--rank", "2")
    assert code == 0 and "resnets.0.conv1" in out and "LoRA parameters" in out
    code, out, _ = run(capsys, "lora", "inspect", trained, "--model", tiny_dir)
    assert code == 0 and "diffusers layout" in out and "conv (" in out and "||delta W||_F per block" in out
    code, out, _ = run(capsys, "lora", "conflict", trained, trained)
    assert code == 0 and "conflict score (norm-weighted mean cosine): +1.000" in out
    code, out, _ = run(capsys, "lora", "merge", f"{trained}:0.5", trained, "--out", tmp_path / "two.safetensors",
                       "--method", "svd", "--rank", "2")
    assert code == 0 and read_lora(tmp_path / "two.safetensors").ranks() == {2: len(read_lora(trained).layers)}
    code, out, _ = run(capsys, "lora", "merge", trained, "--model", tiny_dir, "--out", tmp_path / "merged")
    assert code == 0 and "U-Net output max |diff|" in out
    diff = float(out.split("U-Net output max |diff| ")[1].split()[0])
    assert diff < 1e-4
    assert load_model(tmp_path / "merged").unet is not None


def test_trace_step(capsys, tiny_dir):
    code, out, err = run(capsys, "lora", "trace-step", "--model", tiny_dir, "--rank", "2")
    assert code == 0, err
    for want in ("VAE encode (frozen)", "x_t = sqrt(abar_t) x0", "inside unet layer", "A x ", "B (A x)",
                 "[1, 77, 2]", "base weights with a gradient: 0", "AdamW step"):
        assert want in out, want


def test_two_processes_train_lora_cli(tiny_dir, data, tmp_path):
    """`accelerate launch -m sdknobs train-lora`: two CPU processes (gloo) train and rank 0 writes the file.
    (That both ranks hold identical weights is checked for the engine in test_trainer.py.)"""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "dist.safetensors"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1",
           "--multi_gpu", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
           "-m", "sdknobs", "train-lora", str(data), "--model", str(tiny_dir), "--out", str(out), "--steps", "2",
           "--device", "cpu", "--validate-every", "0", "--no-progress", "--cache-latents"]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "2 process(es)" in (tmp_path / "dist-run" / "train.log").read_text()
    assert len(read_lora(out).layers) > 0 and p.stdout.strip().endswith(str(out))


def test_benchmark_runs_on_a_shrunken_sd15(capsys):
    """The GPU benchmark's code path (SD1.5 architecture from configs, bf16 autocast, both loops) on a
    narrow copy on the CPU, so that the one GPU run does not crash."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[1] / "benchmarks" / "bench_lora_train.py"
    spec = importlib.util.spec_from_file_location("bench_lora_train", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = bench.main(["--sd15-random", "--tiny-arch", "--resolution", "64", "--batch-sizes", "2", "--steps", "3",
                       "--warmup", "1", "--dtype", "bf16", "--images", "2"])
    (batch, ours, ref), = rows
    assert batch == 2 and ours["step_s"] > 0 and ref["step_s"] > 0
    assert "| 2 |" in capsys.readouterr().out


@pytest.mark.slow
def test_results_script_smoke(tiny_dir, tmp_path):
    """Every experiment of `python -m sdknobs.lora.results` end to end on the tiny model, 1% of the steps."""
    from sdknobs.lora.results import main as results

    results(["--model", str(tiny_dir), "--out", str(tmp_path / "out"), "--docs", str(tmp_path / "docs"),
             "--n", "4", "--steps", "3", "--scale", "0.01"])
    page = (tmp_path / "docs" / "lora.md").read_text()
    assert "| compose: cross-attn style + subject" in page and "| overfit:" in page
    assert {p.name for p in (tmp_path / "docs" / "lora").iterdir()} >= {"subject.png", "style.png", "compose.png",
                                                                        "window.png", "overfit.png", "overfit_loss.png"}


def test_same_seed_same_lora(tiny_dir, data, tmp_path):
    """The initial A and every step depend on --seed alone, not on the process's RNG history."""
    def run(i):
        torch.manual_seed(1000 + i)  # different global RNG state before each run
        cfg = LoraTrainConfig(data_dir=str(data), out=str(tmp_path / f"{i}.safetensors"), model=str(tiny_dir), steps=2,
                              learning_rate=1e-2, batch_size=2, validate_every=0, checkpoint_every=0, progress=False)
        return read_lora(train_lora(cfg, log=lambda s: None)[0].out)

    a, b = run(0), run(1)
    assert all(torch.equal(a.layers[k].down, b.layers[k].down) and torch.equal(a.layers[k].up, b.layers[k].up)
               for k in a.layers)
