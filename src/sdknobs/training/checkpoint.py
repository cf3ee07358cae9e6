"""Atomic save / load of a whole training state, for exact resume.

A checkpoint is a folder:
    weights.safetensors   every module's state_dict, keys "<module name>/<param name>"
    state.pt              step, optimizer state_dicts, torch / python / numpy RNG states, the
                          states of named torch.Generators, and a free-form `extra` dict
                          (plain Python values and tensors only: it is read with
                          torch.load(weights_only=True), so it never runs pickled code).
It is written under a temporary name in the same folder (`.ckpt-...tmp*`, the umask's modes) and
renamed into place, so a crash or SIGKILL while saving leaves the previous checkpoints intact and never a
half-written one under a checkpoint name; `remove_stale` clears such temporary folders later. Weights
with NaN or inf are refused (`NonFiniteWeights`): a kept checkpoint can always be trained on.
`read_checkpoint` checks a folder whole (both files readable, finite weights) before anything is loaded.
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

from sdknobs.atomic import dir_mode, file_mode
from sdknobs.errors import SdknobsError

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


class NonFiniteWeights(SdknobsError):
    """A checkpoint was not written because a weight holds NaN or inf."""


def nonfinite(tensors: dict[str, torch.Tensor]) -> str | None:
    """The first key whose floating-point tensor holds a NaN or an inf, else None."""
    return next((k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)


def all_finite(params) -> bool:
    """True if every floating-point tensor in `params` holds only finite values (one device sync)."""
    flags = [torch.isfinite(p.detach()).all() for p in params if p.is_floating_point()]
    return bool(torch.stack(flags).all()) if flags else True


def save_checkpoint(
    path: str | Path,
    *,
    step: int,
    modules: dict[str, torch.nn.Module] | None = None,
    optimizers: dict[str, torch.optim.Optimizer] | None = None,
    generators: dict[str, torch.Generator] | None = None,
    extra: dict | None = None,
) -> Path:
    """Write a checkpoint folder at `path` atomically (temp folder + rename); NonFiniteWeights if a
    module's weights are not all finite (nothing is written then)."""
    path = Path(path)
    tensors = {}
    for name, mod in (modules or {}).items():
        for k, v in mod.state_dict().items():
            # clone: safetensors refuses tensors that share storage (tied weights, views)
            tensors[f"{name}/{k}"] = v.detach().to("cpu").contiguous().clone()
    bad = nonfinite(tensors)
    if bad is not None:
        raise NonFiniteWeights(f"not saving {path.name}: weight {bad!r} holds NaN or inf")
    state = {
        "step": int(step),
        "module_names": sorted((modules or {}).keys()),
        "optimizers": {k: o.state_dict() for k, o in (optimizers or {}).items()},
        "generators": {k: g.get_state() for k, g in (generators or {}).items()},
        "rng": _rng_states(),
        "extra": extra or {},
    }
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp", dir=path.parent))
        os.chmod(tmp, dir_mode())  # mkdtemp gives 0700
        save_file(tensors, str(tmp / WEIGHTS))
        torch.save(state, tmp / STATE)
        for f in (WEIGHTS, STATE):
            os.chmod(tmp / f, file_mode())  # safetensors writes 0600
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise SdknobsError(f"cannot write the checkpoint {str(path)!r}: {e.strerror or e}") from e
        raise
    return path


def read_checkpoint(path: str | Path) -> tuple[dict, dict]:
    """(tensors, state) of a whole checkpoint folder, or SdknobsError saying what is wrong with it
    (a missing, truncated or garbage file, an unexpected layout, non-finite weights)."""
    path = Path(path)
    try:
        tensors = load_file(str(path / WEIGHTS))
        state = torch.load(path / STATE, weights_only=True, map_location="cpu")
    except Exception as e:  # safetensors, pickle and OS errors of several types
        why = str(e).strip().splitlines()[0][:160] if str(e).strip() else ""
        raise SdknobsError(f"checkpoint {str(path)!r} is not readable ({type(e).__name__}: {why})") from e
    if not isinstance(state, dict) or not {"step", "optimizers", "generators", "rng", "extra"} <= set(state):
        raise SdknobsError(f"checkpoint {str(path)!r}: {STATE} is not an sdknobs training state")
    bad = nonfinite(tensors)
    if bad is not None:
        raise SdknobsError(f"checkpoint {str(path)!r}: weight {bad!r} holds NaN or inf")
    return tensors, state


