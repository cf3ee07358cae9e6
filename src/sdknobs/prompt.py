"""Prompt syntax people bring from AUTOMATIC1111: attention weights and BREAK (`parse_weights`),
`<lora:...>` / `<embedding:...>` tags (`extract_tags`). Encoding the result is `text.py`'s job.

Tags (A1111's extra-network syntax), taken out of the text before it is encoded:
    <lora:NAME>, <lora:NAME:WEIGHT>, <lora:NAME:WEIGHT:WINDOW>
                  NAME.safetensors from the LoRA folder (searched recursively; NAME may be sub/NAME),
                  applied like --lora FILE:WEIGHT@WINDOW (WINDOW as in `lora.spec`: 0.6-1, t<400)
    <embedding:NAME>
                  NAME.safetensors/.pt/.bin/.png from the embedding folder, loaded; the tag becomes the
                  embedding's token (A1111 triggers an embedding by its file name, as here)
Folders default to $XDG_DATA_HOME/sdknobs/{loras,embeddings} (~/.local/share/...). An unknown name is
an error listing the folder's names; another kind (<hypernet:...>) is dropped with a warning, as in A1111.

Weights, with A1111's rules (its `prompt_parser.parse_prompt_attention`, re-implemented here):
    (text)        text x 1.1            [text]        text / 1.1 (times 1/1.1)
    (text:1.5)    text x 1.5            nesting multiplies: ((a)) = a x 1.21, ((a:1.5)) = a x 1.65
    \\( \\) \\[ \\] \\\\  the literal character; a lone backslash is dropped
    BREAK         (capitals, a word of its own) ends the current 75-token chunk
A weight is a plain decimal right before `)`: `(a: 1.5)` and `(a:1e3)` are text "a: 1.5" / "a:1e3"
weighted 1.1, as in A1111. Unbalanced brackets are lenient, as in A1111: a bracket left open
weights everything after it, a stray `)` or `]` is text. Two differences: `(a:nan)`, `(a:inf)` and
weights A1111 cannot parse (`(a:1.2.3)`, where A1111 raises) are errors; BREAK inside brackets still
breaks (in A1111 it becomes the word "break" with weight -1.1).
"""
from __future__ import annotations

import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from sdknobs.errors import SdknobsError

log = logging.getLogger(__name__)

UP, DOWN = 1.1, 1 / 1.1
# one lexical piece each: an escape, a bracket, a weight that closes a bracket, or a run of text
_PIECE = re.compile(r"""
    \\(?P<esc>[()\[\]\\])? |
    (?P<open>[(\[]) |
    :(?P<weight>[+-]?[.\d]+|[+-]?(?i:nan|inf|infinity))\) |
    (?P<close>[)\]]) |
    (?P<text>[^\\()\[\]:]+|:)
""", re.X)
_BREAK = re.compile(r"\s*\bBREAK\b\s*")


def _weight(value: str, prompt: str, what: str) -> float:
    try:
        w = float(value)
    except ValueError:
        w = math.nan
    if not math.isfinite(w):
        raise SdknobsError(f"{what}: weight {value!r} in {prompt!r} is not a finite number; expected (text:NUMBER), "
                           f"e.g. (red:1.2), or escape the brackets as \\( \\)")
    return w


def parse_weights(prompt: str, what: str = "prompt") -> list[tuple[str, float | None]]:
    """The prompt as (text, weight) runs; (\"\", None) marks a BREAK. Adjacent runs of equal weight are merged."""
    runs: list[list] = []  # [text, weight]; weight None = BREAK
    open_round: list[int] = []  # where each open bracket's runs start
    open_square: list[int] = []

    def scale(start: int, factor: float) -> None:
        for run in runs[start:]:
            if run[1] is not None:
                run[1] *= factor

    for m in _PIECE.finditer(prompt):
        if m["open"]:
            (open_round if m["open"] == "(" else open_square).append(len(runs))
        elif m["weight"] is not None and open_round:
            scale(open_round.pop(), _weight(m["weight"], prompt, what))
        elif m["close"] == ")" and open_round:
            scale(open_round.pop(), UP)
        elif m["close"] == "]" and open_square:
            scale(open_square.pop(), DOWN)
        elif m.group(0).startswith("\\"):
            runs.append([m["esc"] or "", 1.0])
        else:  # text, or a bracket/weight with nothing open: literal
            for i, part in enumerate(_BREAK.split(m.group(0))):
                if i:
                    runs.append(["", None])
                runs.append([part, 1.0])
    for start in open_round:
        scale(start, UP)
    for start in open_square:
        scale(start, DOWN)
    merged: list[list] = []
    for text, w in runs:
        if merged and w is not None and merged[-1][1] == w:
            merged[-1][0] += text
        else:
            merged.append([text, w])
    return [(t, w) for t, w in merged] or [("", 1.0)]


