"""Training data: a folder of captioned images, and a deterministic batch sampler over it.

A folder holds images (png, jpg, jpeg, webp, bmp) and their captions, either
- one `<name>.txt` next to each `<name>.<ext>` (kohya's convention), or
- one `metadata.jsonl` with lines {"file_name": "a.png", "text": "a red circle"} (diffusers' ImageFolder).
If `metadata.jsonl` exists it is the only source of captions (stray .txt files are ignored).
Caption files must be UTF-8 text (a BOM is allowed): a binary or otherwise encoded one is an error naming
the file and the byte offset. Images are read with `images.load_image` (EXIF orientation, 16-bit, palette
and alpha converted); the folder's memory at `resolution` is estimated before any is read.

Images are resized so the shorter side equals `resolution` (Lanczos), then centre-cropped (or, with
center_crop=False, cropped at the top-left) to resolution x resolution, and scaled to [-1, 1].

`CaptionedDataset.batch(step, batch_size, rank, world)` is a pure function of (seed, step, rank, world):
no hidden iterator state, so a resumed run draws exactly the batches an uninterrupted run would, and
every process of a multi-process run draws different items of the same global batch.
"""
from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from sdknobs.errors import SdknobsError
from sdknobs.images import load_image
from sdknobs.model import available_memory

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
MAX_EPOCH_ITEMS = 10_000_000  # images x repeats: one epoch's permutation is held in memory
log = logging.getLogger("sdknobs")
METADATA = "metadata.jsonl"


@dataclass
class Example:
    """One training item."""

    image: torch.Tensor  # [3, H, W] float32 in [-1, 1]
    caption: str
    path: str
    is_class: bool = False  # a prior-preservation (class) image
    flipped: bool = False  # set by CaptionedDataset.batch: the image was mirrored left-right
    dropped: bool = False  # set by CaptionedDataset.batch: the caption was dropped to "" (caption_dropout)
    original_size: tuple = ()  # (height, width) of the file, before resizing (SDXL's size conditioning)
    crop_top_left: tuple = (0, 0)  # (top, left) of the crop in the resized picture
    resized_width: int = 0  # width after resizing, before the crop (a flip moves the crop's left to width - left)


def seed_for(seed: int, *parts) -> int:
    """A stable 63-bit seed derived from a run seed and labels (Python's hash() is salted per process)."""
    return random.Random(":".join(str(p) for p in (seed, *parts))).getrandbits(63)


