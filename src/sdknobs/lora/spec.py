"""`--lora FILE[:WEIGHT][@WINDOW]`: which LoRA file, how strongly, and on which sampler steps.

    WEIGHT   a number (default 1.0; negative subtracts the LoRA). The bypass of layer W becomes
             W x + WEIGHT * (alpha / r) * B A x.
    WINDOW   where in the denoising run the LoRA's U-Net layers are switched on:
             A-B     a fraction of the run's steps: step i of S is on when A <= i/S < B
                     (B = 1 includes the last step). 0 is the first, noisiest step:
                     @0.6-1 = the last 40% of steps, @0-0.5 = the first half.
             t<N, t<=N, t>N, t>=N
                     the scheduler's timestep t (0..999 for SD; high t = much noise):
                     @t<400 = only the low-noise end of the run.
Examples: style.safetensors, style.safetensors:0.8, style.safetensors:0.8@0.6-1, subj.safetensors@t>=500.

Parsing is pure (no files opened); the file is read when the LoRA is applied.
"""
from __future__ import annotations

import math
import operator
import re
from dataclasses import dataclass

from sdknobs.errors import SdknobsError

_NUM = r"(?:\d+(?:\.\d*)?|\.\d+)"
_FRACTION = re.compile(rf"^({_NUM})-({_NUM})$")
_TIMESTEP = re.compile(rf"^t\s*(<=|>=|<|>)\s*({_NUM})$")
_WEIGHT = re.compile(rf"^[-+]?{_NUM}$")
_OPS = {"<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge}


@dataclass(frozen=True)
class Window:
    """Steps on which a LoRA is active: a fraction [lo, hi) of the run, or a timestep comparison."""

    text: str
    lo: float = 0.0  # fraction windows
    hi: float = 1.0
    op: str = ""  # timestep windows: "<", "<=", ">", ">="
    value: float = 0.0

    def active(self, i: int, steps: int, t: float) -> bool:
        """Is step i (0-based, in a run of `steps` steps, at timestep t) inside the window?"""
        if self.op:
            return _OPS[self.op](float(t), self.value)
        pos = min(i, steps - 1) / steps  # < 1 always (PNDM runs one extra step), so hi = 1 includes the last
        return self.lo <= pos < self.hi


@dataclass(frozen=True)
class LoraSpec:
    path: str
    weight: float = 1.0
    window: Window | None = None

    def __str__(self) -> str:
        w = "" if self.weight == 1.0 else f":{self.weight:g}"
        return f"{self.path}{w}{'@' + self.window.text if self.window else ''}"


def parse_window(text: str, what: str = "--lora") -> Window:
    m = _FRACTION.match(text)
    if m:
        lo, hi = float(m[1]), float(m[2])
        if not 0.0 <= lo < hi <= 1.0:
            raise SdknobsError(f"{what}: window @{text} must satisfy 0 <= start < end <= 1 (fractions of the steps)")
        return Window(text, lo=lo, hi=hi)
    m = _TIMESTEP.match(text)
    if m:
        return Window(text, op=m[1], value=float(m[2]))
    raise SdknobsError(f"{what}: window @{text!r} is not START-END (fractions, e.g. @0.6-1) "
                       f"or a timestep bound (e.g. @t<400, @t>=600)")


def parse_spec(text: str | LoraSpec, what: str = "--lora") -> LoraSpec:
    """Parse FILE[:WEIGHT][@WINDOW] (see the module docstring); raise SdknobsError naming the bad part."""
    if isinstance(text, LoraSpec):
        return text
    s = str(text).strip()
    if not s:
        raise SdknobsError(f"{what}: empty value; expected FILE[:WEIGHT][@WINDOW]")
    window = None
    head, at, tail = s.rpartition("@")
    # a window starts with a digit, '.' or 't' and a symbol (t<, t>=, t=...); anything else after '@' is part of the path
    if at and (tail[:1].isdigit() or tail[:1] == "." or re.match(r"^t\s*[^\w\s]", tail)):
        window, s = parse_window(tail, f"{what} {text!r}"), head
    head, colon, tail = s.rpartition(":")
    weight = 1.0
    if colon and "/" not in tail and "\\" not in tail:  # C:\x and dir:1/x stay paths
        if not _WEIGHT.match(tail):
            raise SdknobsError(f"{what} {text!r}: weight {tail!r} is not a number; expected FILE[:WEIGHT][@WINDOW], "
                               f"e.g. style.safetensors:0.8@0.6-1")
        weight, s = float(tail), head
        if not math.isfinite(weight):
            raise SdknobsError(f"{what} {text!r}: weight must be finite")
    if not s:
        raise SdknobsError(f"{what} {text!r}: no file name before the weight/window")
    return LoraSpec(s, weight, window)
