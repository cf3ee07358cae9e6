"""The shared training engine: learning, frozen weights, exact resume, validation, checkpoints, files,
prior preservation, TI-style row training, errors, and two processes under Accelerate."""
import copy
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw
from safetensors import safe_open

from sdknobs.errors import SdknobsError
from sdknobs.model import Model
from sdknobs.tiny import build_model
from sdknobs.training.checkpoint import list_checkpoints
from sdknobs.training.trainer import (Method, ParamSubsetMethod, TrainConfig, _Dist, _Session, atomic_save_file,
                                      trace_step, train)

COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 160, 30), "yellow": (230, 200, 20),
           "purple": (140, 40, 160)}


_BASE: dict[str, Model] = {}


def fresh(prediction_type: str = "epsilon") -> Model:
    """A fresh copy of one tiny random model (seed 0); building costs seconds, copying a fraction."""
    if prediction_type not in _BASE:
        _BASE[prediction_type] = build_model(seed=0, prediction_type=prediction_type)
    m = _BASE[prediction_type]
    return Model(m.tokenizer, copy.deepcopy(m.text_encoder), copy.deepcopy(m.unet), copy.deepcopy(m.vae),
                 dict(m.scheduler_config), family=m.family, source=m.source)


def _draw(folder: Path, names, shape="circle") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        im = Image.new("RGB", (32, 32), "white")
        box = [4 + 2 * i, 6, 24 + 2 * i, 26]  # shifted, so flips differ
        (ImageDraw.Draw(im).ellipse if shape == "circle" else ImageDraw.Draw(im).rectangle)(box, fill=COLOURS[name])
        im.save(folder / f"{name}.png")
        (folder / f"{name}.txt").write_text(f"a {name} {shape}")
    return folder


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return _draw(tmp_path_factory.mktemp("data") / "circles", list(COLOURS))


@pytest.fixture(scope="module")
def class_data(tmp_path_factory):
    return _draw(tmp_path_factory.mktemp("data") / "squares", ["red", "blue"], shape="square")


def _cfg(data, tmp_path, **kw):
    base = dict(data_dir=str(data), out=str(tmp_path / "out" / "w.safetensors"), run_dir=str(tmp_path / "run"),
                steps=6, learning_rate=1e-3, batch_size=2, validate_every=0, checkpoint_every=0, progress=False)
    return TrainConfig(**{**base, **kw})


def _quiet(msg):
    pass


def _digest(model) -> dict[str, str]:
    return {f"{c}.{k}": hashlib.sha256(v.detach().cpu().numpy().tobytes()).hexdigest()
            for c, m in model.components().items() for k, v in m.state_dict().items()}


class RowMethod(Method):
    """Textual-inversion-like: train the token-embedding matrix, keep every row but one frozen by
    restoring it after each optimizer step (what TI does with its new rows)."""

    name = "row"

    def __init__(self, word="red"):
        self.word = word

    def setup(self, model):
        self.emb = model.text_encoder.get_input_embeddings().weight
        self.row = model.tokenizer.convert_tokens_to_ids(self.word + "</w>")
        self.orig = self.emb.detach().clone()

    def parameters(self):
        return [self.emb]

    def after_optimizer_step(self):
        with torch.no_grad():
            keep = torch.ones(self.emb.shape[0], dtype=torch.bool)
            keep[self.row] = False
            self.emb[keep] = self.orig[keep]

    def state_dict(self):
        return {"row": self.emb[self.row].detach()}

    def load_state_dict(self, sd):
        with torch.no_grad():
            self.emb[self.row] = sd["row"]


def test_training_lowers_the_loss_and_writes_its_files(data, tmp_path):
    model = fresh()
    cfg = _cfg(data, tmp_path, steps=30, learning_rate=3e-3, validate_every=15, validation_split=1,
               validation_prompts=["a red circle"], validation_seeds=[0], validation_steps=4, checkpoint_every=10,
               min_snr_gamma=5.0)
    res = train(model, ParamSubsetMethod(["attn2", "unet.conv_out"]), cfg, log=_quiet)
    val = [v for _, v in res.val_loss]
    assert [s for s, _ in res.val_loss] == [0, 15, 30]
    assert val[-1] < val[0] * 0.97, val  # held-out loss at fixed t and noise goes down
    first, last = [sum(v for _, v in res.train_loss[a:b]) / 10 for a, b in ((0, 10), (20, 30))]
    assert last < first
    run = Path(cfg.run_dir)
    for f in ("loss_curve.png", "history.json", "train.log", "val_step_000000.png", "val_step_000030.png"):
        assert (run / f).is_file(), f
    assert Image.open(run / "val_step_000030.png").text["parameters"].startswith("0: a red circle")
    hist = json.loads((run / "history.json").read_text())
    assert hist["trainable_params"] == res.trainable_params > 0 and len(hist["train_loss"]) == 30
    with safe_open(str(res.out), "pt") as f:
        meta = f.metadata()
        assert meta["sdknobs_method"] == "subset" and meta["steps"] == "30" and meta["resolution"] == "32"
        assert len(list(f.keys())) == 22  # 4 attn2 blocks x (q, k, v, out weight + out bias) + conv_out w, b
    assert [p.name for p in list_checkpoints(run)] == ["ckpt-train-0000020", "ckpt-train-0000030"]  # keep 2
    assert not [p for p in run.iterdir() if p.name.startswith(".")]  # no temporary leftovers
    assert not any(p.requires_grad for m in model.components().values() for p in m.parameters())


