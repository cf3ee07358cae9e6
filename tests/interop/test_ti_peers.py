"""Every embedding format we write, read by each peer's loader (diffusers run; A1111, kohya and ComfyUI
encoded, see peers.py): the word that triggers it there, and max |vector_peer - vector_ours|."""
import pytest
import torch

from sdknobs.model import EMBEDDED
from sdknobs.ti import read_embedding, save_embedding

from . import peers

TOKEN = "<star-shape>"
REPORT = []


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("ti-interop")
    v = torch.randn(2, 64, generator=torch.Generator().manual_seed(0))  # the shapes model's text width
    return v, {fmt: save_embedding(d / fmt, TOKEN, v, format=fmt, metadata={"base_model": "/home/me/sd15"})
               for fmt in ("diffusers", "kohya", "a1111")}


def test_a1111_safe_unpickle_accepts_our_pt(files):
    """modules/safe.py check_pt: only dir/data.pkl, dir/data/N, dir/version, and allowed globals; the
    folder is the file's stem (torch would name it after the temporary file it wrote)."""
    import zipfile

    path = files[1]["a1111"]
    assert peers.a1111_safe_check(path) == []
    assert {n.split("/")[0] for n in zipfile.ZipFile(path).namelist()} == {"star-shape"}
    assert torch.load(path, weights_only=True)["sd_checkpoint_name"] == "sd15"  # a name, not a path


@pytest.fixture(scope="module")
def pipe():
    return peers.pipeline(EMBEDDED["shapes"])


@pytest.mark.parametrize("fmt", ["diffusers", "kohya", "a1111"])
def test_peers_read_what_we_write(files, pipe, fmt):
    v, paths = files
    path = paths[fmt]
    assert path.name == ("star-shape.pt" if fmt == "a1111" else "star-shape.safetensors")
    ours = read_embedding(path)
    assert torch.equal(ours.vectors, v)
    runs = {"a1111": lambda: peers.a1111_embedding(path), "kohya": lambda: peers.kohya_embedding(path),
            "comfyui": lambda: peers.comfy_embedding(path),
            "diffusers": lambda: peers.diffusers_embedding(path, pipe, TOKEN if fmt == "kohya" else None)}
    triggers = {"a1111": "star-shape", "kohya": "star-shape", "comfyui": "star-shape", "diffusers": TOKEN}
    for name, run in runs.items():
        word, vec = run()
        diff = float((vec.reshape(v.shape) - v).abs().max())
        REPORT.append(f"{name:<10} {fmt:<9} trigger {word if name != 'comfyui' else 'embedding:' + word:<24} "
                      f"vectors {tuple(vec.shape)}  max |diff| {diff:.1e}")
        assert word == triggers[name] and diff == 0.0, (name, word, diff)


def test_report():
    print("\n" + "\n".join(REPORT))
