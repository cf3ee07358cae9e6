"""Every LoRA layout we write, loaded by each peer's own loader (run) or rules (encoded, see peers.py), on
the shipped shapes model (SD1's block layout: A1111's index arithmetic holds for it). The file has
attention, feed-forward, projection, ResNet-convolution and text-encoder attention + MLP layers, with
mixed ranks and alphas (what `lora merge` produces), the case peers scale differently unless every layer
shares one alpha. Reported per peer: keys not loaded, and max |delta W_peer - delta W_ours| / max |delta W|."""
import pytest
import torch
from safetensors.torch import load_file

from sdknobs import load_model
from sdknobs.lora import layers as L
from sdknobs.lora.files import LoraFactors, LoraWeights, read_lora, write_lora
from sdknobs.lora.targets import resolve_targets
from sdknobs.model import EMBEDDED

from . import peers

TARGETS = ["attn-ff", "conv", "text-encoder", r"te:mlp\.fc[12]$"]
REPORT = []


@pytest.fixture(scope="module")
def model():
    return load_model("shapes", device="cpu", dtype="fp32")


def random_lora(model):
    g = torch.Generator().manual_seed(0)
    w = LoraWeights({})
    for i, t in enumerate(resolve_targets(model, TARGETS)):
        rank, alpha = (4, 4.0) if i % 3 else (2, 1.0 + i % 5)  # two ranks, several alphas
        w.layers[L.layer_key(model, t.component, t.name)] = LoraFactors(
            torch.randn(t.down_shape(rank), generator=g) * 0.2, torch.randn(t.up_shape(rank), generator=g) * 0.2, alpha)
    return w


@pytest.fixture(scope="module")
def pipe():
    return peers.pipeline(EMBEDDED["shapes"])


@pytest.fixture(scope="module")
def lora(model):
    return random_lora(model)


@pytest.fixture(scope="module")
def files(lora, tmp_path_factory):
    d = tmp_path_factory.mktemp("interop")
    return {fmt: write_lora(lora, d / f"{fmt}.safetensors", fmt) for fmt in ("kohya", "diffusers")}


def compare(name, fmt, got: peers.Loaded, ours: LoraWeights, n_keys: int) -> float:
    worst = 0.0
    for layer, d in got.deltas.items():
        want = ours.layers[layer].delta().reshape(d.shape)
        worst = max(worst, float((d - want).abs().max() / want.abs().max()))
    REPORT.append(f"{name:<10} {fmt:<9} layers {len(got.deltas):>3}/{len(ours.layers)}  keys not loaded "
                  f"{len(got.not_loaded):>3}/{n_keys}  max rel |dW diff| {worst:.1e}")
    return worst


def attention_keys(sd):
    return sorted(k for k in sd if k.startswith("unet.") and ".to_" in k)


@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_peers_load_what_we_write(model, pipe, lora, files, fmt):
    path = files[fmt]
    sd, ours = load_file(str(path)), read_lora(path)
    assert len(ours.layers) == len(lora.layers)
    for layer, f in lora.layers.items():  # the file (folded scales) holds our delta W
        torch.testing.assert_close(ours.layers[layer].delta(), f.delta(), atol=1e-6, rtol=1e-5)
    expected_missing = {  # what each peer's loader leaves out, by its own rules (see peers.py)
        "kohya": {"kohya": [], "comfyui": [], "a1111": [], "diffusers": [], "lycoris": []},
        "diffusers": {"kohya": sorted(sd), "a1111": sorted(sd), "comfyui": attention_keys(sd), "diffusers": [],
                      "peft": []},
    }[fmt]
    runs = {"kohya": lambda: peers.kohya(sd, model), "comfyui": lambda: peers.comfy(sd, model),
            "a1111": lambda: peers.a1111(sd, model), "diffusers": lambda: peers.diffusers_lora(path, pipe),
            "lycoris": lambda: peers.lycoris_lora(path, load_model("shapes", device="cpu", dtype="fp32")),
            "peft": lambda: peers.peft_lora(path, load_model("shapes", device="cpu", dtype="fp32"))}
    for name, missing in expected_missing.items():
        got = runs[name]()
        assert sorted(got.not_loaded) == missing, (name, sorted(got.not_loaded)[:5])
        assert compare(name, fmt, got, ours, len(sd)) < 1e-5, name
        if not missing:
            assert set(got.deltas) == set(ours.layers), name


def test_sd15_block_layout(tmp_path):
    """SD1.5's U-Net layout (4 levels, down_blocks.3 and up_blocks.0 without attention, 2 resnets a level)
    at toy widths: the kohya file in every peer that reads it (A1111's index arithmetic included)."""
    from diffusers import UNet2DConditionModel

    from sdknobs.model import save_model
    from sdknobs.tiny import build_model

    m = build_model(seed=0)
    m.unet = UNet2DConditionModel(sample_size=8, block_out_channels=(32, 32, 64, 64), layers_per_block=2,
                                  down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                                  up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=32,
                                  attention_head_dim=2, norm_num_groups=16)
    folder = save_model(m, tmp_path / "sd15-layout")
    model = load_model(folder)
    path = write_lora(random_lora(model), tmp_path / "k.safetensors")
    sd, ours = load_file(str(path)), read_lora(path)
    for name, got in (("kohya", peers.kohya(sd, model)), ("comfyui", peers.comfy(sd, model)),
                      ("a1111", peers.a1111(sd, model)), ("diffusers", peers.diffusers_lora(path, peers.pipeline(folder)))):
        assert got.not_loaded == [] and set(got.deltas) == set(ours.layers), name
        assert compare(name, "kohya (SD1.5 layout)", got, ours, len(sd)) < 1e-5, name


def test_report():
    """pytest -s tests/interop shows the table the README's interop claims come from."""
    print("\n" + "\n".join(REPORT))
