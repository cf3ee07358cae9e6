"""The analyzers, every quality figure's judge, on pictures like the model's output, in tiers: renders,
blurred + noised renders, renders through the shipped VAE, and hand-labelled generated pictures
(tests/data/analyzer_labels.json). Small sets here; the full table: `sdknobs bench analyzers`."""
import json
import random
from pathlib import Path

import pytest

from sdknobs import load_model
from sdknobs.shapes import bench, world
from sdknobs.shapes.analyze import analyze, score

LABELS = Path(__file__).parent / "data" / "analyzer_labels.json"
SHAPE_ATTRS = ("colour", "kind", "position", "size", "style")


@pytest.fixture(scope="module")
def renders():
    scenes = bench.tier_scenes(100, seed=5)
    return [world.render(s) for s in scenes], scenes


def worst(acc) -> float:
    return min(acc[a] for a in bench.TIER_ATTRS if a != "all")


def test_renders_99(renders):
    acc, _ = bench.accuracy(*renders)
    assert worst(acc) >= 0.99, acc


def test_blur_noise_97(renders):
    rng = random.Random(5)
    acc, _ = bench.accuracy([bench.degrade(im, rng) for im in renders[0]], renders[1])
    assert worst(acc) >= 0.97, acc


def test_vae_roundtrip(renders):
    ims, scenes = renders[0][:50], renders[1][:50]
    acc, wrong = bench.accuracy(bench.vae_roundtrip(load_model("shapes"), ims), scenes)
    assert worst(acc) >= 0.9, (acc, [bench._describe(scenes[i]) for i in wrong])  # 400 pictures: 0.91-1.0


def test_generated_held_out():
    """Pictures not used to choose the rules (the shipped model, and with a striped or an outline LoRA)."""
    ims, scenes, _ = bench.labelled(LABELS, "report")
    acc, wrong = bench.accuracy(ims, scenes)
    assert len(ims) >= 150 and worst(acc) >= 0.85, (acc, [bench._describe(scenes[i]) for i in wrong])


def test_generated_bench_pictures():
    """The two-shape `bench quality` pictures the rules were fixed on, among them #180: a plain yellow
    circle that was read as an outlined star."""
    ims, scenes, rows = bench.labelled(LABELS, "tune")
    two = [i for i, s in enumerate(scenes) if len(s.shapes) == 2]
    acc, _ = bench.accuracy([ims[i] for i in two], [scenes[i] for i in two])
    assert len(two) == 60 and worst(acc) >= 0.95, acc  # before the fix: style 0.68
    i = next(k for k, r in enumerate(rows) if r["source"].endswith("#180"))
    got = {(s.kind, s.style) for s in analyze(ims[i]).shapes}
    assert got == {("circle", "solid"), ("square", "solid")} and score(analyze(ims[i]), scenes[i])["all"]


def test_labels_file_is_whole():
    meta = json.loads(LABELS.read_text())
    ims, scenes, rows = bench.labelled(LABELS)
    assert len(ims) == len(meta["pictures"]) and {r["split"] for r in rows} == {"tune", "report"}
    assert sorted(r["tile"] for r in rows) == list(range(len(rows)))
    values = {"kind": world.KINDS, "colour": world.COLOURS, "size": world.SIZES, "position": world.POSITIONS,
              "style": world.STYLES}
    for sc in scenes:
        assert sc.background in world.BACKGROUNDS and 1 <= len(sc.shapes) <= 2
        for sh in sc.shapes:
            assert sh.position in world.POSITIONS  # always judged: it is how label and reading are paired
            assert all(getattr(sh, a) is None or getattr(sh, a) in values[a] for a in SHAPE_ATTRS)
    assert {sh.style for sc in scenes for sh in sc.shapes} - {None} == set(world.STYLES)


def test_score_leaves_unjudged_labels_out():
    scene = world.Scene("white", (world.Shape("circle", "red", "large", "left"),))
    rep = analyze(world.render(scene))
    open_kind = world.Scene("white", (world.Shape(None, "red", None, "left"),))
    wrong_kind = world.Scene("white", (world.Shape("square", "red", "large", "left"),))
    assert score(rep, open_kind)["all"] and not score(rep, wrong_kind)["kind"]
