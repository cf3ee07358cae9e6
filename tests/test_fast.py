"""The opt-in TorchScript-frozen U-Net (`load_model(..., jit=True)` / `--jit`)."""
import torch

from sdknobs import load_model
from sdknobs.fast import FrozenUNet, sampling_unet
from sdknobs.pipelines import generate


def _call(unet, x, t, c):
    return unet(x, t, encoder_hidden_states=c, return_dict=False)[0]


def test_frozen_unet_matches_eager_and_follows_weight_edits(tiny):
    g = torch.Generator().manual_seed(0)
    x, c = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, tiny.text_width, generator=g)
    t = torch.tensor(500)
    fast = FrozenUNet(tiny.unet)
    with torch.no_grad():
        ref = _call(tiny.unet, x, t, c)
        assert torch.allclose(_call(fast, x, t, c), ref, atol=1e-5)
        assert torch.allclose(_call(fast, x, torch.tensor(20), c), _call(tiny.unet, x, torch.tensor(20), c), atol=1e-5)
        w = tiny.unet.conv_out.bias
        saved = w.clone()
        try:
            w.add_(0.5)  # an in-place weight edit (as a LoRA merge does) must not be served by the stale graph
            assert torch.allclose(_call(fast, x, t, c), ref + 0.5, atol=1e-4)
        finally:
            w.copy_(saved)
        # hooks (and adapter layers) make the wrapper fall back to the eager U-Net, whose output it returns
        h = tiny.unet.conv_out.register_forward_hook(lambda m, i, o: o * 0)
        try:
            assert _call(fast, x, t, c).abs().max() == 0
        finally:
            h.remove()


def test_jit_model_samples_like_eager(tiny_dir):
    eager, jit = load_model(tiny_dir), load_model(tiny_dir, jit=True)
    assert sampling_unet(eager) is eager.unet and isinstance(sampling_unet(jit), FrozenUNet)
    kw = dict(steps=4, guidance=3.0, seed=1, progress=False)
    a = generate(eager, "a red circle", **kw).images[0]
    b = generate(jit, "a red circle", **kw).images[0]
    import numpy as np

    assert np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max() <= 1
