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


def test_traced_training_unet_gives_eager_bits_and_gradients(tiny):
    """fast.TracedUNet (the training default): outputs, LoRA gradients and the text gradient are
    bit-identical to the eager U-Net, across optimizer updates and a second input shape."""
    import copy

    from peft import LoraConfig

    from sdknobs.fast import TracedUNet

    unet = copy.deepcopy(tiny.unet).requires_grad_(False)
    unet.add_adapter(LoraConfig(r=2, lora_alpha=2, init_lora_weights="gaussian", target_modules=["to_k", "to_q"]))
    unet.train()
    params = [p for p in unet.parameters() if p.requires_grad]
    traced = TracedUNet(unet)
    opt = torch.optim.SGD(params, lr=0.5)
    g = torch.Generator().manual_seed(0)
    for batch in (2, 2, 3):
        x = torch.randn(batch, 4, 8, 8, generator=g)
        c0 = torch.randn(batch, 77, tiny.text_width, generator=g)
        t = torch.randint(0, 1000, (batch,), generator=g)
        results = []
        for u in (unet, traced):
            c = c0.clone().requires_grad_(True)  # as textual inversion's text embedding
            out = _call(u, x, t, c)
            ((out - x) ** 2).mean().backward()
            results.append((out.detach(), [p.grad.clone() for p in params], c.grad))
            opt.zero_grad()
        (o_e, g_e, c_e), (o_t, g_t, c_t) = results
        assert torch.equal(o_e, o_t) and torch.equal(c_e, c_t)
        assert all(torch.equal(a, b) for a, b in zip(g_e, g_t)) and any(a.abs().sum() > 0 for a in g_e)
        for p, gr in zip(params, g_e):  # an optimizer step in place: the graph must see the new weights
            p.grad = gr
        opt.step()
        opt.zero_grad()
    assert len(traced.graphs) == 2  # batch 2 and batch 3
    h = unet.conv_out.register_forward_hook(lambda m, i, o: o * 0)
    try:  # a hook would be skipped by a trace: the wrapper built now calls the eager U-Net
        assert _call(TracedUNet(unet), x, t, c0).abs().max() == 0
    finally:
        h.remove()