def test_only_method_weights_change(data, tmp_path):
    model = fresh()
    before = _digest(model)
    method = ParamSubsetMethod(["attn2.to_k"])
    train(model, method, _cfg(data, tmp_path, steps=3), log=_quiet)
    after = _digest(model)
    changed = {k for k in before if before[k] != after[k]}
    assert changed == set(method.params) and len(changed) == 4


def test_ti_style_row_training(data, tmp_path):
    """Gradient reaches the embedding row through encode_text, and only that row changes in the model."""
    model = fresh()
    before = _digest(model)
    emb0 = model.text_encoder.get_input_embeddings().weight.detach().clone()
    method = RowMethod("red")
    train(model, method, _cfg(data, tmp_path, steps=4, batch_size=5, learning_rate=1e-2), log=_quiet)
    after = _digest(model)
    name = next(f"text_encoder.{n}" for n, p in model.text_encoder.named_parameters() if p is method.emb)
    assert {k for k in before if before[k] != after[k]} == {name}
    diff = (model.text_encoder.get_input_embeddings().weight - emb0).abs().sum(1)
    assert torch.nonzero(diff).flatten().tolist() == [method.row]

    tr, extra = trace_step(fresh(), RowMethod("red"), _cfg(data, tmp_path, batch_size=5))
    tok = fresh().tokenizer
    in_captions = {i for c in extra["captions"] for i in tok(c).input_ids}
    assert set(extra["nonzero_grad_rows"][name]) <= in_captions and method.row in extra["nonzero_grad_rows"][name]
    assert extra["changed_rows"][name] == [method.row]  # AdamW moved every row; after_optimizer_step restored them
    assert tr.shapes()["encoder_hidden_states"] == (5, 77, 32) and tr.shapes()["latents"] == (5, 4, 8, 8)


def test_traced_and_eager_unet_train_the_same_bits(data, tmp_path, monkeypatch):
    """--jit (the default: the U-Net traced once, fast.TracedUNet) and --no-jit give identical weights and losses,
    for U-Net weights and for an embedding row whose gradient comes back through the U-Net."""
    traces = []
    trace = torch.jit.trace
    monkeypatch.setattr(torch.jit, "trace", lambda *a, **k: traces.append(1) or trace(*a, **k))
    for name, method in (("subset", lambda: ParamSubsetMethod(["attn2.to_k", "attn1.to_v"])), ("row", lambda: RowMethod("red"))):
        runs = []
        for jit in (True, False):
            m = method()
            n = len(traces)
            res = train(fresh(), m, _cfg(data, tmp_path / f"{name}-{jit}", steps=3, jit=jit, flip=True), log=_quiet)
            assert len(traces) - n == (1 if jit else 0)  # one input shape: one trace, reused for 3 steps
            runs.append((res.train_loss, m.state_dict()))
        (loss_a, sd_a), (loss_b, sd_b) = runs
        assert loss_a == loss_b
        assert sd_a.keys() == sd_b.keys() and all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)


class Templated(ParamSubsetMethod):
    """Draws caption templates from the global RNG, as textual inversion does."""

    def caption(self, text, example):
        return ("a photo of {}", "a picture of {}", "{}, small")[int(torch.randint(3, (1,)))].format(text)


