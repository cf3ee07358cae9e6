"""Our SDXL embedding file ({"clip_l": [N, 32], "clip_g": [N, 64]} on tiny SDXL; [N, 768] and [N, 1280] on the
real one) in diffusers' SDXL pipeline by its two-call form (one `load_textual_inversion` per encoder, as diffusers'
docs load kohya/A1111 SDXL embeddings): the same latents as our sampler with the embedding loaded (same seed,
Euler, 4 steps, guidance 4; 1e-4 absolute), and a prompt without the token is unchanged."""
import logging

import pytest
import torch
from safetensors.torch import load_file

from sdknobs import load_model
from sdknobs.ti import load_embedding, read_embedding, save_embedding

TOKEN = "<xl-star>"
PROMPT = f"a small {TOKEN} on the left, white background"
ATOL = 1e-4


@pytest.fixture(scope="module")
def emb_file(tmp_path_factory):
    g = torch.Generator().manual_seed(0)
    v1, v2 = torch.randn(2, 32, generator=g), torch.randn(2, 64, generator=g)  # two vectors per encoder
    return save_embedding(tmp_path_factory.mktemp("emb") / "xl-star.safetensors", TOKEN, v1, vectors_2=v2,
                          format="kohya")


def test_file_layout(emb_file):
    sd = load_file(str(emb_file))
    assert set(sd) == {"clip_l", "clip_g"} and sd["clip_l"].shape == (2, 32) and sd["clip_g"].shape == (2, 64)
    e = read_embedding(emb_file)
    assert e.token == TOKEN and e.format == "sdxl" and e.widths == [32, 64]


def test_diffusers_two_calls_give_our_latents(xl_dir, emb_file):
    from diffusers import StableDiffusionXLPipeline

    from sdknobs.loop import make_scheduler
    from sdknobs.pipelines import _run

    logging.getLogger("diffusers").setLevel(logging.ERROR)
    m = load_model(xl_dir, device="cpu", dtype="fp32")
    kw = dict(steps=4, guidance=4.0, scheduler="euler", seed=3, width=32, height=32, batch=1)
    plain_ours, _ = _run(m, PROMPT.replace(TOKEN, "star"), "", progress=False, **kw)
    loaded = load_embedding(m, emb_file)
    assert len(loaded.ids_by_encoder) == 2 and all(len(i) == 2 for i in loaded.ids_by_encoder)
    ours, _ = _run(m, PROMPT, "", progress=False, **kw)
    still, _ = _run(m, PROMPT.replace(TOKEN, "star"), "", progress=False, **kw)
    torch.testing.assert_close(still, plain_ours, atol=0, rtol=0)  # prompts without the token: bit-identical

    pipe = StableDiffusionXLPipeline.from_pretrained(xl_dir)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = make_scheduler("euler", m.scheduler_config)
    sd = load_file(str(emb_file))
    pipe.load_textual_inversion(sd["clip_g"], token=TOKEN, text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)
    pipe.load_textual_inversion(sd["clip_l"], token=TOKEN, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    ref = pipe(PROMPT, num_inference_steps=4, guidance_scale=4.0, height=32, width=32,
               generator=torch.Generator().manual_seed(3), output_type="latent").images
    assert float((ours - still).abs().max()) > 1e-2  # the token changes the picture: the comparison means something
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=0)