def load_checkpoint(
    path: str | Path,
    *,
    modules: dict[str, torch.nn.Module] | None = None,
    optimizers: dict[str, torch.optim.Optimizer] | None = None,
    generators: dict[str, torch.Generator] | None = None,
    restore_rng: bool = True,
    data: tuple[dict, dict] | None = None,
) -> dict:
    """Load a checkpoint (`data` = read_checkpoint(path) if already read) into the given objects
    (in place); returns {"step", "extra"}.

    Every module, optimizer and generator named here must be in the checkpoint, with the same shapes."""
    path = Path(path)
    tensors, state = data if data is not None else read_checkpoint(path)
    try:
        for name, mod in (modules or {}).items():
            prefix = f"{name}/"
            sd = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            if not sd:
                raise SdknobsError(f"checkpoint {str(path)!r} has no weights for {name!r}")
            mod.load_state_dict(sd, strict=True)
        for name, opt in (optimizers or {}).items():
            opt.load_state_dict(state["optimizers"][name])
        for name, gen in (generators or {}).items():
            gen.set_state(state["generators"][name])
    except (KeyError, RuntimeError, ValueError) as e:
        if isinstance(e, SdknobsError):
            raise
        why = str(e).strip().splitlines()[0][:200]
        raise SdknobsError(f"checkpoint {str(path)!r} does not fit this run ({type(e).__name__}: {why}); "
                           f"was it written with other settings?") from e
    if restore_rng:
        _set_rng_states(state["rng"])
    return {"step": state["step"], "extra": state["extra"]}


def checkpoint_name(stage: str, step: int) -> str:
    return f"ckpt-{stage}-{step:07d}"


_NAME = re.compile(r"^ckpt-(?P<stage>[a-z0-9_]+)-(?P<step>\d+)$")


def list_checkpoints(run_dir: str | Path, stage: str | None = None) -> list[Path]:
    """Checkpoint folders in `run_dir` (optionally of one stage), oldest step first, whole or not."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = []
    for p in run_dir.iterdir():
        m = _NAME.match(p.name)
        if m and p.is_dir() and (stage is None or m["stage"] == stage):  # whole or not: see read_checkpoint
            found.append((int(m["step"]), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | Path, stage: str | None = None) -> Path | None:
    ckpts = list_checkpoints(run_dir, stage)
    return ckpts[-1] if ckpts else None


def newest_whole(run_dir: str | Path, stage: str, log=None) -> tuple[Path, tuple[dict, dict]] | None:
    """The newest checkpoint of `stage` that reads whole, with its data (see read_checkpoint); broken ones
    are skipped, each named through `log`. None when there is no whole one."""
    for p in reversed(list_checkpoints(run_dir, stage)):
        try:
            return p, read_checkpoint(p)
        except SdknobsError as e:
            if log is not None:
                log(f"skipping {p.name}: {e}")
    return None


def step_of(path: Path) -> int:
    return int(_NAME.match(path.name)["step"])


def prune_checkpoints(run_dir: str | Path, stage: str, keep: int, protect: Path | None = None) -> None:
    """Delete all but the newest `keep` checkpoints of `stage` (0 = keep all), never `protect`."""
    for p in list_checkpoints(run_dir, stage)[:-keep] if keep > 0 else []:
        if protect is None or p != Path(protect):
            shutil.rmtree(p, ignore_errors=True)


def remove_stale_file(path: str | Path) -> None:
    """Remove the temporary files a killed atomic write of `path` left beside it (.<name>.*.tmp)."""
    path = Path(path)
    for p in path.parent.glob(f".{path.name}.*.tmp") if path.parent.is_dir() else []:
        if p.is_file():
            p.unlink(missing_ok=True)


def remove_stale(run_dir: str | Path) -> None:
    """Clear what a killed save left behind: temporary folders (.ckpt-*.tmp*) are removed; a previous
    checkpoint moved aside (.ckpt-*.old) goes back to its name if nothing replaced it."""
    run_dir = Path(run_dir)
    for p in run_dir.glob(".ckpt-*") if run_dir.is_dir() else []:
        target = run_dir / p.name[1:-len(".old")]
        if p.name.endswith(".old") and not target.exists():
            os.replace(p, target)
        elif ".tmp" in p.name or p.name.endswith(".old"):
            shutil.rmtree(p, ignore_errors=True)
