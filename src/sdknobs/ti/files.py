"""Embedding files: write diffusers', kohya's and A1111's formats; read those plus A1111's classic forms.

Formats (what each tool reads and writes):
- diffusers  `TOKEN.safetensors` (diffusers' own default is `learned_embeds.safetensors`): {token: [N, D]}
  (diffusers' textual_inversion.py and `pipe.load_textual_inversion`); also `.bin` of the same dict;
- kohya      `NAME.safetensors`: {"emb_params": tensor[N, D]} (kohya's sd-scripts, AUTOMATIC1111, ComfyUI);
- a1111      `NAME.pt`: {"string_to_param": {"*": tensor[N, D]}, "string_to_token": {"*": 265},
  "name": NAME, "step": ...} (AUTOMATIC1111's own training writes it); read also with the older
  nn.ParameterDict under string_to_param, and as A1111's PNG embeddings (`pngs.py`);
- SDXL (kohya's sdxl_train_textual_inversion.py, A1111, ComfyUI): `NAME.safetensors` {"clip_l": [N, 768],
  "clip_g": [N, 1280]}, one vector set per text encoder; written for SDXL models whatever --format says (a1111's
  .pt excepted: A1111 reads this file). diffusers loads it with two calls, one per encoder:
  `load_textual_inversion(sd["clip_g"], token=T, text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)`
  and `load_textual_inversion(sd["clip_l"], token=T, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)`.
  Read as well: the folder diffusers' textual_inversion_sdxl.py writes, learned_embeds.safetensors +
  learned_embeds_2.safetensors ({token: [N, D]} for each encoder), as one SDXL embedding.
AUTOMATIC1111, ComfyUI and kohya name an embedding after its file, so the default file name is the
token without its brackets (`<star-shape>` -> `star-shape.safetensors`).

Pickled files are read with `torch.load(weights_only=True)` (plus nn.ParameterDict, a plain container
module), which only rebuilds tensors and plain containers; a file that needs anything else could run
code when unpickled, so it is refused. Writes go to a temporary file in the same folder, then
`os.replace`, so no half-written file ever carries the final name.
"""
from __future__ import annotations

import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sdknobs.atomic import atomic_write
from sdknobs.errors import SdknobsError

FORMATS = ("diffusers", "kohya", "a1111")
# Text-encoder width -> the models that have it (the embedded models' widths are read from their configs).
WIDTH_FAMILIES = {
    768: "SD1.x (CLIP ViT-L/14; also SDXL's first encoder, clip_l)",
    1024: "SD2.x (OpenCLIP ViT-H/14)",
    1280: "SDXL's second encoder (OpenCLIP ViT-bigG/14, clip_g)",
}


def width_family(width: int) -> str:
    import json

    from sdknobs.model import EMBEDDED

    names = [WIDTH_FAMILIES[width]] if width in WIDTH_FAMILIES else []
    for name, folder in EMBEDDED.items():
        cfg = folder / "text_encoder" / "config.json"
        if cfg.exists() and json.loads(cfg.read_text()).get("hidden_size") == width:
            names.append(f"the embedded {name} model")
    return " or ".join(names) or "no family this tool knows"


@dataclass
class EmbeddingFile:
    token: str
    vectors: torch.Tensor  # [N, D], float (SDXL: the clip_l part)
    format: str  # one of FORMATS, or "sdxl" / "a1111-png" as read
    path: Path | None = None
    metadata: dict = field(default_factory=dict)  # strings (safetensors header) or plain values (.pt)
    vectors_2: torch.Tensor | None = None  # SDXL: the clip_g part [N, D2] (None: a one-encoder embedding)

    @property
    def parts(self) -> list[torch.Tensor]:
        """One vector set per text encoder, in the model's order."""
        return [self.vectors] if self.vectors_2 is None else [self.vectors, self.vectors_2]

    @property
    def widths(self) -> list[int]:
        return [int(v.shape[1]) for v in self.parts]

    @property
    def kind(self) -> str:
        """What the file is for, in words (messages)."""
        if self.vectors_2 is None:
            return f"a one-encoder embedding {self.width} wide ({width_family(self.width)})"
        return (f"an SDXL embedding (clip_l {self.widths[0]} wide and clip_g {self.widths[1]} wide, one part for each "
                f"text encoder)")

    @property
    def n_vectors(self) -> int:
        return int(self.vectors.shape[0])

    @property
    def width(self) -> int:
        return int(self.vectors.shape[1])