# ---------------------------------------------------------------- tags

_LORA = re.compile(r"<lora:(?P<name>[^:<>]+)(?::(?P<weight>[^:<>]*))?"
                   r"(?::(?P<window>t\s*(?:<=|>=|<|>)\s*[\d.]+|[^:<>]*))?>")
_EMBEDDING = re.compile(r"<embedding:(?P<name>[^:<>]+)>")
_OTHER = re.compile(r"<(?P<kind>\w+):[^<>]+>")
LORA_SUFFIXES = (".safetensors",)


def default_dir(kind: str) -> Path:
    """$XDG_DATA_HOME/sdknobs/KIND, or ~/.local/share/sdknobs/KIND."""
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "sdknobs" / kind


def find_named(name: str, folder: str | Path | None, kind: str, suffixes, what: str = "prompt") -> Path:
    """The one file NAME.<suffix> (or sub/NAME.<suffix>) under folder; else an error listing what is there."""
    flag = {"lora": "--lora-dir", "embedding": "--embedding-dir"}[kind]
    folder = Path(folder) if folder else default_dir("loras" if kind == "lora" else "embeddings")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in suffixes and p.is_file()) if folder.is_dir() else []
    names = [p.relative_to(folder).with_suffix("").as_posix() for p in files]
    hits = [p for p, n in zip(files, names) if n == name or p.stem == name]
    if len(hits) == 1:
        return hits[0]
    tag = f"{what} tag <{kind}:{name}>"
    if hits:
        raise SdknobsError(f"{tag}: {len(hits)} files match in {flag} {folder}: "
                           f"{', '.join(str(p.relative_to(folder)) for p in hits)}; name one as <{kind}:SUBFOLDER/NAME>")
    there = (f"it has: {', '.join(names)}" if names else "it holds no " + "/".join(suffixes) + " files"
             ) if folder.is_dir() else "that folder does not exist"
    raise SdknobsError(f"{tag}: no {name} in {flag} {folder}; {there}")


@dataclass
class Tags:
    text: str  # the prompt without its tags (embedding tags replaced by their tokens)
    loras: list = field(default_factory=list)  # LoraSpec
    embeddings: list = field(default_factory=list)  # paths


def extract_tags(prompt: str, lora_dir=None, embedding_dir=None, what: str = "prompt") -> Tags:
    """Resolve and remove the prompt's tags (see the module docstring)."""
    from sdknobs.lora.spec import LoraSpec, parse_window
    from sdknobs.ti.files import SUFFIXES, read_embedding

    out = Tags(prompt)
    if "<" not in prompt:
        return out

    def lora(m):
        tag, w = m.group(0), (m["weight"] or "").strip()
        try:
            weight = float(w) if w else 1.0
        except ValueError:
            weight = math.nan
        if not math.isfinite(weight):
            raise SdknobsError(f"{what} tag {tag}: weight {w!r} is not a finite number; expected <lora:NAME:WEIGHT>, "
                               f"e.g. <lora:style:0.8>")
        window = parse_window(m["window"].strip(), f"{what} tag {tag}") if m["window"] else None
        out.loras.append(LoraSpec(str(find_named(m["name"].strip(), lora_dir, "lora", LORA_SUFFIXES, what)), weight, window))
        return ""

    def embedding(m):
        path = find_named(m["name"].strip(), embedding_dir, "embedding", SUFFIXES, what)
        out.embeddings.append(str(path))
        return read_embedding(path).token

    def other(m):
        log.warning("%s tag %s: unknown kind %r, dropped (known: <lora:NAME:WEIGHT>, <embedding:NAME>)",
                    what, m.group(0), m["kind"])
        return ""

    text = _LORA.sub(lora, prompt)
    text = _EMBEDDING.sub(embedding, text)
    out.text = _OTHER.sub(other, text)
    return out