@pytest.mark.parametrize("cache", [False, True])
def test_resume_equals_uninterrupted(data, tmp_path, cache):
    kw = dict(steps=6, grad_accum=2, checkpoint_every=3, flip=True, caption_dropout=0.3, lr_scheduler="cosine",
              lr_warmup_steps=2, noise_offset=0.1, min_snr_gamma=5.0, cache_latents=cache, validation_split=1,
              validate_every=2)
    names = ["attn2.to_v", "unet.mid_block.resnets.0.conv1"]
    full = Templated(names)
    res_full = train(fresh(), full, _cfg(data, tmp_path / "a", **kw), log=_quiet)

    class Crash(Templated):
        steps = 0

        def after_optimizer_step(self):
            Crash.steps += 1
            if Crash.steps == 5:  # dies during step 5, after the checkpoint at step 3
                raise KeyboardInterrupt

    cfg_b = _cfg(data, tmp_path / "b", **kw)
    with pytest.raises(KeyboardInterrupt):
        train(fresh(), Crash(names), cfg_b, log=_quiet)
    assert [p.name for p in list_checkpoints(cfg_b.run_path)] == ["ckpt-train-0000003"]
    with pytest.raises(SdknobsError, match="already holds checkpoints .*pass --resume"):
        train(fresh(), Templated(names), cfg_b, log=_quiet)
    with pytest.raises(SdknobsError, match="--resume: --batch-size was 2 .* now 1"):
        train(fresh(), Templated(names), _cfg(data, tmp_path / "b", **{**kw, "resume": True, "batch_size": 1}), log=_quiet)

    resumed = Templated(names)
    res_b = train(fresh(), resumed, _cfg(data, tmp_path / "b", **{**kw, "resume": True}), log=_quiet)
    a, b = full.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert res_b.train_loss == res_full.train_loss and res_b.val_loss == res_full.val_loss
    assert [s for s, _ in res_b.val_loss] == [0, 2, 4, 6]


def test_validation_loss_is_fixed(data, tmp_path):
    cfg = _cfg(data, tmp_path, validation_split=2, validate_every=1, flip=True)

    def session():
        model = fresh()
        return _Session(model, ParamSubsetMethod(["attn2.to_k"]), cfg, _Dist(None, cfg, model))

    s = session()
    v1 = s.val_loss()
    assert s.val_loss() == v1 and session().val_loss() == v1  # same weights -> the same number, every call
    s.optimizer_step(0)
    assert s.val_loss() != v1  # the step changed the weights
    assert len(s.val_ex) == 2 and not {e.path for e in s.val_ex} & {e.path for e in s.data.examples}


def test_prior_preservation_loss(data, class_data, tmp_path):
    cfg = _cfg(data, tmp_path, class_data_dir=str(class_data), prior_loss_weight=0.5, batch_size=2)
    tr, extra = trace_step(fresh(), ParamSubsetMethod(["attn2.to_k"]), cfg)
    assert extra["is_class"] == [False, False, True, True]
    assert extra["captions"][2].endswith("square") and tr.shapes()["latents"] == (4, 4, 8, 8)
    l = tr.per_sample_loss * tr.weights
    assert torch.allclose(tr.loss, l[:2].mean() + 0.5 * l[2:].mean())


def test_v_prediction_target_and_gradient_checkpointing(data, tmp_path):
    from sdknobs.training.step import make_noise_scheduler

    model = fresh("v_prediction")
    tr, extra = trace_step(model, ParamSubsetMethod(["attn2.to_k"]), _cfg(data, tmp_path))
    v = make_noise_scheduler(model.scheduler_config).get_velocity(tr.latents, tr.noise, tr.timesteps)
    assert torch.allclose(tr.target, v)
    # recomputing activations in the backward pass gives the same gradients
    tr2, extra2 = trace_step(fresh("v_prediction"), ParamSubsetMethod(["attn2.to_k"]),
                             _cfg(data, tmp_path, gradient_checkpointing=True))
    assert torch.equal(tr.loss, tr2.loss)
    for k, g in extra["grads"].items():
        assert torch.allclose(g, extra2["grads"][k], atol=1e-7)
    # the same through the text encoder (TI's path)
    _, te = trace_step(fresh(), RowMethod(), _cfg(data, tmp_path))
    _, te2 = trace_step(fresh(), RowMethod(), _cfg(data, tmp_path, gradient_checkpointing=True))
    assert all(torch.allclose(g, te2["grads"][k], atol=1e-7) for k, g in te["grads"].items())


def test_bf16_autocast_on_cpu(data, tmp_path):
    res = train(fresh(), ParamSubsetMethod(["attn2.to_k"]),
                _cfg(data, tmp_path, steps=2, mixed_precision="bf16"), log=_quiet)
    assert all(v == v for _, v in res.train_loss)