def default_filename(token: str, format: str) -> str:
    stem = token.strip("<>").replace("/", "-") or "embedding"
    return f"{stem}.pt" if format == "a1111" else f"{stem}.safetensors"


def save_embedding(path: str | Path, token: str, vectors: torch.Tensor, *, format: str = "diffusers",
                   metadata: dict | None = None, vectors_2: torch.Tensor | None = None) -> Path:
    """Write `token`'s vectors [N, D] in `format`; a folder path gets the format's default file name.
    vectors_2: SDXL's second part (clip_g): the file is then {"clip_l": vectors, "clip_g": vectors_2}."""
    from safetensors.torch import save_file

    from sdknobs.lora.files import model_file_name

    if format not in FORMATS:
        raise SdknobsError(f"--format {format!r} is not known; choose one of {', '.join(FORMATS)}")
    path = Path(path)
    if path.is_dir() or not path.suffix:
        path = path / default_filename(token, format)
    want = ".pt" if format == "a1111" else ".safetensors"
    if vectors_2 is not None and format == "a1111":
        raise SdknobsError(f"embedding file {path}: an SDXL embedding is written as a .safetensors file with clip_l "
                           f"and clip_g (what A1111, ComfyUI and kohya read for SDXL); use --format kohya or diffusers")
    if path.suffix != want:
        raise SdknobsError(f"embedding file {path}: format {format} is written as {want}, not {path.suffix}")
    v = _vectors(vectors.detach().to("cpu"), path, "the vectors")
    v2 = None if vectors_2 is None else _vectors(vectors_2.detach().to("cpu"), path, "the clip_g vectors")
    if v2 is not None and v2.shape[0] != v.shape[0]:
        raise SdknobsError(f"embedding file {path}: clip_l has {v.shape[0]} vectors but clip_g {v2.shape[0]}")
    metadata = dict(metadata or {})
    if "base_model" in metadata:  # a file or folder name, never the trainer's local path
        metadata["base_model"] = model_file_name(metadata["base_model"])
    meta = {str(k): str(val) for k, val in {**metadata, "token": token}.items()}
    if v2 is not None:
        return atomic_write(path, lambda tmp: save_file({"clip_l": v, "clip_g": v2}, tmp, metadata={"format": "pt", **meta}))
    if format == "diffusers":
        return atomic_write(path, lambda tmp: save_file({token: v}, tmp, metadata={"format": "pt", **meta}))
    if format == "kohya":
        return atomic_write(path, lambda tmp: save_file({"emb_params": v}, tmp, metadata={"format": "pt", **meta}))
    data = {"string_to_token": {"*": 265}, "string_to_param": {"*": v}, "name": token,
            "step": int(metadata.get("steps", 0) or 0), "sd_checkpoint": None,
            "sd_checkpoint_name": str(metadata.get("base_model", "")), "sdknobs": meta}
    return atomic_write(path, lambda tmp: write_a1111_pt(data, tmp, path.stem))


# torch.save's records that A1111's modules/safe.py (check_zip_filenames) accepts: <folder>/data.pkl,
# <folder>/data/<n>, <folder>/version. torch >= 2.1 adds byteorder, .data/serialization_id, and torch
# 2.13 .format_version and .storage_alignment, each of which stock A1111 rejects as "bad file inside".
_A1111_RECORDS = re.compile(r"data\.pkl|data/\d+|version")


