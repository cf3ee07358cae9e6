"""The shared diffusion training step, training checkpoints, and a tiny end-to-end pretraining run."""
from __future__ import annotations

import random
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from sdknobs.errors import SdknobsError
from sdknobs.tiny import SD_SCHEDULER_CONFIG, build_model
from sdknobs.training.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from sdknobs.training.plots import loss_curve_png
from sdknobs.training.step import diffusion_loss, make_noise_scheduler



def _tiny_unet_batch(prediction_type="epsilon", seed=0):
    m = build_model(seed=seed, sample_size=4, vae_channels=(8, 16), unet_channels=(16, 32), text_width=16, heads=2,
                    prediction_type=prediction_type)
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(4, 4, 4, 4, generator=g)
    ehs = torch.randn(4, 77, 16, generator=g)
    return m, latents, ehs


def _abar_independent(t: torch.Tensor) -> torch.Tensor:
    """alphas_cumprod of SD's scaled_linear schedule, from the formula (not from diffusers)."""
    c = SD_SCHEDULER_CONFIG
    betas = torch.linspace(c["beta_start"] ** 0.5, c["beta_end"] ** 0.5, c["num_train_timesteps"], dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0)[t].view(-1, 1, 1, 1)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_step_target_matches_the_formula(prediction_type):
    m, x0, ehs = _tiny_unet_batch(prediction_type)
    sched = make_noise_scheduler(m.scheduler_config)
    assert sched.config.prediction_type == prediction_type
    tr = diffusion_loss(m.unet, x0, ehs, sched, torch.Generator().manual_seed(1), return_trace=True)
    abar = _abar_independent(tr.timesteps)
    eps = tr.noise.double()
    # x_t = sqrt(abar) x0 + sqrt(1 - abar) eps
    torch.testing.assert_close(tr.noisy_latents.double(), abar.sqrt() * x0.double() + (1 - abar).sqrt() * eps,
                               rtol=1e-5, atol=1e-5)
    if prediction_type == "epsilon":
        assert torch.equal(tr.target, tr.noise)
    else:  # v = sqrt(abar) eps - sqrt(1 - abar) x0
        torch.testing.assert_close(tr.target.double(), abar.sqrt() * eps - (1 - abar).sqrt() * x0.double(),
                                   rtol=1e-5, atol=1e-5)
    expected = ((tr.model_pred - tr.target) ** 2).mean()
    torch.testing.assert_close(tr.loss, expected)
    assert tr.shapes()["noisy_latents"] == (4, 4, 4, 4) and tr.shapes()["timesteps"] == (4,)
    # the generator alone decides the draw
    tr2 = diffusion_loss(m.unet, x0, ehs, sched, torch.Generator().manual_seed(1), return_trace=True)
    assert torch.equal(tr.noise, tr2.noise) and torch.equal(tr.timesteps, tr2.timesteps)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weights(prediction_type):
    m, x0, ehs = _tiny_unet_batch(prediction_type)
    sched = make_noise_scheduler(m.scheduler_config)
    t = torch.tensor([0, 100, 500, 999])
    tr = diffusion_loss(m.unet, x0, ehs, sched, torch.Generator().manual_seed(2), min_snr_gamma=5.0, timesteps=t,
                        return_trace=True)
    abar = _abar_independent(t).flatten()
    snr = abar / (1 - abar)
    w = torch.clamp(snr, max=5.0) / (snr if prediction_type == "epsilon" else snr + 1)
    torch.testing.assert_close(tr.weights.double(), w, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(tr.loss, (tr.per_sample_loss * tr.weights).mean())


def test_noise_offset_shifts_channel_means():
    m, x0, ehs = _tiny_unet_batch()
    sched = make_noise_scheduler(m.scheduler_config)
    plain = diffusion_loss(m.unet, x0, ehs, sched, torch.Generator().manual_seed(3), return_trace=True)
    off = diffusion_loss(m.unet, x0, ehs, sched, torch.Generator().manual_seed(3), noise_offset=0.5, return_trace=True)
    d = off.noise - plain.noise  # a per-(sample, channel) constant
    assert d.abs().sum() > 0
    torch.testing.assert_close(d, d[:, :, :1, :1].expand_as(d))


def test_loss_finite_and_decreasing_on_a_fixed_batch():
    m, x0, ehs = _tiny_unet_batch()
    sched = make_noise_scheduler(m.scheduler_config)
    g = torch.Generator().manual_seed(0)
    noise, t = torch.randn(x0.shape, generator=g), torch.randint(0, 1000, (4,), generator=g)
    m.unet.train().requires_grad_(True)
    opt = torch.optim.AdamW(m.unet.parameters(), lr=1e-3)
    losses = []
    for _ in range(15):
        loss = diffusion_loss(m.unet, x0, ehs, sched, None, noise=noise, timesteps=t)
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


def test_checkpoint_roundtrip_restores_everything(tmp_path):
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(net.parameters(), lr=0.1)
    net(torch.randn(5, 3)).sum().backward()
    opt.step()
    gen = torch.Generator().manual_seed(7)
    torch.randn(3, generator=gen)
    random.seed(1)
    np.random.seed(2)
    path = save_checkpoint(tmp_path / "ckpt-x-0000005", step=5, modules={"net": net}, optimizers={"opt": opt},
                           generators={"g": gen}, extra={"history": [(1, 0.5)], "note": "hi"})
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temp leftovers
    want = (torch.randn(4, generator=gen), torch.randn(4), random.random(), np.random.rand())
    want_w = {k: v.clone() for k, v in net.state_dict().items()}

    net2 = torch.nn.Linear(3, 2)
    opt2 = torch.optim.AdamW(net2.parameters(), lr=0.1)
    gen2 = torch.Generator()
    st = load_checkpoint(path, modules={"net": net2}, optimizers={"opt": opt2}, generators={"g": gen2})
    assert st["step"] == 5 and st["extra"]["note"] == "hi"
    got = (torch.randn(4, generator=gen2), torch.randn(4), random.random(), np.random.rand())
    assert torch.equal(want[0], got[0]) and torch.equal(want[1], got[1]) and want[2:] == got[2:]
    for k, v in net2.state_dict().items():
        assert torch.equal(v, want_w[k])
    assert opt2.state_dict()["state"][0]["exp_avg"].equal(opt.state_dict()["state"][0]["exp_avg"])
    assert latest_checkpoint(tmp_path) == path
    # overwriting an existing checkpoint is atomic too
    save_checkpoint(path, step=6, modules={"net": net})
    assert load_checkpoint(path, modules={"net": net2})["step"] == 6


def test_loss_curve_png(tmp_path):
    from PIL import Image

    p = loss_curve_png(tmp_path / "c.png", {"a": [(i, 1 / (i + 1)) for i in range(50)], "b": [(0, 0.3), (49, 0.1)]},
                       title="t", log_y=True, smooth_window=3)
    assert Image.open(p).size == (800, 480)


def _tiny_cfg(tmp_path, name, **kw):
    from sdknobs.shapes.pretrain import PretrainConfig

    base = dict(out=str(tmp_path / name / "model"), run_dir=str(tmp_path / name / "run"), image_size=16,
                vae_channels="8,16,16", unet_channels="16,32", layers_per_block=1, text_width=16, heads=2,
                vae_steps=4, vae_batch=4, vae_warmup=1, unet_steps=4, unet_batch=4, warmup_steps=1,
                latent_pool=24, val_size=8, checkpoint_every=2, eval_every=2, log_every=1, keep_checkpoints=10,
                sample_steps=2, samples=2, progress=False, save_fp16=True)
    base.update(kw)
    return PretrainConfig(**base)


def _weights(ckpt):
    return load_file(str(ckpt / "weights.safetensors"))


def test_pretrain_tiny_end_to_end_resume_is_bit_identical(tmp_path):
    from diffusers import StableDiffusionPipeline

    from sdknobs.model import load_model
    from sdknobs.shapes.pretrain import pretrain

    cfg = _tiny_cfg(tmp_path, "a")
    out = pretrain(cfg)
    run = tmp_path / "a" / "run"
    final = _weights(run / "ckpt-unet-0000004")
    assert {k.split("/")[0] for k in final} == {"unet", "text_encoder", "vae", "ema_unet", "ema_text_encoder"}
    for f in ("loss_vae.png", "loss_unet.png", "samples.png", "samples.txt", "vae_reconstructions.png"):
        assert (run / f).exists(), f
    # the stage-2 loss history is finite
    hist = torch.load(run / "ckpt-unet-0000004" / "state.pt", weights_only=True)["extra"]["history"]
    assert all(np.isfinite(v) for _, v in hist["unet_loss"]) and len(hist["unet_loss"]) == 4

    # resume from the middle of stage 1, and from the middle of stage 2: same bits as uninterrupted
    for name, drop in (("b", ["ckpt-vae-0000004", "ckpt-unet-0000002", "ckpt-unet-0000004", "latent_cache.safetensors"]),
                       ("c", ["ckpt-unet-0000004"])):
        shutil.copytree(run, tmp_path / name / "run")
        for d in drop:
            p = tmp_path / name / "run" / d
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        with pytest.raises(SdknobsError, match="--resume"):
            pretrain(_tiny_cfg(tmp_path, name, sample_steps=0))
        pretrain(_tiny_cfg(tmp_path, name, sample_steps=0, resume=True))
        again = _weights(tmp_path / name / "run" / "ckpt-unet-0000004")
        assert again.keys() == final.keys()
        diff = [k for k in final if not torch.equal(final[k], again[k])]
        assert not diff, f"resume {name}: {len(diff)} tensors differ, e.g. {diff[:3]}"

    # the output folder: fp16 on disk, loads as fp32, has a provenance note, scaling factor set
    assert (out / "README.md").read_text().startswith("# shapes")
    sd = load_file(str(out / "unet" / "diffusion_pytorch_model.safetensors"))
    assert all(v.dtype == torch.float16 for v in sd.values())
    m = load_model(out)
    assert m.dtype == torch.float32 and m.default_size == 16
    assert m.latent_scale != 0.18215 and np.isfinite(m.latent_scale)
    pipe = StableDiffusionPipeline.from_pretrained(str(out), safety_checker=None, requires_safety_checker=False,
                                                   local_files_only=True)  # default dtypes, as a user would
    assert {pipe.unet.dtype, pipe.vae.dtype, pipe.text_encoder.dtype} == {torch.float32}
    pipe.set_progress_bar_config(disable=True)
    img = pipe("a large red circle in the centre, white background", num_inference_steps=2, guidance_scale=3.0,
               generator=torch.Generator().manual_seed(0), output_type="np").images
    assert img.shape == (1, 16, 16, 3) and np.isfinite(img).all()


def test_vae_stage_reduces_reconstruction_loss(tmp_path):
    from sdknobs.shapes.pretrain import _Run

    cfg = _tiny_cfg(tmp_path, "v", vae_steps=30, vae_batch=8, vae_lr=3e-3, vae_warmup=2, checkpoint_every=30, eval_every=30,
                    log_every=5)
    run = _Run(cfg)
    run.dir.mkdir(parents=True)
    x_val = run.vae_val()
    before = run.eval_vae(x_val)
    run.train_vae(None)
    losses = [v for _, v in run.history["vae_loss"]]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    assert run.eval_vae(x_val) > before


def test_config_validation():
    from sdknobs.shapes.pretrain import PretrainConfig, build_parser

    with pytest.raises(SdknobsError, match="--prediction-type"):
        PretrainConfig(prediction_type="sample")
    with pytest.raises(SdknobsError, match="--image-size"):
        PretrainConfig(image_size=36)
    with pytest.raises(SdknobsError, match="--caption-dropout"):
        PretrainConfig(caption_dropout=1.0)
    with pytest.raises(SdknobsError, match="--unet-lr must be a finite number, got nan"):
        PretrainConfig(unet_lr=float("nan"))
    with pytest.raises(SdknobsError, match="--seed -9223372036854775809 is outside the seeds torch accepts"):
        PretrainConfig(seed=-2**63 - 1)
    with pytest.raises(SdknobsError, match="--device 'mps'"):
        PretrainConfig(device="mps")
    args = build_parser().parse_args(["--unet-steps", "7", "--no-progress", "--unet-lr", "1e-4"])
    cfg = PretrainConfig(**vars(args))
    assert cfg.unet_steps == 7 and cfg.progress is False and cfg.unet_lr == 1e-4


def test_pretrain_token_ids_equal_the_tokenizer(tmp_path):
    """The per-word token cache must give exactly the tokenizer's ids for every kind of caption."""
    import random

    from sdknobs.shapes.pretrain import PretrainConfig, _Run
    from sdknobs.shapes.world import caption, sample_scene

    cfg = PretrainConfig(run_dir=str(tmp_path), out=str(tmp_path / "m"), vae_channels="16,32,32",
                         unet_channels="32,64", text_width=32, progress=False)
    run = _Run(cfg)
    rng = random.Random(3)
    caps = [caption(sample_scene(rng), rng) for _ in range(300)] + ["", "A Red, circle!! 2 shapes", "x " * 90]
    tok = run.model.tokenizer
    want = tok(caps, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert torch.equal(run.tokens(caps), want)
    assert torch.equal(run.tokens(caps), want)  # second time from the caches