@pytest.mark.parametrize("kw, msg", [
    ({"data_dir": ""}, "--data-dir is required"),
    ({"out": ""}, "--out is required"),
    ({"mixed_precision": "fp8"}, "--mixed-precision 'fp8': choose one of no, fp16, bf16"),
    ({"lr_scheduler": "step"}, "--lr-scheduler 'step'"),
    ({"steps": 0}, "--steps must be >= 1, got 0"),
    ({"caption_dropout": 1.5}, "--caption-dropout must be in"),
    ({"resolution": 30}, "--resolution 30 is not a multiple of 8"),
    ({"min_snr_gamma": -1.0}, "--min-snr-gamma must be >= 0"),
    ({"validation_split": 2}, "--validation-split 2 holds images out of training, but --validate-every 0"),
    ({"learning_rate": float("nan")}, "--learning-rate must be a finite number, got nan"),
    ({"validation_guidance": float("inf")}, "--validation-guidance must be a finite number, got inf"),
    ({"seed": 2**64}, r"--seed 18446744073709551616 is outside the seeds torch accepts \(-9223372036854775808 to"),
    ({"validation_seeds": [0, -2**63 - 1]}, "--validation-seeds -9223372036854775809 is outside"),
    ({"resolution": 8192}, "--resolution 8192 is above 4096"),
    ({"device": "mps"}, "--device 'mps'"),
])
def test_config_errors(tmp_path, kw, msg):
    with pytest.raises(SdknobsError, match=msg):
        _cfg("d", tmp_path, **kw)


def test_cli_flags_from_the_config():
    import argparse

    from sdknobs.flags import add_config_args, config_from_args

    parser = argparse.ArgumentParser()
    add_config_args(parser, TrainConfig)
    args = parser.parse_args(["--data-dir", "d", "--out", "o/x.safetensors", "--validation-prompts", "a b", "c",
                              "--validation-seeds", "3", "4", "--flip", "--no-progress", "--learning-rate", "2e-4"])
    cfg = config_from_args(TrainConfig, args)
    assert cfg.validation_prompts == ["a b", "c"] and cfg.validation_seeds == [3, 4] and cfg.flip and not cfg.progress
    assert cfg.learning_rate == 2e-4 and cfg.run_path == Path("o/x-run")
    with pytest.raises(SystemExit):  # --data-dir is required on the command line
        parser.parse_args(["--out", "x"])


def test_run_errors(data, tmp_path):
    class Nothing(ParamSubsetMethod):
        def parameters(self):
            return []

    with pytest.raises(SdknobsError, match="method 'subset' has no trainable parameters"):
        train(fresh(), Nothing(["attn2"]), _cfg(data, tmp_path), log=_quiet)
    with pytest.raises(SdknobsError, match="--mixed-precision fp16 needs a GPU"):
        train(fresh(), ParamSubsetMethod(["attn2"]), _cfg(data, tmp_path, mixed_precision="fp16"), log=_quiet)
    with pytest.raises(SdknobsError, match="--validation-split 5 leaves no training images"):
        train(fresh(), ParamSubsetMethod(["attn2"]), _cfg(data, tmp_path, validation_split=5, validate_every=1), log=_quiet)
    with pytest.raises(SdknobsError, match="--class-data-dir '.*nope': no such folder"):
        train(fresh(), ParamSubsetMethod(["attn2"]),
              _cfg(data, tmp_path, class_data_dir=str(tmp_path / "nope")), log=_quiet)


def test_atomic_save_leaves_no_partial_file(tmp_path, monkeypatch):
    path = tmp_path / "w.safetensors"
    atomic_save_file({"a": torch.ones(2)}, path, {"k": 1})
    import safetensors.torch

    def broken(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a fi")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(SdknobsError, match="cannot write .*w.safetensors.*disk full"):
        atomic_save_file({"a": torch.zeros(2)}, path)
    with safe_open(str(path), "pt") as f:  # the previous file is intact
        assert f.metadata() == {"k": "1"} and torch.equal(f.get_tensor("a"), torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]


def test_two_processes_under_accelerate(tiny_dir, data, tmp_path):
    """accelerate launch, 2 CPU processes (gloo): both ranks end with the same LoRA weights, which moved."""
    from safetensors.torch import load_file

    worker = Path(__file__).with_name("_accelerate_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1",
           "--multi_gpu", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
           str(worker), str(tiny_dir), str(data), str(tmp_path)]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    start = [load_file(str(tmp_path / f"start{r}.safetensors")) for r in (0, 1)]
    end = [load_file(str(tmp_path / f"end{r}.safetensors")) for r in (0, 1)]
    assert end[0].keys() == start[0].keys() and len(end[0]) > 0
    assert any(not torch.equal(start[0][k], start[1][k]) for k in start[0])  # different random inits per rank ...
    assert all(torch.equal(end[0][k], end[1][k]) for k in end[0])  # ... broadcast, then identical averaged steps
    assert any(not torch.equal(end[0][k], start[0][k]) for k in end[0])
    with safe_open(str(tmp_path / "end1.safetensors"), "pt") as f:
        assert f.metadata()["world"] == "2"
    assert (tmp_path / "final.safetensors").is_file()
