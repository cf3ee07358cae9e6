"""SDXL LoRA files against diffusers' own SDXL loader, on tiny random SDXL weights (sdknobs.tiny).

Our kohya file (U-Net under kohya's SGM names lora_unet_input_blocks_..., text encoders lora_te1_/lora_te2_)
and our diffusers file (unet./text_encoder./text_encoder_2.) are loaded by `StableDiffusionXLPipeline
.load_lora_weights`; diffusers' peft layers must hold our delta W on every layer (no key left out), and
our sampler with the LoRA applied (peft bypass) must give the latents diffusers' pipeline gives with the
file loaded: same seed, Euler, 4 steps, guidance 4; tolerance 1e-4 absolute on latents of magnitude ~1
(the same operations in the same order: in practice ~1e-6)."""
import logging
import re

import pytest
import torch
from safetensors.torch import load_file

from sdknobs import load_model
from sdknobs.lora import layers as L
from sdknobs.lora.files import LoraFactors, LoraWeights, read_lora, write_lora
from sdknobs.lora.keys import KOHYA_UNET_SGM
from sdknobs.lora.targets import resolve_targets

TARGETS = ["attn-ff", "conv", r"te:mlp\.fc[12]$", r"te2:mlp\.fc[12]$"]
ATOL = 1e-4
PROMPT = "a small red circle on the left, white background"


def random_lora(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = LoraWeights({})
    for i, t in enumerate(resolve_targets(model, TARGETS, text_encoder=True)):
        rank, alpha = (4, 4.0) if i % 3 else (2, 1.0 + i % 5)  # mixed ranks and alphas, as merges make
        w.layers[L.layer_key(model, t.component, t.name)] = LoraFactors(
            torch.randn(t.down_shape(rank), generator=g) * 0.2, torch.randn(t.up_shape(rank), generator=g) * 0.2, alpha)
    return w


@pytest.fixture(scope="module")
def lora(xl):
    return random_lora(xl)


@pytest.fixture(scope="module")
def files(lora, tmp_path_factory):
    d = tmp_path_factory.mktemp("xl-lora")
    return {fmt: write_lora(lora, d / f"{fmt}.safetensors", fmt) for fmt in ("kohya", "diffusers")}


@pytest.fixture(scope="module")
def pipe(xl_dir):
    from diffusers import StableDiffusionXLPipeline

    logging.getLogger("diffusers").setLevel(logging.ERROR)
    p = StableDiffusionXLPipeline.from_pretrained(xl_dir)
    p.set_progress_bar_config(disable=True)
    return p


def test_kohya_file_uses_kohyas_sdxl_names(files, lora):
    sd = load_file(str(files["kohya"]))
    names = {k.split(".")[0] for k in sd}
    unet = [n for n in names if n.startswith("lora_unet_")]
    assert unet and all(KOHYA_UNET_SGM.match(n) for n in unet), unet[:3]
    assert any(n.startswith("lora_unet_input_blocks_4_1_transformer_blocks_1_attn1_to_q") for n in unet)
    assert any(n.startswith("lora_te1_text_model_encoder_layers_") for n in names)
    assert any(n.startswith("lora_te2_text_model_encoder_layers_") for n in names)
    assert not any(n.startswith(("lora_te_", "lora_unet_down_blocks")) for n in names)
    assert len(names) == len(lora.layers)


@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_round_trip(files, lora, xl, fmt):
    back = read_lora(files[fmt], model=xl)
    assert back.architecture == "SDXL" and set(back.layers) == set(lora.layers)
    for k, f in lora.layers.items():
        torch.testing.assert_close(back.layers[k].delta(), f.delta(), atol=1e-6, rtol=1e-5)


def _peft_deltas(pipe) -> dict[str, torch.Tensor]:
    """delta W of every peft LoRA layer diffusers injected, keyed like our LoraWeights."""
    from peft.tuners.lora import LoraLayer

    out = {}
    for comp in ("unet", "text_encoder", "text_encoder_2"):
        for name, mod in getattr(pipe, comp).named_modules():
            if isinstance(mod, LoraLayer):
                for a in mod.lora_A:
                    key = f"{comp}.{name}" if comp == "unet" or name.startswith("text_model.") else \
                        f"{comp}.text_model.{name}"
                    out[key] = mod.get_delta_weight(a).detach().float()
    return out


@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_diffusers_loads_every_layer_with_our_delta(pipe, files, lora, fmt):
    pipe.load_lora_weights(str(files[fmt]), adapter_name=fmt)
    try:
        got = _peft_deltas(pipe)
        assert set(got) == set(lora.layers), sorted(set(lora.layers) ^ set(got))[:4]
        for k, f in lora.layers.items():
            want = f.delta().reshape(got[k].shape)
            assert float((got[k] - want).abs().max() / want.abs().max()) < 1e-5, k
    finally:
        pipe.unload_lora_weights()


def test_same_latents_as_diffusers_with_our_kohya_file(pipe, xl, files):
    from sdknobs.loop import make_scheduler
    from sdknobs.pipelines import _run

    kw = dict(steps=4, guidance=4.0, scheduler="euler", seed=3, width=32, height=32, batch=1)
    with L.applied(xl, [str(files["kohya"])]):
        ours, _ = _run(xl, PROMPT, "", progress=False, **kw)
    plain, _ = _run(xl, PROMPT, "", progress=False, **kw)
    pipe.scheduler = make_scheduler("euler", xl.scheduler_config)
    pipe.load_lora_weights(str(files["kohya"]))
    try:
        ref = pipe(PROMPT, num_inference_steps=4, guidance_scale=4.0, height=32, width=32,
                   generator=torch.Generator().manual_seed(3), output_type="latent").images
    finally:
        pipe.unload_lora_weights()
    assert float((ours - plain).abs().max()) > 1e-2  # the LoRA changes the picture: the comparison means something
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=0)


