"""Sampling defaults that fit the model: guidance, steps and scheduler come from the model folder's sdknobs.json
(else its family's usual values, `model.SAMPLING_DEFAULTS`), flags and arguments override, the PNG records what
was used; mask blur and outpaint overlap default to a fraction of the picture's size."""
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from sdknobs import images as im
from sdknobs import load_model
from sdknobs.cli import main
from sdknobs.model import EMBEDDED, SAMPLING_DEFAULTS, read_settings
from sdknobs.pipelines import generate, inpaint, outpaint

P = "a red circle"
OWN = {"guidance": 2.0, "steps": 3, "scheduler": "euler"}


@pytest.fixture(scope="module")
def own_dir(tiny_dir, tmp_path_factory):
    """The tiny model with its own sdknobs.json."""
    d = tmp_path_factory.mktemp("own") / "tiny"
    shutil.copytree(tiny_dir, d)
    (d / "sdknobs.json").write_text(json.dumps({"sampling": OWN, "training": {"lora": {"learning_rate": 1e-3}}}))
    return d


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def test_shapes_ships_its_measured_settings():
    s = json.loads((EMBEDDED["shapes"] / "sdknobs.json").read_text())
    assert s["sampling"] == {"guidance": 3.0, "steps": 30, "scheduler": "ddim"}  # docs/quality.md's and bench's


def test_family_table_without_a_file(tiny):
    assert tiny.settings == {}
    assert tiny.sampling_defaults == SAMPLING_DEFAULTS[tiny.family]
    assert SAMPLING_DEFAULTS["SD1.x"]["guidance"] == SAMPLING_DEFAULTS["SD2.x"]["guidance"] == 7.5
    r = generate(tiny, P, steps=2, progress=False)  # guidance and scheduler: the table's
    assert "CFG scale: 7.5" in r.parameters[0] and "Sampler: DDIM" in r.parameters[0]


def test_defaults_come_from_sdknobs_json_and_arguments_override(own_dir):
    m = load_model(own_dir)
    assert m.sampling_defaults == OWN and m.settings["training"] == {"lora": {"learning_rate": 1e-3}}
    r = generate(m, P, progress=False)
    assert "Steps: 3, Sampler: Euler, CFG scale: 2.0" in r.parameters[0]
    r = generate(m, P, steps=2, guidance=1.5, scheduler="ddim", progress=False)
    assert "Steps: 2, Sampler: DDIM, CFG scale: 1.5" in r.parameters[0]


def test_cli_and_api_agree(capsys, own_dir, tmp_path):
    code, out, err = run(capsys, "generate", "--model", own_dir, "--prompt", P, "--out", tmp_path / "a.png")
    assert code == 0, err
    png = Image.open(tmp_path / "a.png")
    api = generate(load_model(own_dir), P, progress=False)
    assert png.text["parameters"] == api.parameters[0]
    assert np.array_equal(np.asarray(png.convert("RGB")), np.asarray(api.images[0]))
    code, out, err = run(capsys, "generate", "--model", own_dir, "--prompt", P, "--steps", "2", "--guidance", "4",
                         "--scheduler", "ddim", "--out", tmp_path / "b.png")
    assert code == 0, err
    assert "Steps: 2, Sampler: DDIM, CFG scale: 4.0" in Image.open(tmp_path / "b.png").text["parameters"]


def test_help_says_where_defaults_come_from(capsys):
    with pytest.raises(SystemExit):
        main(["outpaint", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "the model's: its sdknobs.json" in text and "3 for shapes, 7.5 for SD1.5" in text
    assert "1/8 of the image's width" in text and "1/128 of the extended canvas's shorter side" in text


@pytest.mark.parametrize("content, words", [
    ("{not json", ["sdknobs.json", "not readable JSON"]),
    ('["guidance"]', ["sdknobs.json", "JSON object"]),
    ('{"sampling": 3}', ["sdknobs.json", '"sampling" must be an object']),
    ('{"sampling": {"cfg": 3}}', ["sdknobs.json", '"sampling".cfg is not known']),
    ('{"sampling": {"guidance": "high"}}', ["sdknobs.json", '"sampling".guidance must be a number']),
    ('{"sampling": {"guidance": -1}}', ["sdknobs.json", '"sampling".guidance must be a finite number >= 0']),
    ('{"sampling": {"steps": 2.5}}', ["sdknobs.json", '"sampling".steps must be a number']),
    ('{"sampling": {"steps": 0}}', ["sdknobs.json", '"sampling".steps must be >= 1']),
    ('{"sampling": {"scheduler": "fast"}}', ["sdknobs.json", '"sampling".scheduler \'fast\' is not known']),
])
def test_malformed_sdknobs_json_is_refused_by_file_and_key(capsys, tmp_path, content, words):
    (tmp_path / "sdknobs.json").write_text(content)
    with pytest.raises(Exception) as e:
        read_settings(tmp_path)
    assert type(e.value).__name__ == "SdknobsError"
    for w in words:
        assert w in str(e.value)


def test_malformed_sdknobs_json_exits_2(capsys, tiny_dir, tmp_path):
    d = tmp_path / "bad"
    shutil.copytree(tiny_dir, d)
    (d / "sdknobs.json").write_text('{"sampling": {"steps": "many"}}')
    code, out, err = run(capsys, "generate", "--model", d, "--prompt", P, "--out", tmp_path / "o.png")
    assert code == 2 and err.count("\n") == 1 and "sdknobs.json" in err and '"sampling".steps' in err
    assert not (tmp_path / "o.png").exists()


def test_fraction_defaults_scale_with_size():
    assert im.default_mask_blur(512, 512) == 4.0 and im.default_mask_blur(512, 768) == 4.0
    assert im.default_mask_blur(32, 32) == 0.25 and im.default_mask_blur(1024, 64) == 0.5
    assert im.default_overlap(32, 32, 4) == (4, 4)  # one latent cell of the shapes model
    assert im.default_overlap(512, 256, 8) == (64, 32)
    assert im.default_overlap(8, 8, 8) == (8, 8)  # at least one cell


def test_inpaint_and_outpaint_use_and_record_the_fraction_defaults(tiny, photo, half_mask):
    r = inpaint(tiny, photo, half_mask, P, steps=2, progress=False)
    assert "Mask blur: 0.25" in r.parameters[0]
    r = outpaint(tiny, photo, P, left=8, steps=2, progress=False)
    mask = np.asarray(r.extra["mask"]) > 127
    assert mask[:, : 8 + 4].all() and not mask[:, 8 + 4 :].any()  # 1/8 of 32 px = 4 px repainted
    assert "Mask blur: 0.25" in r.parameters[0]  # 40x32 canvas: 32 / 128
    r = outpaint(tiny, photo, P, left=8, overlap=2, mask_blur=1, steps=2, progress=False)  # explicit px still work
    mask = np.asarray(r.extra["mask"]) > 127
    assert mask[:, :10].all() and not mask[:, 10:].any() and "Mask blur: 1" in r.parameters[0]


def test_saved_model_keeps_its_settings(own_dir, tmp_path):
    from sdknobs.model import save_model

    save_model(load_model(own_dir), tmp_path / "saved")  # e.g. lora merge: the recommended settings travel along
    assert load_model(tmp_path / "saved").sampling_defaults == OWN
