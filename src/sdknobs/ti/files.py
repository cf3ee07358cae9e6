"""Embedding files: write diffusers' and kohya/A1111 formats, read those plus A1111 `.pt`.

Formats (what each tool reads and writes):
- diffusers  `learned_embeds.safetensors`: {token: tensor[N, D]} (diffusers' textual_inversion.py
  and `pipe.load_textual_inversion`); also `.bin` of the same dict (read only);
- kohya      `NAME.safetensors`: {"emb_params": tensor[N, D]}; the token is the file name (kohya's
  sd-scripts, AUTOMATIC1111 and ComfyUI read this);
- a1111      `NAME.pt`: {"string_to_param": {"*": tensor[N, D]}, "string_to_token": {"*": 265},
  "name": NAME, "step": ...} (AUTOMATIC1111's own training writes it).

Pickled files are read with `torch.load(weights_only=True)`, which only rebuilds tensors and plain
containers; a file that needs anything else could run code when unpickled, so it is refused.
Writes go to a temporary file in the same folder, then `os.replace`, so no half-written file ever
carries the final name.
"""
from __future__ import annotations

import pickle
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
    vectors: torch.Tensor  # [N, D], float
    format: str  # one of FORMATS
    path: Path | None = None
    metadata: dict = field(default_factory=dict)  # strings (safetensors header) or plain values (.pt)

    @property
    def n_vectors(self) -> int:
        return int(self.vectors.shape[0])

    @property
    def width(self) -> int:
        return int(self.vectors.shape[1])


def default_filename(token: str, format: str) -> str:
    stem = token.strip("<>").replace("/", "-") or "embedding"
    return {"diffusers": "learned_embeds.safetensors", "kohya": f"{stem}.safetensors", "a1111": f"{stem}.pt"}[format]


def _atomic(path: Path, write) -> Path:
    return atomic_write(path, write)


def save_embedding(path: str | Path, token: str, vectors: torch.Tensor, *, format: str = "diffusers",
                   metadata: dict | None = None) -> Path:
    """Write `token`'s vectors [N, D] in `format`; a folder path gets the format's default file name."""
    from safetensors.torch import save_file

    if format not in FORMATS:
        raise SdknobsError(f"--format {format!r} is not known; choose one of {', '.join(FORMATS)}")
    path = Path(path)
    if path.is_dir() or not path.suffix:
        path = path / default_filename(token, format)
    want = ".pt" if format == "a1111" else ".safetensors"
    if path.suffix != want:
        raise SdknobsError(f"embedding file {path}: format {format} is written as {want}, not {path.suffix}")
    v = vectors.detach().to("cpu", torch.float32).reshape(-1, vectors.shape[-1]).contiguous()
    meta = {str(k): str(val) for k, val in {**(metadata or {}), "token": token}.items()}
    if format == "diffusers":
        return _atomic(path, lambda tmp: save_file({token: v}, tmp, metadata={"format": "pt", **meta}))
    if format == "kohya":
        return _atomic(path, lambda tmp: save_file({"emb_params": v}, tmp, metadata={"format": "pt", **meta}))
    data = {"string_to_token": {"*": 265}, "string_to_param": {"*": v}, "name": token,
            "step": int((metadata or {}).get("steps", 0) or 0), "sd_checkpoint": None,
            "sd_checkpoint_name": str((metadata or {}).get("base_model", "")), "sdknobs": meta}
    return _atomic(path, lambda tmp: torch.save(data, tmp))


def _vectors(t, path, key) -> torch.Tensor:
    if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dim() not in (1, 2):
        shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise SdknobsError(f"embedding file {path}: {key} should be a float tensor [vectors, width], got {shape}")
    return t.detach().float().reshape(-1, t.shape[-1]).clone()


def _sdxl_error(path, keys) -> SdknobsError:
    return SdknobsError(f"embedding file {path} is an SDXL embedding (keys {', '.join(sorted(keys))}: one part for "
                        f"each text encoder, 768 wide for clip_l and 1280 for clip_g); it needs an SDXL model, "
                        f"this tool loads SD1.x/SD2.x-style models with one text encoder")


def _from_dict(d: dict, path: Path, stem: str) -> EmbeddingFile:
    keys = set(d)
    if {"clip_l", "clip_g"} <= keys:
        raise _sdxl_error(path, keys)
    if "string_to_param" in d:
        params = d["string_to_param"]
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


def read_embedding(path: str | Path, token: str | None = None) -> EmbeddingFile:
    """Read an embedding file of any supported format. `token` overrides the token it names (its
    key, A1111's `name`, or the file name); tokens are lowercased, as CLIP lowercases prompts."""
    path = Path(path)
    if path.is_dir():
        cands = [path / "learned_embeds.safetensors", path / "learned_embeds.bin"]
        found = [c for c in cands if c.exists()]
        if not found:
            raise SdknobsError(f"embedding folder {path} has no learned_embeds.safetensors or learned_embeds.bin")
        path = found[0]
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
            raise SdknobsError(f"embedding file {path}: not a readable safetensors file ({e})") from e
        emb = _from_dict(d, path, stem)
        emb.metadata = {**meta, **emb.metadata}
        # kohya/A1111 name the token after the file; a file we wrote keeps its token (brackets and all) in
        # the metadata, used while the file still has the name we gave it
        t = meta.get("token", "")
        if emb.format == "kohya" and t and Path(default_filename(t, "kohya")).stem == stem:
            emb.token = t
    elif suffix in (".pt", ".bin", ".ckpt", ".pth"):
        try:
            d = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            import re

            found = re.search(r"GLOBAL ([\w.]+)", str(e))
            why = f"it names {found.group(1)}, which is not a tensor or a plain container" if found else \
                str(e).strip().splitlines()[0][:120]
            raise SdknobsError(f"embedding file {path}: refused, it needs arbitrary unpickling ({why}); "
                               f"unpickling such a file can run any code it carries, so only tensors and plain "
                               f"containers are read (torch.load weights_only=True); convert it to .safetensors "
                               f"with a tool you trust") from e
        except (RuntimeError, EOFError, OSError) as e:
            raise SdknobsError(f"embedding file {path}: not a readable torch file ({str(e).splitlines()[0]})") from e
        if isinstance(d, torch.Tensor):
            emb = EmbeddingFile(stem, _vectors(d, path, "the tensor"), "diffusers", path)
        elif isinstance(d, dict):
            emb = _from_dict(d, path, stem)
        else:
            raise SdknobsError(f"embedding file {path}: holds a {type(d).__name__}, expected a dict of tensors")
    else:
        raise SdknobsError(f"embedding file {path}: unsupported type {suffix or '(no suffix)'}; expected .safetensors, "
                           f".pt or .bin (embeddings hidden inside PNG/WebP images are not read)")
    if token:
        emb.token = token
    emb.token = emb.token.strip().lower()
    return emb


def check_width(emb: EmbeddingFile, model) -> None:
    """An embedding only works in a text encoder of its own width (its vectors live in that space)."""
    w, mw = emb.width, model.text_width
    if w != mw:
        src = f"{emb.path}" if emb.path else f"embedding {emb.token!r}"
        raise SdknobsError(f"{src}: its vectors are {w} wide, {width_family(w)}, but this model's text encoder "
                           f"({model.source or model.family}, family {model.family}) is {mw} wide, "
                           f"{width_family(mw)}; use it with a model of its own family")
