"""The embedded shapes model: loads by name, loads in diffusers, and the quality benchmark's
scoring is right on the renderer's own pictures."""
import numpy as np
import pytest
import torch

from sdknobs import load_model
from sdknobs.model import EMBEDDED
from sdknobs.shapes import world
from sdknobs.shapes.analyze import analyze, score
from sdknobs.shapes.bench import captions, quality_scenes, sample


@pytest.fixture(scope="module")
def shapes():
    return load_model("shapes")


def test_loads_by_name(shapes):
    assert shapes.family == "shapes" and shapes.prediction_type == "epsilon"
    assert shapes.default_size == 32 and len(shapes.tokenizer) == 49408
    assert shapes.dtype == torch.float32
    size = sum(p.stat().st_size for p in EMBEDDED["shapes"].rglob("*") if p.is_file())
    assert size <= 30 * 2**20


def test_loads_and_generates_in_diffusers():
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(EMBEDDED["shapes"], safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    im = pipe("a large red circle in the centre, white background", num_inference_steps=20, guidance_scale=3.0,
              generator=torch.Generator().manual_seed(0)).images[0]
    assert im.size == (32, 32)
    assert analyze(im).background == "white"


def test_draws_what_it_is_asked(shapes):
    """A handful of single-shape prompts: background and colour come out right (full figures: bench quality)."""
    scenes = quality_scenes(n_single=12, n_two=0)
    pics = sample(shapes, captions(scenes), steps=20, guidance=3.0, progress=False)
    scores = [score(analyze(p), s) for p, s in zip(pics, scenes)]
    assert sum(s["background"] for s in scores) >= 11
    assert sum(s["colour"] for s in scores) >= 10


def test_quality_prompts_cover_every_attribute_and_score_truth_perfectly():
    scenes = quality_scenes()
    single = [s for s in scenes if len(s.shapes) == 1]
    assert len(scenes) >= 200
    assert {s.shapes[0].kind for s in single} == set(world.KINDS_NAMED)
    assert {s.shapes[0].colour for s in single} == set(world.COLOURS)
    assert {s.background for s in single} == set(world.BACKGROUNDS)
    assert {s.shapes[0].size for s in single} == set(world.SIZES)
    assert {s.shapes[0].position for s in single} == set(world.POSITIONS)
    for text, s in zip(captions(scenes), scenes):
        for sh in s.shapes:
            assert sh.kind in text and sh.colour in text
    # The benchmark's scoring, fed the renderer's own pictures, is right every time.
    assert all(score(analyze(world.render(s)), s)["all"] for s in scenes[::5])
