"""LoRA library: targets, files (kohya / diffusers / peft), applying several LoRAs with weights and
windows, merging, inspection, and training (loss goes down, only A and B change).

Tolerances: float32 on the CPU. A bypass evaluated by peft, and the same update folded into W,
agree to ~1e-6 relative; we assert 1e-5 (absolute, on outputs of magnitude ~1)."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from sdknobs import SdknobsError, load_model
from sdknobs.lora import layers as L
from sdknobs.lora.files import LoraFactors, LoraWeights, read_lora, write_lora
from sdknobs.lora.inspect import conflict, inspect_lines
from sdknobs.lora.merge import combine, merge_into
from sdknobs.lora.spec import parse_spec
from sdknobs.lora.targets import count_params, rank_for_budget, resolve_targets

PROMPT = "a small red circle on the left, white background"


@pytest.fixture
def fresh(tiny_dir):
    """A model of its own (tests inject adapters; the session-wide `tiny` must stay clean)."""
    return load_model(tiny_dir)


def random_lora(model, targets=("cross-attn",), text_encoder=False, rank=2, alpha=3.0, seed=0) -> LoraWeights:
    """LoraWeights with random A and B on the given targets (no training needed)."""
    g = torch.Generator().manual_seed(seed)
    w = LoraWeights({})
    for t in resolve_targets(model, list(targets), text_encoder):
        key = L.layer_key(model, t.component, t.name)
        w.layers[key] = LoraFactors(torch.randn(t.down_shape(rank), generator=g) * 0.3,
                                    torch.randn(t.up_shape(rank), generator=g) * 0.3, alpha)
    return w


def unet_out(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=g)
    c = torch.randn(2, 77, model.text_width, generator=g)
    with torch.no_grad():
        return model.unet(x, torch.tensor([10, 700]), c).sample


# --- --lora syntax ----------------------------------------------------------------------------------

def test_spec_syntax():
    s = parse_spec("style.safetensors:0.8@0.6-1")
    assert (s.path, s.weight, s.window.lo, s.window.hi) == ("style.safetensors", 0.8, 0.6, 1.0)
    assert parse_spec("a.safetensors").weight == 1.0 and parse_spec("a.safetensors").window is None
    assert parse_spec(r"C:\loras\a.safetensors:-0.5").path == r"C:\loras\a.safetensors"
    w = parse_spec("a.safetensors@t<400").window
    assert w.active(0, 10, 399) and not w.active(0, 10, 400)
    last40 = parse_spec("a.safetensors@0.6-1").window
    assert [i for i in range(10) if last40.active(i, 10, 0)] == [6, 7, 8, 9]
    for bad, msg in [("a.safetensors:abc", "weight 'abc' is not a number"), ("a.safetensors@0.8-0.2", "0 <= start < end"),
                     ("a.safetensors@t=400", "is not START-END"), (":1", "no file name")]:
        with pytest.raises(SdknobsError, match=msg):
            parse_spec(bad)


# --- targets ----------------------------------------------------------------------------------------

def test_presets_and_regex(fresh):
    n_attn2 = sum(1 for n, _ in fresh.unet.named_modules() if n.endswith(".attn2"))
    assert len(resolve_targets(fresh, ["cross-attn"])) == 4 * n_attn2
    assert len(resolve_targets(fresh, ["attn"])) == 8 * n_attn2
    conv = resolve_targets(fresh, ["conv"])
    assert conv and all(t.kind == "conv" and "resnets" in t.name for t in conv)
    te = resolve_targets(fresh, ["cross-attn"], text_encoder=True)
    assert {t.component for t in te} == {"unet", "text_encoder"}
    assert [t.name for t in resolve_targets(fresh, [r"mid_block.*attn2\.to_k$"])] == [
        "mid_block.attentions.0.transformer_blocks.0.attn2.to_k"]
    with pytest.raises(SdknobsError, match=r"--targets 'nothing_here' .* matches no Linear or Conv2d layer of the unet"):
        resolve_targets(fresh, ["cross-attn", "nothing_here"])
    budget = count_params(resolve_targets(fresh, ["cross-attn"]), 8)
    r = rank_for_budget(conv, budget)
    assert abs(count_params(conv, r) - budget) <= count_params(conv, 1) / 2 + 1


def test_sd15_parameter_count_matches_peft():
    """On SD1.5's U-Net (built on the meta device), rank 4 on to_q/k/v/out.0 of attn1 and attn2 is peft's
    well-known 797,184 trainable parameters."""
    from diffusers import UNet2DConditionModel

    from sdknobs.model import ASSETS, Model

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(json.loads((ASSETS / "configs/sd1/unet/config.json").read_text()))
    m = Model(None, None, unet, None, {})
    assert count_params(resolve_targets(m, ["attn"]), 4) == 797_184
    assert count_params(resolve_targets(m, ["cross-attn"]), 4) == 397_824


# --- files ------------------------------------------------------------------------------------------

def _same(a: LoraWeights, b: LoraWeights, exact=True):
    """Same layers and delta W; `exact`: the same factor bits and alpha too (a kohya file whose layers share
    one alpha; otherwise the writer folds scales into B, see files.portable)."""
    assert set(a.layers) == set(b.layers)
    for k in a.layers:
        torch.testing.assert_close(a.layers[k].delta(), b.layers[k].delta(), atol=1e-6, rtol=1e-6)
        if exact:
            assert torch.equal(a.layers[k].down, b.layers[k].down) and torch.equal(a.layers[k].up, b.layers[k].up)
            assert a.layers[k].alpha == b.layers[k].alpha


@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_round_trip(fresh, tmp_path, fmt):
    w = random_lora(fresh, ["cross-attn", "conv"], text_encoder=True)
    path = write_lora(w, tmp_path / "x.safetensors", fmt, {"ss_network_dim": "2"})
    keys = list(load_file(str(path)))
    if fmt == "kohya":
        assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_q.lora_down.weight" in keys
        assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha" in keys
    else:
        assert "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_q.lora_A.weight" in keys
    r = read_lora(path)
    _same(w, r, exact=fmt == "kohya")
    assert r.format == fmt and r.metadata["ss_network_dim"] == "2"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left


def test_reads_peft_keys_and_alpha(fresh, tmp_path):
    """peft's save_pretrained layout: base_model.model.<module>.lora_A.weight + adapter_config.json."""
    w = random_lora(fresh)
    sd = {}
    for k, f in w.layers.items():
        module = k.split(".", 1)[1]
        sd[f"base_model.model.{module}.lora_A.weight"] = f.down
        sd[f"base_model.model.{module}.lora_B.weight"] = f.up
    save_file(sd, str(tmp_path / "adapter_model.safetensors"))
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 2, "lora_alpha": 3.0}))
    r = read_lora(tmp_path / "adapter_model.safetensors")
    _same(w, r)
    assert r.format == "peft"


