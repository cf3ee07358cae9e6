"""AUTOMATIC1111's embeddings inside pictures (modules/textual_inversion/image_embedding.py), read safely.

A1111 stores the embedding's dict ({"string_to_param": {"*": tensor}, "name": ..., "step": ...}) as JSON
with every tensor written as {"TORCHTENSOR": nested lists}, in one of two places:
- a PNG text chunk "sd-ti-embedding": base64 of that JSON;
- the picture's pixels: zlib-compressed JSON, its low nibbles in a block left of the picture and its high
  nibbles in a block right of it (each a 1-pixel black column away), every block XORed with the low 4
  bits of an LCG stream (m = 2^32, a = 1664525, c = 1013904223, seed 0, each value mod 255) and drawn
  over with dots in the high bits of each byte, so only the low 4 bits of each channel carry data.
Both are JSON: nothing is unpickled. Sizes are capped, so a crafted picture cannot exhaust memory.
"""
from __future__ import annotations

import base64
import json
import zlib
from pathlib import Path

import numpy as np
import torch

from sdknobs.errors import SdknobsError

TEXT_KEY = "sd-ti-embedding"
MAX_JSON = 64 << 20  # bytes of JSON accepted (an 8-vector 1280-wide embedding is well under 1 MB)


def lcg_nibbles(n: int) -> np.ndarray:
    """The first n values of A1111's `lcg()` (seed 0), masked to their low 4 bits, as uint8."""
    out = np.empty(n, dtype=np.uint8)
    seed = 0
    for i in range(n):
        seed = (1664525 * seed + 1013904223) % 2**32
        out[i] = (seed % 255) & 0x0F
    return out


def _json(raw: bytes, path) -> dict:
    def tensors(d):
        if "TORCHTENSOR" in d:
            return torch.from_numpy(np.asarray(d["TORCHTENSOR"], dtype=np.float64))
        return d

    try:
        data = json.loads(raw, object_hook=tensors)
    except (ValueError, TypeError) as e:
        raise SdknobsError(f"embedding picture {path}: its embedding data is not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise SdknobsError(f"embedding picture {path}: its embedding data is a {type(data).__name__}, expected a dict")
    return data


def _from_pixels(rgb: np.ndarray, path) -> bytes | None:
    """The zlib stream hidden in the picture's edges, or None when there are no data blocks."""
    lit = (rgb > 0).all(axis=2)
    rows, cols = np.flatnonzero(lit.any(axis=1)), np.flatnonzero(lit.any(axis=0))
    if not len(rows):
        return None
    low = rgb[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1] & 0x0F
    black = np.flatnonzero(low.sum(axis=(0, 2)) == 0)
    if len(black) < 2:
        return None
    lower, upper = low[:, :black.min()], low[:, black.max() + 1:]
    if lower.shape != upper.shape or not lower.size:
        return None
    mask = lcg_nibbles(lower.size).reshape(lower.shape)
    data = (((upper ^ mask) << 4) | (lower ^ mask)).astype(np.uint8).tobytes()
    d = zlib.decompressobj()
    try:
        out = d.decompress(data, MAX_JSON)  # the blocks repeat the stream to fill them: the rest is ignored
    except zlib.error as e:
        raise SdknobsError(f"embedding picture {path}: the data in its edges does not decompress ({e})") from e
    if d.unconsumed_tail and not d.eof:
        raise SdknobsError(f"embedding picture {path}: its embedding data exceeds {MAX_JSON >> 20} MB")
    return out


def read_png_embedding(path: str | Path) -> dict:
    """The embedding dict A1111 stored in a picture (text chunk first, then the pixels), or an error."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            text = dict(getattr(im, "text", {}) or {})
            rgb = None if TEXT_KEY in text else np.asarray(im.convert("RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError) as e:
        raise SdknobsError(f"embedding picture {path}: not a readable image ({e})") from e
    if TEXT_KEY in text:
        raw = text[TEXT_KEY]
        if len(raw) > MAX_JSON * 4 // 3 + 4:
            raise SdknobsError(f"embedding picture {path}: its {TEXT_KEY} chunk exceeds {MAX_JSON >> 20} MB")
        try:
            decoded = base64.b64decode(raw, validate=True)
        except ValueError as e:
            raise SdknobsError(f"embedding picture {path}: its {TEXT_KEY} chunk is not base64 ({e})") from e
        return _json(decoded, path)
    raw = _from_pixels(rgb, path)
    if raw is None:
        raise SdknobsError(f"embedding picture {path}: holds no embedding (no {TEXT_KEY!r} text chunk and no data "
                           f"blocks in its edges); it may be an embedding's preview picture")
    return _json(raw, path)