def check_prompt(prompt: str, lora_dir=None, embedding_dir=None, what: str = "--prompt") -> None:
    """SdknobsError, before any work, for a tag naming no file or a weight that is not a number."""
    parse_weights(extract_tags(prompt, lora_dir, embedding_dir, what).text, what)


# ---------------------------------------------------------------- PNG parameters (A1111's infotext)

_FIELD = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')


def read_parameters(path: str | Path, what: str = "png-info") -> str:
    """The `parameters` text of a picture (what A1111 and sdknobs write); an error if there is none."""
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    if not p.is_file():
        raise SdknobsError(f"{what} {path}: no such file")
    try:
        with Image.open(p) as im:
            text = im.info.get("parameters")
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise SdknobsError(f"{what} {path}: not a readable picture ({e})") from None
    if not isinstance(text, str) or not text.strip():
        raise SdknobsError(f"{what} {path}: the picture has no 'parameters' text (written by sdknobs and A1111; "
                           f"removed by most editors and uploads)")
    return text


def parse_parameters(text: str) -> tuple[str, str, dict[str, str]]:
    """(prompt, negative prompt, {field: value}) from parameters text: prompt lines, then 'Negative prompt: ...'
    lines, then one line of 'Key: value, ...' (taken as fields when it has at least 3, A1111's rule)."""
    lines = text.split("\n")
    fields = {}
    if len(_FIELD.findall(lines[-1])) >= 3:
        for key, value in _FIELD.findall(lines.pop()):
            if value.startswith('"') and value.endswith('"') and len(value) > 1:
                value = value[1:-1].replace('\\"', '"').replace("\\\\", "\\")
            fields[key.strip()] = value.strip()
    neg_at = next((i for i, line in enumerate(lines) if line.startswith("Negative prompt:")), len(lines))
    negative = "\n".join(lines[neg_at:])[len("Negative prompt:"):].strip() if neg_at < len(lines) else ""
    return "\n".join(lines[:neg_at]), negative, fields


def png_settings(path: str | Path, what: str = "--from-png") -> dict:
    """Sampling settings recorded in a picture, by config field name (prompt, negative_prompt, seed, steps,
    guidance, scheduler, width, height, strength, mask_blur): what `--from-png` re-renders with; and lora_flags, the
    LoRAs it was made with that no <lora:> tag in its prompt names (--lora flags, which are not re-applied)."""
    from sdknobs.loop import SCHEDULERS

    prompt, negative, fields = parse_parameters(read_parameters(path, what))
    out = {"prompt": prompt, "negative_prompt": negative}
    samplers = {v[2]: k for k, v in SCHEDULERS.items()}
    convert = {"Steps": ("steps", int), "Seed": ("seed", int), "CFG scale": ("guidance", float),
               "Denoising strength": ("strength", float), "Mask blur": ("mask_blur", float),
               "Sampler": ("scheduler", samplers.__getitem__)}
    for key, (name, cast) in convert.items():
        if key in fields:
            try:
                out[name] = cast(fields[key])
            except (KeyError, ValueError):
                known = f"; known samplers: {', '.join(samplers)}" if key == "Sampler" else ""
                raise SdknobsError(f"{what} {path}: {key} {fields[key]!r} cannot be used{known}") from None
    if "Size" in fields:
        m = re.fullmatch(r"(\d+)x(\d+)", fields["Size"])
        if not m:
            raise SdknobsError(f"{what} {path}: Size {fields['Size']!r} is not WIDTHxHEIGHT")
        out["width"], out["height"] = int(m[1]), int(m[2])
    for key in ("Original size", "Crop top left", "Target size"):  # SDXL's size conditioning (pipelines._size_params)
        if key in fields:
            m = re.fullmatch(r"(\d+)x(\d+)", fields[key])
            if not m:
                raise SdknobsError(f"{what} {path}: {key} {fields[key]!r} is not NxN")
            out[key.lower().replace(" ", "_")] = [int(m[1]), int(m[2])]
    if fields.get("Lora"):  # our specs of every LoRA applied; those not from the prompt's tags were --lora flags
        from sdknobs.lora.spec import parse_spec

        tagged = {Path(t.strip()).name for t in re.findall(r"<lora:([^:<>]+)", prompt + negative)}
        out["lora_flags"] = [s for s in fields["Lora"].split(", ") if Path(parse_spec(s).path).stem not in tagged]
    return out