def load_training_image(path: Path, resolution: int, center_crop: bool = True, what: str = "training",
                        upscaled: list | None = None, geometry: dict | None = None) -> torch.Tensor:
    """Read an image file -> [3, resolution, resolution] float in [-1, 1] (shorter side resized, then cropped);
    the name of an image that had to be upscaled is appended to `upscaled`; `geometry` gets the Example fields
    original_size, crop_top_left and resized_width."""
    im = load_image(path, f"{what}: image")
    w, h = im.size
    if min(w, h) < resolution and upscaled is not None:
        upscaled.append(f"{Path(path).name} {w}x{h}")
    s = resolution / min(w, h)
    nw, nh = max(resolution, round(w * s)), max(resolution, round(h * s))
    if (nw, nh) != (w, h):
        im = im.resize((nw, nh), Image.LANCZOS)
    left, top = ((nw - resolution) // 2, (nh - resolution) // 2) if center_crop else (0, 0)
    im = im.crop((left, top, left + resolution, top + resolution))
    if geometry is not None:
        geometry.update(original_size=(h, w), crop_top_left=(top, left), resized_width=nw)
    a = np.asarray(im, dtype=np.float32) / 127.5 - 1.0  # [0, 255] -> [-1, 1]
    return torch.from_numpy(a).permute(2, 0, 1).contiguous()


def read_text(path: Path, what: str) -> str:
    """A caption file's text, or SdknobsError naming the file and the byte offset of what is not UTF-8 text."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise SdknobsError(f"{what}: cannot read {str(path)!r}: {e.strerror or e}") from e
    bad = next((i for i, b in enumerate(raw) if b < 32 and b not in (9, 10, 13)), None)  # NUL and other controls
    if bad is not None:
        raise SdknobsError(f"{what}: {str(path)!r} is not a text file (control byte 0x{raw[bad]:02x} at byte offset "
                           f"{bad}); captions must be UTF-8 text")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise SdknobsError(f"{what}: {str(path)!r} is not UTF-8 text (byte 0x{raw[e.start]:02x} at byte offset "
                           f"{e.start}); save it as UTF-8") from e


def _read_jsonl(folder: Path, what: str) -> dict[str, str]:
    path = folder / METADATA
    captions: dict[str, str] = {}
    seen: dict[str, int] = {}
    for n, line in enumerate(read_text(path, what).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise SdknobsError(f"{what}: {path} line {n}: not valid JSON ({e.msg}); expected "
                               f'{{"file_name": "...", "text": "..."}}') from e
        if not isinstance(row, dict) or not isinstance(row.get("file_name"), str) or not isinstance(row.get("text"), str):
            raise SdknobsError(f'{what}: {path} line {n}: expected an object with string keys "file_name" and "text", '
                               f"got {line.strip()[:80]!r}")
        if row["file_name"] in seen:
            raise SdknobsError(f"{what}: {path} lines {seen[row['file_name']]} and {n} both caption "
                               f"{row['file_name']!r}; keep one")
        seen[row["file_name"]] = n
        captions[row["file_name"]] = row["text"].strip()
    return captions


def read_folder(data_dir: str | Path, *, resolution: int, center_crop: bool = True, require_captions: bool = True,
                what: str = "--data-dir") -> list[Example]:
    """All images of a folder with their captions, sorted by file name.

    require_captions=False gives images without a caption the caption "" (textual inversion can caption
    from templates instead). `what` names the flag in error messages."""
    folder = Path(data_dir).expanduser()
    if resolution <= 0:
        raise SdknobsError(f"resolution must be > 0, got {resolution}")
    if not str(data_dir):
        raise SdknobsError(f"{what} is required: a folder of images with captions")
    if not folder.is_dir():
        raise SdknobsError(f"{what} {str(data_dir)!r}: " + ("is a file; expected a folder of images" if folder.exists()
                                                           else "no such folder"))
    try:
        files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS)
    except OSError as e:
        raise SdknobsError(f"{what} {str(data_dir)!r}: cannot list the folder: {e.strerror or e}") from e
    if not files:
        raise SdknobsError(f"{what} {str(data_dir)!r}: no images found (looked for {', '.join(IMAGE_EXTS)})")
    need, avail = len(files) * 3 * resolution**2 * 4, available_memory()  # float32 [3, res, res] per image
    if avail is not None and need > 0.8 * avail:
        raise SdknobsError(f"{what}: {len(files)} images at resolution {resolution} need about {need / 2**30:.1f} GiB "
                           f"of memory, more than the {avail / 2**30:.1f} GiB available; lower --resolution or use "
                           f"fewer images")
    jsonl = (folder / METADATA).exists()
    captions = _read_jsonl(folder, what) if jsonl else {}
    if jsonl:
        names = {p.name for p in files}
        unknown = [n for n in captions if n not in names]
        if unknown:
            raise SdknobsError(f"{what}: {folder / METADATA}: file_name {unknown[0]!r} is not an image in {folder}")
    out, small = [], []
    for p in files:
        if jsonl:
            caption = captions.get(p.name)
            expected = f'a line {{"file_name": "{p.name}", "text": ...}} in {folder / METADATA}'
        else:
            txt = p.with_suffix(".txt")
            caption = read_text(txt, what).strip() if txt.is_file() else None
            expected = f"a caption file {txt.name} next to it (or a {METADATA})"
        if caption is None:
            if require_captions:
                raise SdknobsError(f"{what}: image {str(p)!r} has no caption; expected {expected}")
            caption = ""
        geometry = {}
        out.append(Example(load_training_image(p, resolution, center_crop, what, small, geometry), caption, str(p),
                           **geometry))
    if small:
        log.warning("%s: %d image(s) smaller than %d px on the shorter side were upscaled (e.g. %s)", what, len(small),
                    resolution, small[0])
    return out


def split_validation(examples: Sequence[Example], n: int, seed: int) -> tuple[list[Example], list[Example]]:
    """(train, held-out): `n` examples chosen by the seed are held out; the rest keep their order."""
    if n < 0:
        raise SdknobsError(f"--validation-split must be >= 0, got {n}")
    if n and n >= len(examples):
        raise SdknobsError(f"--validation-split {n} leaves no training images: the folder has {len(examples)}")
    held = set(random.Random(seed_for(seed, "validation-split")).sample(range(len(examples)), n))
    return ([e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held])


class CaptionedDataset:
    """What the trainer iterates: examples x repeats per epoch, with seeded flips and caption dropout.

    The item stream is a concatenation of epochs; epoch e is a seeded permutation of
    `len(examples) * repeats` slots (so each image appears `repeats` times per epoch, as kohya counts).
    Batch `step` of process `rank` (of `world`) takes stream positions
        (step * world + rank) * batch_size + i,   i < batch_size,
    so one global batch is split across processes without overlap. With class (prior-preservation)
    images, each batch also holds `batch_size` class items from their own stream (DreamBooth's pairing),
    after the instance items. Flip and dropout are decided per stream position from the seed.
    """

    def __init__(self, examples: Sequence[Example], *, repeats: int = 1, flip: bool = False,
                 caption_dropout: float = 0.0, class_examples: Sequence[Example] = (), seed: int = 0):
        if not examples:
            raise SdknobsError("the training set is empty")
        if repeats < 1:
            raise SdknobsError(f"--repeats must be >= 1, got {repeats}")
        if len(examples) * repeats > MAX_EPOCH_ITEMS:
            raise SdknobsError(f"--repeats {repeats} x {len(examples)} images = {len(examples) * repeats:,} items per "
                               f"epoch; at most {MAX_EPOCH_ITEMS:,}: lower --repeats (or train more --steps)")
        if not 0.0 <= caption_dropout < 1.0:
            raise SdknobsError(f"--caption-dropout must be in [0, 1), got {caption_dropout}")
        self.examples = list(examples)
        self.class_examples = [replace(e, is_class=True) for e in class_examples]
        self.repeats, self.flip, self.caption_dropout, self.seed = repeats, flip, caption_dropout, seed
        self._perms: dict[tuple[str, int], list[int]] = {}

    def __len__(self) -> int:
        """Items per epoch (instance images x repeats)."""
        return len(self.examples) * self.repeats

    def _perm(self, stream: str, epoch: int, n: int) -> list[int]:
        key = (stream, epoch)
        if key not in self._perms:
            if len(self._perms) > 64:  # only the last few epochs are ever asked for again
                self._perms.clear()
            order = list(range(n))
            random.Random(seed_for(self.seed, stream, epoch)).shuffle(order)
            self._perms[key] = order
        return self._perms[key]

    def _item(self, stream: str, pool: list[Example], slots: int, pos: int) -> Example:
        epoch, k = divmod(pos, slots)
        ex = pool[self._perm(stream, epoch, slots)[k] % len(pool)]  # slot -> image (slot = image + j * n)
        rng = random.Random(seed_for(self.seed, stream, "aug", pos))
        flip = self.flip and rng.random() < 0.5
        drop = self.caption_dropout > 0 and rng.random() < self.caption_dropout
        return replace(ex, image=ex.image.flip(-1) if flip else ex.image, caption="" if drop else ex.caption,
                       flipped=flip, dropped=drop)

    def batch(self, step: int, batch_size: int, rank: int = 0, world: int = 1) -> list[Example]:
        """Batch number `step` for process `rank` of `world`: a pure function of (seed, step, rank, world)."""
        if batch_size < 1 or not 0 <= rank < world:
            raise ValueError(f"batch_size={batch_size}, rank={rank}, world={world}")
        first = (step * world + rank) * batch_size
        items = [self._item("instance", self.examples, len(self), first + i) for i in range(batch_size)]
        if self.class_examples:
            n = len(self.class_examples)
            items += [self._item("class", self.class_examples, n, first + i) for i in range(batch_size)]
        return items