def write_a1111_pt(data: dict, tmp, folder: str) -> None:
    """torch.save(data) re-packed with only the records A1111's safe-unpickle check accepts, under a stable
    folder name (torch names it after the file it writes, here a temporary one). Records stay uncompressed
    and 64-byte aligned, as torch writes them; without a byteorder record torch reads little-endian."""
    import io
    import struct
    import sys
    import zipfile

    if sys.byteorder != "little":
        raise SdknobsError("writing A1111 .pt files needs a little-endian machine (they carry no byteorder record)")
    folder = re.sub(r"[^\w.-]", "_", folder) or "archive"
    buf = io.BytesIO()
    torch.save(data, buf)
    with zipfile.ZipFile(buf) as src, open(tmp, "wb") as fh, zipfile.ZipFile(fh, "w", zipfile.ZIP_STORED) as out:
        for info in src.infolist():
            name = info.filename.split("/", 1)[1]
            if not _A1111_RECORDS.fullmatch(name):
                continue
            entry = zipfile.ZipInfo(f"{folder}/{name}", date_time=(1980, 1, 1, 0, 0, 0))
            start = fh.tell() + 30 + len(entry.filename.encode()) + 4  # local header, name, padding field header
            pad = -start % 64
            entry.extra = struct.pack("<HH", 0x4246, pad) + b"Z" * pad  # miniz's "FB" padding field, as torch's
            out.writestr(entry, src.read(info))


def _vectors(t, path, key) -> torch.Tensor:
    """[N, D] float32 from a file's tensor, or an error naming the key and what it holds."""
    if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dim() not in (1, 2):
        got = f"a {t.dtype} tensor of shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
        raise SdknobsError(f"embedding file {path}: {key} should be a float tensor [vectors, width], got {got}")
    if t.numel() == 0:
        raise SdknobsError(f"embedding file {path}: {key} has shape {tuple(t.shape)}: no vectors")
    bad = int((~torch.isfinite(t)).sum())
    if bad:
        raise SdknobsError(f"embedding file {path}: {key} has {bad} NaN/inf value(s) of {t.numel()}; expected finite")
    return t.detach().float().reshape(-1, t.shape[-1]).clone()


SDXL_KEYS = ("clip_l", "clip_g")


def _checkpoint_error(path, what) -> SdknobsError:
    return SdknobsError(f"embedding file {path}: {what} of a training checkpoint (for --resume), not an embedding; "
                        f"the embedding is the file the run wrote at --out")


def _from_dict(d: dict, path: Path, stem: str) -> EmbeddingFile:
    keys = set(d)
    if keys & set(SDXL_KEYS):
        if keys != set(SDXL_KEYS):
            raise SdknobsError(f"embedding file {path}: keys {sorted(map(str, keys))}; an SDXL embedding holds exactly "
                               f"clip_l and clip_g (one part for each text encoder)")
        v, v2 = _vectors(d["clip_l"], path, "clip_l"), _vectors(d["clip_g"], path, "clip_g")
        if v.shape[0] != v2.shape[0]:
            raise SdknobsError(f"embedding file {path}: clip_l has {v.shape[0]} vectors but clip_g {v2.shape[0]}; "
                               f"each vector of the token has one row in each text encoder")
        return EmbeddingFile(stem, v, "sdxl", path, vectors_2=v2)
    if {"optimizers", "rng"} <= keys:
        raise _checkpoint_error(path, "the optimizer and RNG state")
    if any("/" in str(k) for k in keys):
        raise _checkpoint_error(path, f"keys like {next(str(k) for k in keys if '/' in str(k))!r} are the weights")
    if "string_to_param" in d:
        params = d["string_to_param"]
        if isinstance(params, torch.nn.ParameterDict):  # A1111's files from before 2023 (any torch version)
            params = dict(params.items())
        if not isinstance(params, dict) or len(params) != 1:
            raise SdknobsError(f"embedding file {path}: string_to_param should hold one tensor under '*', "
                               f"got {list(params) if isinstance(params, dict) else type(params).__name__}")
        name = d.get("name") if isinstance(d.get("name"), str) and d.get("name") else stem
        meta = d.get("sdknobs") if isinstance(d.get("sdknobs"), dict) else {}
        return EmbeddingFile(name, _vectors(next(iter(params.values())), path, "string_to_param['*']"), "a1111",
                             path, {**meta, "step": d.get("step")})
    if "emb_params" in d:
        return EmbeddingFile(stem, _vectors(d["emb_params"], path, "emb_params"), "kohya", path)
    tensors = {k: v for k, v in d.items() if isinstance(v, torch.Tensor)}
    if len(d) == 1 and len(tensors) == 1:
        token, t = next(iter(tensors.items()))
        return EmbeddingFile(str(token), _vectors(t, path, repr(token)), "diffusers", path)
    raise SdknobsError(f"embedding file {path}: keys {sorted(map(str, keys))[:8]} match no embedding format; expected "
                       f"one tensor {{token: [N, D]}} (diffusers), 'emb_params' (kohya) or 'string_to_param' (A1111)")