def test_our_kohya_file_in_diffusers_gives_our_image(tiny_dir, pipes, tmp_path):
    """diffusers' load_lora_weights on our kohya file (U-Net + text encoder): same latents as ours."""
    from sdknobs.loop import make_scheduler
    from sdknobs.pipelines import _run

    model = load_model(tiny_dir)
    path = write_lora(random_lora(model, ["attn", "conv"], text_encoder=True), tmp_path / "k.safetensors")
    kw = dict(steps=3, guidance=3.0, scheduler="ddim", seed=1, width=32, height=32, batch=1)
    base = unet_out(model)
    L.apply_loras(model, [f"{path}:0.7"])
    assert (unet_out(model) - base).abs().max() > 1e-2  # the LoRA does change the U-Net
    ours, _ = _run(model, PROMPT, "", progress=False, **kw)
    pipe = pipes["txt2img"]
    pipe.scheduler = make_scheduler("ddim", model.scheduler_config)
    try:
        pipe.load_lora_weights(str(path), adapter_name="k")
        pipe.set_adapters(["k"], adapter_weights=[0.7])
        ref = pipe(PROMPT, num_inference_steps=3, guidance_scale=3.0, height=32, width=32,
                   generator=torch.Generator().manual_seed(1), output_type="latent").images
    finally:
        pipe.unload_lora_weights()
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)


# --- applying: composition, windows ------------------------------------------------------------------

def test_two_loras_sum_their_bypasses(tiny_dir, tmp_path):
    """W x + 0.7 s_a B_a A_a x - 0.5 s_b B_b A_b x, checked against the update folded into W."""
    m = load_model(tiny_dir)
    a = write_lora(random_lora(m, ["attn"], seed=1), tmp_path / "a.safetensors")
    b = write_lora(random_lora(m, ["cross-attn", "conv"], seed=2, alpha=1.0), tmp_path / "b.safetensors")
    base = unet_out(m)
    s = L.apply_loras(m, [f"{a}:0.7", f"{b}:-0.5"])
    stacked = unet_out(m)
    folded = load_model(tiny_dir)
    merge_into(folded, read_lora(a), 0.7)
    merge_into(folded, read_lora(b), -0.5)
    torch.testing.assert_close(stacked, unet_out(folded), atol=1e-5, rtol=0)
    assert (stacked - base).abs().max() > 1e-2
    L.remove_loras(m)
    assert not L.lora_layers(m.unet) and "lora" not in m.extra
    assert torch.equal(unet_out(m), base)  # removing puts the plain layers back
    assert s.entries == {}


