"""Training data: reading captioned folders (both conventions, every error), and the deterministic sampler."""
import json
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from sdknobs.errors import SdknobsError
from sdknobs.training.data import CaptionedDataset, Example, read_folder, split_validation


def _img(path, size=(32, 32), colour=(200, 30, 30)):
    Image.new("RGB", size, colour).save(path)
    return path


def _kohya(folder, n=3):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        _img(folder / f"img{i}.png", colour=(40 * i, 0, 0))
        (folder / f"img{i}.txt").write_text(f"  caption {i}\n")
    return folder


def _examples(n):
    # asymmetric pictures, so a mirrored one differs from the original
    return [Example(torch.arange(48.0).reshape(3, 4, 4) / 48 + i, f"cap {i}", f"p{i}.png") for i in range(n)]


def test_kohya_folder(tmp_path):
    ex = read_folder(_kohya(tmp_path / "d"), resolution=32)
    assert [e.caption for e in ex] == ["caption 0", "caption 1", "caption 2"]  # sorted, stripped
    assert [e.path.endswith(f"img{i}.png") for i, e in enumerate(ex)] == [True] * 3
    assert ex[1].image.shape == (3, 32, 32) and ex[1].image.dtype == torch.float32
    # (40, 0, 0) -> 40 / 127.5 - 1 ; 0 -> -1
    assert torch.allclose(ex[1].image[0], torch.full((32, 32), 40 / 127.5 - 1))
    assert ex[1].image[1:].eq(-1).all() and not ex[1].is_class