def _torch_load(path: Path):
    """torch.load(weights_only=True), with nn.ParameterDict allowed (A1111's older string_to_param)."""
    try:
        allow = torch.serialization.safe_globals([torch.nn.ParameterDict])
    except AttributeError:  # torch < 2.5: no allow-list; ParameterDict files are refused below, by name
        from contextlib import nullcontext

        allow = nullcontext()
    try:
        with allow:
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        why = f"it names {found.group(1)}, which is not a tensor or a plain container" if found else \
            str(e).strip().splitlines()[0][:120]
        raise SdknobsError(f"embedding file {path}: refused, it needs arbitrary unpickling ({why}); "
                           f"unpickling such a file can run any code it carries, so only tensors and plain "
                           f"containers are read (torch.load weights_only=True); convert it to .safetensors "
                           f"with a tool you trust") from e
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise SdknobsError(f"embedding file {path}: not a readable torch file, truncated or of another kind "
                           f"({str(e).splitlines()[0]})") from e


def _find_in_folder(path: Path) -> Path:
    from sdknobs.training.checkpoint import STATE, WEIGHTS

    if (path / WEIGHTS).is_file() and (path / STATE).is_file():
        raise _checkpoint_error(path, "a folder")
    named = [path / "learned_embeds.safetensors", path / "learned_embeds.bin"]
    found = [c for c in named if c.exists()] or sorted(p for p in path.iterdir() if p.suffix.lower() in SUFFIXES)
    if len(found) != 1 and not (found and found[0].stem == "learned_embeds"):
        raise SdknobsError(f"embedding folder {path}: expected learned_embeds.safetensors or one embedding file, found "
                           f"{', '.join(p.name for p in found) or 'none'}")
    return found[0]


PAIR_2 = "learned_embeds_2.safetensors"  # diffusers' textual_inversion_sdxl.py: the second encoder's rows


def _read_pair(folder: Path, token: str | None) -> EmbeddingFile:
    """diffusers' SDXL textual-inversion output folder: learned_embeds.safetensors {token: [N, 768]} for the first
    encoder and learned_embeds_2.safetensors {token: [N, 1280]} for the second, as one SDXL embedding."""
    one, two = (read_embedding(folder / n, token) for n in ("learned_embeds.safetensors", PAIR_2))
    if one.vectors_2 is not None or two.vectors_2 is not None or one.token != two.token:
        raise SdknobsError(f"embedding folder {folder}: learned_embeds.safetensors ({one.token!r}) and {PAIR_2} "
                           f"({two.token!r}) should each hold one tensor for the same token")
    if one.n_vectors != two.n_vectors:
        raise SdknobsError(f"embedding folder {folder}: {one.n_vectors} vector(s) for the first encoder but "
                           f"{two.n_vectors} for the second")
    return EmbeddingFile(one.token, one.vectors, "diffusers-sdxl", folder, one.metadata, vectors_2=two.vectors)


SUFFIXES = (".safetensors", ".pt", ".bin", ".ckpt", ".pth", ".png", ".webp")