def _active_steps(model, spec, steps=4):
    """Which sampler steps ran the LoRA's bypass, counted by a hook on one lora_B."""
    from sdknobs.pipelines import generate

    seen, state = [], {"i": 0}
    s = L.apply_loras(model, [spec])
    name = next(iter(s.entries))
    mod = next(m for _, m in L.lora_layers(model.unet) if name in m.lora_B)
    h = mod.lora_B[name].register_forward_hook(lambda *a: seen.append(state["i"]))

    def count(info):
        state["i"] = info["i"] + 1

    try:
        generate(model, PROMPT, steps=steps, guidance=1.0, seed=0, progress=False, callback=count)
    finally:
        h.remove()
    on = set(mod.active_adapters)  # after the run, every adapter is switched back on
    L.remove_loras(model)
    return sorted(set(seen)), on


def test_timestep_windows(tiny_dir, tmp_path):
    m = load_model(tiny_dir)
    p = write_lora(random_lora(m), tmp_path / "w.safetensors")
    assert _active_steps(m, f"{p}@0.5-1") == ([2, 3], {"w"})
    assert _active_steps(m, f"{p}@0-0.25")[0] == [0]
    from sdknobs.loop import make_scheduler

    sched = make_scheduler("ddim", m.scheduler_config)
    sched.set_timesteps(4)
    low = [i for i, t in enumerate(sched.timesteps) if t < 400]
    assert _active_steps(m, f"{p}@t<400")[0] == low and 0 < len(low) < 4
    # a window over every step is the plain LoRA, bit for bit; an empty one is the base model
    from sdknobs.pipelines import _run

    kw = dict(steps=2, guidance=1.0, scheduler="ddim", seed=2, width=32, height=32, batch=1, progress=False)
    runs = {}
    for spec in (None, str(p), f"{p}@0-1", f"{p}@t>5000"):
        with L.applied(m, [spec] if spec else []):
            runs[spec], _ = _run(m, PROMPT, "", **kw)
    assert torch.equal(runs[str(p)], runs[f"{p}@0-1"])
    assert torch.equal(runs[None], runs[f"{p}@t>5000"])
    assert not torch.equal(runs[None], runs[str(p)])


def test_pipeline_lora_argument_is_for_one_call(tiny_dir, tmp_path):
    from sdknobs.pipelines import generate

    m = load_model(tiny_dir)
    p = write_lora(random_lora(m), tmp_path / "style.safetensors")
    r = generate(m, PROMPT, steps=2, seed=0, progress=False, lora=[f"{p}:0.5@0.5-1"])
    assert "Lora hashes: \"style: " in r.parameters[0] and "Lora: \"" in r.parameters[0]
    assert "lora" not in m.extra and not L.lora_layers(m.unet)


# --- merge ------------------------------------------------------------------------------------------

def test_merge_unmerge_and_combine(tiny_dir, tmp_path):
    m = load_model(tiny_dir)
    wa, wb = random_lora(m, ["attn"], seed=3), random_lora(m, ["cross-attn"], rank=3, seed=4, alpha=1.5)
    a = write_lora(wa, tmp_path / "a.safetensors")
    weights = {n: p.clone() for n, p in m.unet.state_dict().items()}
    L.apply_loras(m, [str(a)])
    unmerged = unet_out(m)
    for _, mod in L.lora_layers(m.unet):  # peft's merge / unmerge of the same bypass
        mod.merge()
    torch.testing.assert_close(unet_out(m), unmerged, atol=1e-5, rtol=0)
    for _, mod in L.lora_layers(m.unet):
        mod.unmerge()
    L.remove_loras(m)
    for n, p in m.unet.state_dict().items():
        torch.testing.assert_close(p, weights[n], atol=1e-6, rtol=0)
    # concatenation is exact: delta = 0.6 delta_a + 2 delta_b on every layer
    cat, err = combine([(wa, 0.6), (wb, 2.0)], "concat")
    for k, f in cat.layers.items():
        want = 0.6 * (wa.layers[k].delta() if k in wa.layers else 0) + 2.0 * (wb.layers[k].delta() if k in wb.layers else 0)
        torch.testing.assert_close(f.delta(), want, atol=1e-5, rtol=0)
        assert f.rank == (2 if k in wa.layers else 0) + (3 if k in wb.layers else 0)
    # SVD: exact at full rank, approximate (and the reported error is the true one) below it
    full, err = combine([(wa, 0.6), (wb, 2.0)], "svd", rank=5)
    assert max(err.values()) < 1e-5
    one, err = combine([(wa, 0.6), (wb, 2.0)], "svd", rank=1)
    k = next(k for k in wb.layers)
    true = (one.layers[k].delta() - cat.layers[k].delta()).norm() / cat.layers[k].delta().norm()
    assert err[k] == pytest.approx(float(true), rel=1e-4) and err[k] > 0.01
    # a merged model written through the CLI's path loads and equals the bypass
    from sdknobs.lora.merge import merge_check

    report = merge_check(load_model(tiny_dir), [parse_spec(f"{a}:0.5")], tmp_path / "merged")
    assert "U-Net output max |diff|" in report
    merged = load_model(tmp_path / "merged")
    with L.applied(fresh := load_model(tiny_dir), [f"{a}:0.5"]):
        torch.testing.assert_close(unet_out(merged), unet_out(fresh), atol=1e-5, rtol=0)