def test_jsonl_folder_and_other_formats(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    _img(d / "a.jpg")
    _img(d / "b.webp")
    _img(d / "c.BMP")
    (d / "a.txt").write_text("ignored: metadata.jsonl wins")
    lines = [{"file_name": n, "text": f"text {n}"} for n in ("a.jpg", "b.webp", "c.BMP")]
    (d / "metadata.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    ex = read_folder(d, resolution=16)
    assert [e.caption for e in ex] == ["text a.jpg", "text b.webp", "text c.BMP"]
    assert ex[0].image.shape == (3, 16, 16)


def test_resize_shorter_side_then_centre_crop(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    a = np.zeros((32, 96, 3), np.uint8)  # 96 wide: left third red, middle green, right third blue
    a[:, :32, 0] = a[:, 32:64, 1] = a[:, 64:, 2] = 255
    Image.fromarray(a).save(d / "x.png")
    (d / "x.txt").write_text("x")
    centre = read_folder(d, resolution=16)[0].image  # 96x32 -> 48x16 -> middle 16x16 = green
    assert centre.shape == (3, 16, 16)
    inner = centre[:, :, 2:-2]  # Lanczos rings at the colour boundaries
    assert inner[1].min() > 0.95 and inner[0].max() < -0.95 and inner[2].max() < -0.95
    left = read_folder(d, resolution=16, center_crop=False)[0].image[:, :, :-2]  # top-left crop = red
    assert left[0].min() > 0.95 and left[1].max() < -0.95


@pytest.mark.parametrize("case, expected", [
    ("missing", "no such folder"),
    ("empty", "no images found"),
    ("no_caption", "has no caption; expected a caption file img1.txt next to it"),
    ("unreadable", "not a readable image"),
    ("file", "is a file; expected a folder of images"),
    ("txt_binary", "img1.txt' is not a text file (control byte 0x00 at byte offset 3)"),
    ("txt_latin1", "img1.txt' is not UTF-8 text (byte 0xe9 at byte offset 3)"),
    ("meta_binary", "metadata.jsonl' is not a text file (control byte 0x00 at byte offset 1)"),
    ("meta_latin1", "metadata.jsonl' is not UTF-8 text (byte 0xe9 at byte offset 2)"),
    ("jsonl_twice", "lines 1 and 2 both caption 'img0.png'"),
    ("bad_json", "metadata.jsonl line 2: not valid JSON"),
    ("bad_keys", 'metadata.jsonl line 1: expected an object with string keys "file_name" and "text"'),
    ("jsonl_missing", 'has no caption; expected a line {"file_name": "img2.png", "text": ...}'),
    ("jsonl_unknown", "file_name 'nope.png' is not an image"),
])
def test_read_folder_errors(tmp_path, case, expected):
    d = tmp_path / "data"
    if case == "file":
        d.write_text("not a folder")
    elif case != "missing":
        d.mkdir()
    if case == "empty":
        (d / "notes.txt").write_text("no images here")
    if case in ("no_caption", "unreadable"):
        _kohya(d, 2)
        (d / "img1.txt").unlink() if case == "no_caption" else (d / "img1.png").write_bytes(b"not a png")
    if case.startswith("txt_"):
        _kohya(d, 2)
        (d / "img1.txt").write_bytes(b"a r\x00d" if case.endswith("binary") else "a r\u00e9d".encode("latin-1"))
    if case.startswith("meta_"):
        _kohya(d, 2)
        (d / "metadata.jsonl").write_bytes(b"{\x00" if case.endswith("binary") else '{"\u00e9'.encode("latin-1"))
    if case.startswith(("bad_", "jsonl_")):
        _kohya(d, 3)
        good = json.dumps({"file_name": "img0.png", "text": "t"})
        rows = {"bad_json": [good, "{oops"], "bad_keys": ['{"file": "img0.png"}'],
                "jsonl_missing": [good, json.dumps({"file_name": "img1.png", "text": "t"})],
                "jsonl_unknown": [good, json.dumps({"file_name": "nope.png", "text": "t"})],
                "jsonl_twice": [good, good]}[case]
        (d / "metadata.jsonl").write_text("\n".join(rows))
    with pytest.raises(SdknobsError, match="--data-dir") as e:
        read_folder(d, resolution=32)
    assert expected in str(e.value) or (case == "unreadable" and "img1.png" in str(e.value) and expected in str(e.value))
    if case in ("no_caption", "unreadable", "jsonl_missing"):
        assert ("img1.png" if case != "jsonl_missing" else "img2.png") in str(e.value)


def test_small_images_are_upscaled_with_a_notice(tmp_path, caplog):
    d = tmp_path / "d"
    d.mkdir()
    Image.new("RGB", (1, 1), (255, 0, 0)).save(d / "dot.png")
    (d / "dot.txt").write_text("a red dot")
    ex = read_folder(d, resolution=16)
    assert ex[0].image.shape == (3, 16, 16) and torch.allclose(ex[0].image[0], torch.ones(16, 16))
    assert "1 image(s) smaller than 16 px" in caplog.text and "dot.png 1x1" in caplog.text


def test_optional_captions_and_flag_name(tmp_path):
    d = _kohya(tmp_path / "d", 2)
    (d / "img1.txt").unlink()
    assert [e.caption for e in read_folder(d, resolution=8, require_captions=False)] == ["caption 0", ""]
    with pytest.raises(SdknobsError, match="^--class-data-dir: image"):
        read_folder(d, resolution=8, what="--class-data-dir")


def test_split_validation():
    ex = _examples(6)
    train, held = split_validation(ex, 2, seed=3)
    assert len(train) == 4 and len(held) == 2 and not {e.path for e in train} & {e.path for e in held}
    assert [e.path for e in held] == [e.path for e in split_validation(ex, 2, seed=3)[1]]
    assert split_validation(ex, 0, seed=3) == (ex, [])
    with pytest.raises(SdknobsError, match="--validation-split 6 leaves no training images: the folder has 6"):
        split_validation(ex, 6, seed=0)


def test_batches_are_deterministic_and_seeded():
    ex = _examples(5)
    a = CaptionedDataset(ex, flip=True, caption_dropout=0.3, seed=1)
    b = CaptionedDataset(ex, flip=True, caption_dropout=0.3, seed=1)
    c = CaptionedDataset(ex, flip=True, caption_dropout=0.3, seed=2)
    key = lambda batch: [(e.path, e.caption, e.flipped, e.dropped) for e in batch]  # noqa: E731
    assert key(a.batch(7, 3)) == key(b.batch(7, 3))
    assert key(b.batch(7, 3)) == key(b.batch(7, 3))  # no hidden iterator state
    assert [key(a.batch(s, 3)) for s in range(5)] != [key(c.batch(s, 3)) for s in range(5)]


def test_repeats_cover_each_image_per_epoch():
    ex = _examples(4)
    ds = CaptionedDataset(ex, repeats=3, seed=0)
    assert len(ds) == 12
    epoch = [e.path for s in range(6) for e in ds.batch(s, 2)]  # 6 x 2 = one epoch
    assert Counter(epoch) == {e.path: 3 for e in ex}
    nxt = [e.path for s in range(6, 12) for e in ds.batch(s, 2)]
    assert Counter(nxt) == {e.path: 3 for e in ex} and nxt != epoch  # a fresh permutation


def test_ranks_split_the_global_batch():
    ds = CaptionedDataset(_examples(7), repeats=2, seed=4)
    for step in range(5):
        single = [e.path for e in ds.batch(step, 6, 0, 1)]
        split = [e.path for r in range(3) for e in ds.batch(step, 2, r, 3)]
        assert split == single


def test_flip_and_dropout():
    ex = _examples(3)
    ds = CaptionedDataset(ex, flip=True, caption_dropout=0.25, seed=0)
    items = [e for s in range(200) for e in ds.batch(s, 3)]
    flips = sum(e.flipped for e in items) / len(items)
    drops = sum(e.dropped for e in items) / len(items)
    assert 0.4 < flips < 0.6 and 0.17 < drops < 0.33
    orig = {e.path: e for e in ex}
    for e in items[:30]:
        assert torch.equal(e.image, orig[e.path].image.flip(-1) if e.flipped else orig[e.path].image)
        assert e.caption == ("" if e.dropped else orig[e.path].caption)
    plain = [e for s in range(50) for e in CaptionedDataset(ex, seed=0).batch(s, 3)]
    assert not any(e.flipped or e.dropped for e in plain)


def test_class_examples_follow_instance_items():
    ds = CaptionedDataset(_examples(3), class_examples=_examples(5)[3:], seed=0)
    b = ds.batch(0, 2)
    assert [e.is_class for e in b] == [False, False, True, True]
    assert {e.path for e in b[2:]} <= {"p3.png", "p4.png"}


@pytest.mark.parametrize("kw, msg", [({"repeats": 0}, "--repeats must be >= 1"),
                                     ({"caption_dropout": 1.0}, r"--caption-dropout must be in \[0, 1\)")])
def test_dataset_errors(kw, msg):
    with pytest.raises(SdknobsError, match=msg):
        CaptionedDataset(_examples(2), **kw)
    with pytest.raises(SdknobsError, match="empty"):
        CaptionedDataset([])