def read_embedding(path: str | Path, token: str | None = None) -> EmbeddingFile:
    """Read an embedding file of any supported format. `token` overrides the token it names (its
    key, A1111's `name`, or the file name); tokens are lowercased, as CLIP lowercases prompts."""
    path = Path(path)
    if path.is_dir() and (path / "learned_embeds.safetensors").is_file() and (path / PAIR_2).is_file():
        return _read_pair(path, token)
    if path.is_dir():
        path = _find_in_folder(path)
    if not path.is_file():
        raise SdknobsError(f"embedding file {path}: no such file")
    stem, suffix = path.stem, path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), "pt") as f:
                d = {k: f.get_tensor(k) for k in f.keys()}
                meta = f.metadata() or {}
        except (SafetensorError, OSError, ValueError) as e:
            raise SdknobsError(f"embedding file {path}: not a readable safetensors file, truncated or of another "
                               f"kind ({e})") from e
        emb = _from_dict(d, path, stem)
        emb.metadata = {**meta, **emb.metadata}
        # kohya/A1111 name the token after the file; a file we wrote keeps its token (brackets and all) in
        # the metadata, used while the file still has the name we gave it
        t = meta.get("token", "")
        if emb.format in ("kohya", "sdxl") and t and Path(default_filename(t, "kohya")).stem == stem:
            emb.token = t
    elif suffix in (".pt", ".bin", ".ckpt", ".pth"):
        d = _torch_load(path)
        if isinstance(d, torch.Tensor):
            emb = EmbeddingFile(stem, _vectors(d, path, "the tensor"), "diffusers", path)
        elif isinstance(d, dict):
            emb = _from_dict(d, path, stem)
        else:
            raise SdknobsError(f"embedding file {path}: holds a {type(d).__name__}, expected a dict of tensors")
    elif suffix in (".png", ".webp"):
        from sdknobs.ti.pngs import read_png_embedding

        emb = _from_dict(read_png_embedding(path), path, stem)
        emb.format = "a1111-png"
    else:
        raise SdknobsError(f"embedding file {path}: unsupported type {suffix or '(no suffix)'}; expected "
                           f"{', '.join(SUFFIXES)}")
    if token:
        emb.token = token
    emb.token = emb.token.strip().lower()
    return emb


def check_width(emb: EmbeddingFile, model) -> None:
    """An embedding only works in text encoders of its own widths (its vectors live in those spaces): one part for
    a one-encoder model, clip_l + clip_g for SDXL's two."""
    from sdknobs.ti.tokens import encoders

    widths = [int(enc.get_input_embeddings().weight.shape[1]) for _, enc in encoders(model)]
    src = f"{emb.path}" if emb.path else f"embedding {emb.token!r}"
    name = f"{model.source or model.family}, family {model.family}"
    if len(emb.parts) != len(widths):
        if len(widths) == 2:
            raise SdknobsError(f"{src}: {emb.kind}, but the model ({name}) is SDXL, with two text encoders {widths[0]} "
                               f"wide (clip_l) and {widths[1]} wide (clip_g): it needs an SDXL embedding with a clip_l "
                               f"and a clip_g part; a one-encoder vector lives in its own encoder's space and means "
                               f"nothing to SDXL's two, so use it with a model of its own family")
        raise SdknobsError(f"{src}: {emb.kind}, but the model ({name}) is an SD1.x/SD2.x-style model with one text "
                           f"encoder {widths[0]} wide ({width_family(widths[0])}); use it with an SDXL model")
    for part, w, mw in zip(SDXL_KEYS if len(widths) == 2 else ("",), emb.widths, widths):
        if w != mw:
            which = f"its {part} vectors are" if part else "its vectors are"
            raise SdknobsError(f"{src}: {which} {w} wide, {width_family(w)}, but this model's text encoder{' ' + part if part else ''} "
                               f"({name}) is {mw} wide, {width_family(mw)}; use it with a model of its own family")
