"""`<lora:NAME:W[:WINDOW]>` and `<embedding:NAME>` in prompts: found by name in their folders, applied
as `lora=` / `embeddings=` would be, removed from the text the encoder sees, kept in the PNG parameters."""
import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from test_lora import random_lora

from sdknobs import SdknobsError, load_model
from sdknobs.lora.files import write_lora
from sdknobs.pipelines import generate
from sdknobs.prompt import default_dir, extract_tags

KW = dict(steps=2, guidance=3.0, seed=4, progress=False)


@pytest.fixture(scope="module")
def setup(tiny_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("tags")
    m = load_model(tiny_dir)
    (d / "loras" / "styles").mkdir(parents=True)
    style = write_lora(random_lora(m), d / "loras" / "styles" / "style.safetensors")
    write_lora(random_lora(m, seed=1), d / "loras" / "other.safetensors")
    (d / "embeddings").mkdir()
    save_file({"<blob>": torch.randn(2, m.text_width, generator=torch.Generator().manual_seed(0))},
              str(d / "embeddings" / "blob.safetensors"))
    return m, d, style


def _pixels(r):
    return [np.asarray(im).tolist() for im in r.images]


def test_lora_tag_is_the_lora_argument(setup):
    m, d, style = setup
    tagged = generate(m, "a red circle <lora:style:0.5:0.5-1>, white", lora_dir=d / "loras", **KW)
    flag = generate(m, "a red circle , white", lora=[f"{style}:0.5@0.5-1"], **KW)
    plain = generate(m, "a red circle , white", **KW)
    assert _pixels(tagged) == _pixels(flag) != _pixels(plain)
    assert tagged.parameters[0].startswith("a red circle <lora:style:0.5:0.5-1>, white\n")
    assert "Lora hashes" in tagged.parameters[0] and "lora" not in m.extra  # for this call only


def test_tags_add_to_lora_flags_and_timestep_windows_parse(setup):
    m, d, style = setup
    t = extract_tags("x <lora:styles/style> <lora:other:-1:t>=600> <lora:other:2:t<400>", d / "loras")
    assert t.text.split() == ["x"]
    assert [(s.weight, s.window and s.window.text) for s in t.loras] == [(1.0, None), (-1.0, "t>=600"), (2.0, "t<400")]
    both = generate(m, "a <lora:other:0.7>", lora=[str(style)], lora_dir=d / "loras", **KW)
    ref = generate(m, "a ", lora=[str(style), f"{d / 'loras' / 'other.safetensors'}:0.7"], **KW)
    assert _pixels(both) == _pixels(ref)


def test_embedding_tag_loads_by_file_name(setup, tiny_dir):
    _, d, _ = setup
    m = load_model(tiny_dir)
    tagged = generate(m, "a <embedding:blob> shape", embedding_dir=d / "embeddings", **KW)
    assert [e.token for e in m.extra["embeddings"]] == ["<blob>"]
    again = generate(m, "a <blob> shape", **KW)  # loaded now: the token itself works
    assert _pixels(tagged) == _pixels(again)
    assert tagged.parameters[0].startswith("a <embedding:blob> shape\n")


def test_negative_prompt_tags_and_unknown_kinds(setup, caplog):
    m, d, _ = setup
    t = extract_tags("a <hypernet:x:1> b", d / "loras")
    assert t.text == "a  b" and "unknown kind" in caplog.text
    r = generate(m, "a", negative_prompt="<lora:other:0.3> blurry", lora_dir=d / "loras", **KW)
    assert "Negative prompt: <lora:other:0.3> blurry\n" in r.parameters[0] and "Lora hashes" in r.parameters[0]


@pytest.mark.parametrize("prompt,words", [
    ("<lora:nope>", ["<lora:nope>", "has: other, styles/style"]),
    ("<lora:style:abc>", ["weight 'abc'", "not a finite number"]),
    ("<lora:style:nan>", ["weight 'nan'"]),
    ("<lora:style:1:0.5>", ["window", "0.5"]),
    ("<embedding:nope>", ["<embedding:nope>", "has: blob"]),
])
def test_bad_tags(setup, prompt, words):
    _, d, _ = setup
    with pytest.raises(SdknobsError) as e:
        extract_tags(prompt, d / "loras", d / "embeddings")
    for w in words:
        assert w in str(e.value)


def test_default_folders_follow_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    assert default_dir("loras") == tmp_path / "sdknobs" / "loras"
    with pytest.raises(SdknobsError, match="does not exist"):
        extract_tags("<lora:x>")
    monkeypatch.delenv("XDG_DATA_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_dir("embeddings") == tmp_path / ".local" / "share" / "sdknobs" / "embeddings"


def test_img2img_takes_tags(setup, photo):
    from sdknobs.pipelines import img2img

    m, d, style = setup
    tagged = img2img(m, photo, "a <lora:style:0.8>", strength=0.5, lora_dir=d / "loras", **KW)
    assert _pixels(tagged) == _pixels(img2img(m, photo, "a ", strength=0.5, lora=[f"{style}:0.8"], **KW))