# --- errors -----------------------------------------------------------------------------------------

def test_errors_name_the_key_and_shapes(fresh, tmp_path):
    w = random_lora(fresh)
    key = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
    w.layers[key] = LoraFactors(torch.zeros(2, 48), torch.zeros(64, 2), 2.0)  # to_k reads 32-wide text
    path = write_lora(w, tmp_path / "bad.safetensors")
    with pytest.raises(SdknobsError, match=r"key 'lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
                                           r"\.lora_down\.weight' \(lora_down\) has shape \(2, 48\), .* needs \(2, 32\)"):
        L.apply_loras(fresh, [str(path)])
    assert "lora" not in fresh.extra or not fresh.extra["lora"].entries
    sd = load_file(str(write_lora(random_lora(fresh), tmp_path / "ok.safetensors")))
    for extra, msg in [({"lora_unet_mid_block_attentions_0_proj_in.hada_w1_a": torch.zeros(1)}, "is not a LoRA down/up"),
                       ({"lora_unet_down_blocks_7_attentions_0_transformer_blocks_0_attn2_to_q.lora_down.weight":
                         torch.zeros(2, 32),
                         "lora_unet_down_blocks_7_attentions_0_transformer_blocks_0_attn2_to_q.lora_up.weight":
                         torch.zeros(32, 2)},
                        "targets unet layer 'down_blocks.7.attentions.0.transformer_blocks.0.attn2.to_q', but the "
                        "loaded model has no such layer"),
                       ({"lora_unet_down_blocks_7_attn2_to_q.lora_down.weight": torch.zeros(2, 32),
                         "lora_unet_down_blocks_7_attn2_to_q.lora_up.weight": torch.zeros(32, 2)},
                        "'lora_unet_down_blocks_7_attn2_to_q' are no LoRA-able layer"),
                       ({"something.else": torch.zeros(1)}, "is neither kohya")]:
        save_file({**sd, **extra}, str(tmp_path / "x.safetensors"))
        with pytest.raises(SdknobsError, match=msg):
            L.apply_loras(load_model_like(fresh), [str(tmp_path / "x.safetensors")])
    (tmp_path / "x.pt").write_bytes(b"0")
    with pytest.raises(SdknobsError, match="expected a .safetensors file; pickled"):
        read_lora(tmp_path / "x.pt")
    te = write_lora(random_lora(fresh, text_encoder=True), tmp_path / "te.safetensors")
    with pytest.raises(SdknobsError, match="text-encoder layers, and a window"):
        L.apply_loras(fresh, [f"{te}@0.5-1"])


def load_model_like(model):
    return load_model(model.source)


# --- inspection -------------------------------------------------------------------------------------

def test_inspect_and_conflict(fresh, tmp_path):
    w = random_lora(fresh, ["cross-attn"], text_encoder=True)
    path = write_lora(w, tmp_path / "a.safetensors")
    text = "\n".join(inspect_lines(read_lora(path), fresh))
    for want in ("kohya layout", "cross-attn (", "text-encoder (", "rank:        2 (", "alpha:       3 (",
                 f"parameters:  {w.num_params():,}", "unet.down_blocks.0", "text_encoder.layers.0"):
        assert want in text
    neg = LoraWeights({k: LoraFactors(f.down, -f.up, f.alpha) for k, f in w.layers.items()})
    assert conflict(w, w).score == pytest.approx(1.0)
    c = conflict(w, neg)
    assert c.score == pytest.approx(-1.0) and "pull against each other" in c.lines()[-1]
    other = random_lora(fresh, ["attn"], seed=9)
    assert -0.5 < conflict(w, other).score < 0.5 and conflict(w, other).only_b > 0
