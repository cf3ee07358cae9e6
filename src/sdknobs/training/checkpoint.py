"""Atomic save / load of a whole training state, for exact resume.

A checkpoint is a folder:
    weights.safetensors   every module's state_dict, keys "<module name>/<param name>"
    state.pt              step, optimizer state_dicts, torch / python / numpy RNG states, the
                          states of named torch.Generators, and a free-form `extra` dict
                          (plain Python values and tensors only: it is read with
                          torch.load(weights_only=True), so it never runs pickled code).
It is written under a temporary name in the same folder and renamed into place, so a crash while
saving leaves the previous checkpoint intact and never a half-written one.
"""
from __future__ import annotations

import os
import random
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

WEIGHTS = "weights.safetensors"
STATE = "state.pt"


def _rng_states() -> dict:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {"name": np_state[0], "key": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached": float(np_state[4])},
    }


def _set_rng_states(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    py = s["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = s["numpy"]
    np.random.set_state((n["name"], n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))


def save_checkpoint(
    path: str | Path,
    *,
    step: int,
    modules: dict[str, torch.nn.Module] | None = None,
    optimizers: dict[str, torch.optim.Optimizer] | None = None,
    generators: dict[str, torch.Generator] | None = None,
    extra: dict | None = None,
) -> Path:
    """Write a checkpoint folder at `path` atomically (temp folder + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, mod in (modules or {}).items():
        for k, v in mod.state_dict().items():
            # clone: safetensors refuses tensors that share storage (tied weights, views)
            tensors[f"{name}/{k}"] = v.detach().to("cpu").contiguous().clone()
    state = {
        "step": int(step),
        "module_names": sorted((modules or {}).keys()),
        "optimizers": {k: o.state_dict() for k, o in (optimizers or {}).items()},
        "generators": {k: g.get_state() for k, g in (generators or {}).items()},
        "rng": _rng_states(),
        "extra": extra or {},
    }
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp", dir=path.parent))
    try:
        save_file(tensors, str(tmp / WEIGHTS))
        torch.save(state, tmp / STATE)
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def load_checkpoint(
    path: str | Path,
    *,
    modules: dict[str, torch.nn.Module] | None = None,
    optimizers: dict[str, torch.optim.Optimizer] | None = None,
    generators: dict[str, torch.Generator] | None = None,
    restore_rng: bool = True,
) -> dict:
    """Load a checkpoint into the given objects (in place); returns {"step", "extra"}.

    Every module, optimizer and generator named here must be in the checkpoint."""
    path = Path(path)
    tensors = load_file(str(path / WEIGHTS))
    state = torch.load(path / STATE, weights_only=True)
    for name, mod in (modules or {}).items():
        prefix = f"{name}/"
        sd = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        if not sd:
            raise KeyError(f"checkpoint {path} has no weights for module {name!r}")
        mod.load_state_dict(sd, strict=True)
    for name, opt in (optimizers or {}).items():
        opt.load_state_dict(state["optimizers"][name])
    for name, gen in (generators or {}).items():
        gen.set_state(state["generators"][name])
    if restore_rng:
        _set_rng_states(state["rng"])
    return {"step": state["step"], "extra": state["extra"]}


def checkpoint_name(stage: str, step: int) -> str:
    return f"ckpt-{stage}-{step:07d}"


def list_checkpoints(run_dir: str | Path, stage: str | None = None) -> list[Path]:
    """Checkpoint folders in `run_dir` (optionally of one stage), oldest step first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    pat = re.compile(r"^ckpt-(?P<stage>[a-z0-9_]+)-(?P<step>\d+)$")
    found = []
    for p in run_dir.iterdir():
        m = pat.match(p.name)
        if m and p.is_dir() and (p / STATE).exists() and (stage is None or m["stage"] == stage):
            found.append((int(m["step"]), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | Path, stage: str | None = None) -> Path | None:
    ckpts = list_checkpoints(run_dir, stage)
    return ckpts[-1] if ckpts else None


def prune_checkpoints(run_dir: str | Path, stage: str, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints of `stage`."""
    for p in list_checkpoints(run_dir, stage)[:-keep] if keep > 0 else []:
        shutil.rmtree(p, ignore_errors=True)
