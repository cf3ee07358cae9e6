"""`--sample-prompts FILE`: pictures rendered at every validation, one prompt a line, with kohya sd-scripts'
per-line options (library/train_util.py `line_to_prompt_dict`: the line is split at " --"; the first part is
the prompt, each other part one option):

    a large red outlined circle --n blurry --s 20 --l 3.5 --d 7 --w 32 --h 32

    --n negative prompt   --s sampler steps   --l guidance (CFG) scale   --d seed   --w / --h width / height

Blank lines and lines starting with '#' are skipped (as kohya does). Unlike kohya, which warns about an
unknown option and goes on, every bad line here is an error naming the file and line number, raised when
the config is made, before any training. Unset values: steps --validation-steps, guidance
--validation-guidance, seed --seed, size the training resolution.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from sdknobs.errors import SdknobsError

OPTIONS = {"n": "negative_prompt", "s": "steps", "l": "guidance", "d": "seed", "w": "width", "h": "height"}
MAX_SIDE = 4096


@dataclass
class SamplePrompt:
    prompt: str
    line: int  # 1-based line number in the file
    negative_prompt: str = ""
    steps: int | None = None
    guidance: float | None = None
    seed: int | None = None
    width: int | None = None
    height: int | None = None


def parse_line(text: str, where: str) -> SamplePrompt:
    """One line of a sample-prompts file; `where` ("FILE line N") starts every error."""
    parts = text.split(" --")
    prompt = parts[0].strip()
    if not prompt or prompt.startswith("--"):
        raise SdknobsError(f"{where}: expected a prompt before the options, got {text.strip()!r}")
    line = int(where.rsplit(" ", 1)[-1])
    sp = SamplePrompt(prompt, line)
    seen = set()
    for part in parts[1:]:
        m = re.fullmatch(r"(\w+)(?:\s+(.*))?", part.strip(), re.S)
        key = m.group(1).lower() if m else part.strip()
        if key not in OPTIONS:
            raise SdknobsError(f"{where}: unknown option --{key}; expected --n (negative prompt), --s (steps), "
                               f"--l (guidance), --d (seed), --w (width) or --h (height)")
        if key in seen:
            raise SdknobsError(f"{where}: --{key} given twice")
        seen.add(key)
        value = (m.group(2) or "").strip()
        if not value:
            raise SdknobsError(f"{where}: --{key} needs a value")
        if key == "n":
            sp.negative_prompt = value
            continue
        if key == "l":
            try:
                v = float(value)
            except ValueError:
                v = math.nan
            if not (math.isfinite(v) and v >= 0):
                raise SdknobsError(f"{where}: --l (guidance) must be a finite number >= 0, got {value!r}")
            sp.guidance = v
            continue
        if not re.fullmatch(r"\d+", value):
            raise SdknobsError(f"{where}: --{key} ({OPTIONS[key]}) must be a whole number >= 0, got {value!r}")
        v = int(value)
        if key == "s" and v < 1:
            raise SdknobsError(f"{where}: --s (steps) must be >= 1, got {v}")
        if key in ("w", "h") and not (8 <= v <= MAX_SIDE and v % 8 == 0):
            raise SdknobsError(f"{where}: --{key} ({OPTIONS[key]}) must be a multiple of 8 from 8 to {MAX_SIDE}, got {v}")
        setattr(sp, OPTIONS[key], v)
    return sp


def read_sample_prompts(path: str | Path, flag: str = "--sample-prompts") -> list[SamplePrompt]:
    """Every prompt of the file (see the module docstring); SdknobsError naming the file (and line)."""
    p = Path(path)
    if not p.is_file():
        raise SdknobsError(f"{flag} {str(path)!r}: no such file (expected a text file with one prompt a line)")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise SdknobsError(f"{flag} {str(path)!r}: not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise SdknobsError(f"{flag} {str(path)!r}: cannot read it ({e.strerror})") from None
    out = [parse_line(line, f"{path} line {i}") for i, line in enumerate(text.splitlines(), 1)
           if line.strip() and not line.lstrip().startswith("#")]
    if not out:
        raise SdknobsError(f"{flag} {str(path)!r}: no prompts in it (one prompt a line; '#' lines are comments)")
    return out
