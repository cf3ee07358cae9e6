"""Prompt syntax people bring from AUTOMATIC1111: attention weights and BREAK (`parse_weights`).
Encoding the result is `text.py`'s job.

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

import math
import re

from sdknobs.errors import SdknobsError

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

