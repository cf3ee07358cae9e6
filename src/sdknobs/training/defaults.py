"""Training defaults that fit the model: a flag the run leaves unset (None) takes

    1. the model folder's sdknobs.json  {"training": {"lora": {...}, "ti": {...}}}   (the shapes model ships its own)
    2. else its family's usual values     model.TRAINING_DEFAULTS[family][method]     (SD1.x / SD2.x)
    3. else the config dataclass's fallback (the field's metadata "fallback")

Which fields take part: every field of the config dataclass whose default is None (steps, learning_rate,
batch_size, min_snr_gamma; LoRA's rank). `resolve` fills them in once the model is loaded, checks each value
that came from a file with the config's own validation (one line naming the file and key), and returns where
each value came from, for the run's log and history.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from sdknobs.errors import SdknobsError

SOURCES = ("flag", "model", "family", "fallback")


def defaultable(cls) -> dict[str, dataclasses.Field]:
    """The fields of a config class that take the model's default when unset (default None + a fallback)."""
    return {f.name: f for f in dataclasses.fields(cls) if f.default is None and "fallback" in f.metadata}


def settings_path(model) -> Path | None:
    src = Path(str(model.source)) if getattr(model, "source", "") else None
    from sdknobs.model import SETTINGS_FILE

    return src / SETTINGS_FILE if src is not None and src.is_dir() else None


def _check_type(value, kind) -> bool:
    if kind is bool:
        return isinstance(value, bool)
    if kind is str:
        return isinstance(value, str)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return kind is float or float(value).is_integer()


def model_section(settings: dict, method: str, cls, where: str) -> dict:
    """The "training".<method> section of a model's settings, type-checked against `cls`'s defaultable fields
    ({} when absent); SdknobsError naming `where` (the file) and the key."""
    training = settings.get("training", {})
    if not isinstance(training, dict):
        raise SdknobsError(f"{where}: \"training\" must be an object of methods (lora, ti), got {training!r}")
    sec = training.get(method, {})
    if not isinstance(sec, dict):
        raise SdknobsError(f"{where}: \"training\".{method} must be an object of flag values, got {sec!r}")
    fields = defaultable(cls)
    out = {}
    for key, v in sec.items():
        if key not in fields:
            raise SdknobsError(f"{where}: \"training\".{method}.{key} is not known; the keys are {', '.join(fields)}")
        kind = fields[key].metadata.get("type", float)
        if not _check_type(v, kind):
            raise SdknobsError(f"{where}: \"training\".{method}.{key} must be {'an integer' if kind is int else 'a number'}"
                               f", got {v!r}")
        out[key] = kind(v)
    return out


def family_section(family: str, method: str) -> dict:
    from sdknobs.model import TRAINING_DEFAULTS

    return dict(TRAINING_DEFAULTS.get(family, {}).get(method, {}))


def resolve(cfg, model, method: str) -> dict[str, str]:
    """Fill cfg's unset defaultable fields in place (model > family > fallback); returns {field: source}
    for every defaultable field ("flag" where the run gave it). Values from a file or the family table
    pass the config's own checks first, so a bad one is one line naming where it came from."""
    fields = defaultable(type(cfg))
    path = settings_path(model)
    where = str(path) if path is not None else f"the settings of model {model.source!r}"
    from_model = model_section(getattr(model, "settings", {}) or {}, method, type(cfg), where)
    from_family = family_section(model.family, method)
    sources, chosen = {}, {}
    for name, f in fields.items():
        if getattr(cfg, name) is not None:
            sources[name] = "flag"
        elif name in from_model:
            chosen[name], sources[name] = from_model[name], "model"
        elif name in from_family:
            chosen[name], sources[name] = from_family[name], "family"
        else:
            chosen[name], sources[name] = f.metadata["fallback"], "fallback"
    for name, v in chosen.items():  # each value alone through the config's validation
        try:
            dataclasses.replace(cfg, **{name: v})
        except SdknobsError as e:
            origin = (f"{where}: \"training\".{method}.{name}" if sources[name] == "model"
                      else f"model.TRAINING_DEFAULTS[{model.family!r}][{method!r}][{name!r}]" if sources[name] == "family"
                      else f"the fallback of {name}")
            raise SdknobsError(f"{origin} = {v!r}: {e}") from None
    for name, v in chosen.items():
        setattr(cfg, name, v)
    return sources


def describe(sources: dict[str, str], cfg) -> str:
    """One line for the log: each defaultable value and where it came from."""
    return ", ".join(f"{k.replace('_', '-')} {getattr(cfg, k)!r} ({v})" for k, v in sources.items())


def help_text(cls, name: str, method: str) -> str:
    """--help's default for a defaultable field: the shipped model's value and the families'."""
    from sdknobs.model import EMBEDDED, SETTINGS_FILE, TRAINING_DEFAULTS

    parts = []
    for emb, folder in EMBEDDED.items():
        try:
            sec = json.loads((Path(folder) / SETTINGS_FILE).read_text()).get("training", {}).get(method, {})
        except (OSError, ValueError, AttributeError):
            sec = {}
        if name in sec:
            parts.append(f"{emb}: {sec[name]:g}" if isinstance(sec[name], float) else f"{emb}: {sec[name]}")
    fams: dict[str, list[str]] = {}
    for fam, table in TRAINING_DEFAULTS.items():
        if name in table.get(method, {}):
            v = table[method][name]
            fams.setdefault(f"{v:g}" if isinstance(v, float) else str(v), []).append(fam)
    parts += [f"{'/'.join(f)}: {v}" for v, f in fams.items()]
    fb = dataclasses.fields(cls)
    fallback = next(f.metadata["fallback"] for f in fb if f.name == name)
    parts.append(f"others: {fallback:g}" if isinstance(fallback, float) else f"others: {fallback}")
    return "the model's: " + "; ".join(parts)