def test_sd1_lora_on_sdxl_and_the_reverse_name_both_families(xl, tiny, tmp_path):
    from sdknobs.errors import SdknobsError

    sd1 = LoraWeights({})
    for t in resolve_targets(tiny, ["cross-attn"], text_encoder=True):
        sd1.layers[L.layer_key(tiny, t.component, t.name)] = LoraFactors(torch.ones(t.down_shape(2)),
                                                                          torch.ones(t.up_shape(2)), 2.0)
    a = write_lora(sd1, tmp_path / "sd1.safetensors")
    b = write_lora(random_lora(xl), tmp_path / "xl.safetensors")
    with pytest.raises(SdknobsError, match=r"LoRA for SD1\.x/SD2\.x .*is an SDXL-architecture model"):
        read_lora(a, model=xl)
    with pytest.raises(SdknobsError, match=r"LoRA for SDXL .*is an SD1\.x/SD2\.x-architecture model"):
        read_lora(b, model=tiny)
    msg = ""
    try:
        L.apply_loras(tiny, [str(b)])
    except SdknobsError as e:
        msg = str(e)
    assert "\n" not in msg and re.search(r"SDXL.*SD1\.x/SD2\.x", msg), msg


# --- ComfyUI's and A1111's rules for SDXL (encoded, see peers.py for the SD1 ones) ----------------------------------

def comfy_sdxl_key_map(model) -> dict[str, str]:
    """ComfyUI comfy/lora.py, SDXL: model_lora_keys_unet maps 'lora_unet_' + every diffusion_model.* weight's SGM
    path with '_' (A1111's networks.py finds the same module by replacing lora_unet with diffusion_model in its
    network_layer_mapping); model_lora_keys_clip maps lora_te1_ to clip_l and lora_te2_ to clip_g,
    text_model_encoder_layers_{b}_{c} for b < 32 and LORA_CLIP_MAP's c. The SGM names come from sdknobs'
    single-file writer (whose files diffusers' from_single_file reads, tests/test_sdxl.py), mapped back by storage."""
    from sdknobs.single_file import ldm_state_dict

    from .peers import LORA_CLIP_MAP, te_name

    def ident(t):
        return t.data_ptr(), tuple(t.shape)

    diffusers_of = {ident(t): f"unet.{k[:-len('.weight')]}" for k, t in model.unet.state_dict().items()
                    if k.endswith(".weight")}
    km = {}
    for k, t in ldm_state_dict(model.text_encoder, model.unet, model.vae, "sdxl", model.text_encoder_2).items():
        if k.startswith("model.diffusion_model.") and k.endswith(".weight") and ident(t) in diffusers_of:
            km["lora_unet_" + k[len("model.diffusion_model."):-len(".weight")].replace(".", "_")] = diffusers_of[ident(t)]
    for i, comp in enumerate(("text_encoder", "text_encoder_2")):
        names = {te_name(n) for n, _ in getattr(model, comp).named_modules() if n}
        for b in range(32):
            for c, kc in LORA_CLIP_MAP.items():
                if f"text_model.encoder.layers.{b}.{c}" in names:
                    km[f"lora_te{i + 1}_text_model_encoder_layers_{b}_{kc}"] = f"{comp}.text_model.encoder.layers.{b}.{c}"
    return km


def test_comfyui_and_a1111_rules_place_every_key_of_our_sdxl_kohya_file(xl, files, lora):
    sd = load_file(str(files["kohya"]))
    used, worst = set(), 0.0
    for x, layer in comfy_sdxl_key_map(xl).items():
        if f"{x}.lora_up.weight" not in sd:
            continue
        up, down = sd[f"{x}.lora_up.weight"], sd[f"{x}.lora_down.weight"]
        scale = float(sd[f"{x}.alpha"]) / down.shape[0]  # LoRAAdapter.calculate_weight: alpha / mat2.shape[0]
        got = (up.float().flatten(1) @ down.float().flatten(1)) * scale
        want = lora.layers[layer].delta().flatten(1)
        worst = max(worst, float((got - want).abs().max() / want.abs().max()))
        used |= {f"{x}.lora_up.weight", f"{x}.lora_down.weight", f"{x}.alpha"}
    assert set(sd) == used, sorted(set(sd) - used)[:4]  # no key left unloaded ('lora key not loaded')
    assert worst < 1e-5


def test_peft_file_of_an_sdxl_unet_is_read(xl_dir, tmp_path):
    """peft's own save (get_peft_model_state_dict: bare module paths) with its adapter_config.json beside it."""
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
    from safetensors.torch import save_file

    m = load_model(xl_dir, device="cpu", dtype="fp32")
    cfg = LoraConfig(r=2, lora_alpha=6, target_modules=["attn2.to_q", "attn2.to_k"], init_lora_weights=False)
    inject_adapter_in_model(cfg, m.unet)
    save_file(get_peft_model_state_dict(m.unet), str(tmp_path / "adapter_model.safetensors"))
    cfg.save_pretrained(str(tmp_path))
    w = read_lora(tmp_path / "adapter_model.safetensors", model=m)
    assert w.format == "peft" and w.architecture == "SDXL" and w.layers
    for key, f in w.layers.items():
        mod = m.unet.get_submodule(key.split(".", 1)[1])
        torch.testing.assert_close(f.delta(), mod.get_delta_weight("default").detach(), atol=1e-6, rtol=1e-5)
