"""Keeping a training run whole, for the shared trainer (train-lora, train-ti) and the shapes pretraining:

- `check_numbers`, `check_folder`: bad values and unwritable folders are refused before anything is created;
- `resume_point`: what the run folder may hold before a run starts (`--resume` needs a whole checkpoint and
  falls back past broken ones; without it, existing checkpoints are an error naming --resume and --overwrite);
- `Keeper`: checkpoints pruned to --keep-checkpoints but never the newest good one, and the stop on a
  non-finite loss that removes the checkpoint whose weights gave it;
- `DeferredInterrupt`: the first Ctrl-C lets the step finish, so the loop can save it and then exit;
- `Guard`: both of those around a training loop.
"""
from __future__ import annotations

import dataclasses
import math
import shutil
import signal
import sys
import threading
from pathlib import Path

from sdknobs.atomic import check_out_path
from sdknobs.errors import SdknobsError
from sdknobs.training.checkpoint import (NonFiniteWeights, all_finite, checkpoint_name, latest_checkpoint,
                                         list_checkpoints, newest_whole, prune_checkpoints, remove_stale,
                                         save_checkpoint, step_of)

SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # what torch.manual_seed / Generator.manual_seed accept


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_seed(name: str, value: int) -> None:
    if not SEED_MIN <= value <= SEED_MAX:
        raise SdknobsError(f"{name} {value} is outside the seeds torch accepts ({SEED_MIN} to {SEED_MAX})")


def check_numbers(cfg, seeds=("seed", "validation_seeds")) -> None:
    """Every float field of a config dataclass (and float lists) must be finite; seed fields in torch's range."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(v, float) and not math.isfinite(v):
                raise SdknobsError(f"{flag(f.name)} must be a finite number, got {v}")
            if f.name in seeds and isinstance(v, int):
                check_seed(flag(f.name), v)


def check_file(path: str | Path, what: str, overwrite: bool) -> None:
    """An output file: see atomic.check_out_path (not a folder, parent a writable folder, exists only with --overwrite)."""
    check_out_path(path, what, overwrite=overwrite)


def check_folder(path: str | Path, what: str) -> None:
    """A folder the run writes into (it may exist): not a file, and in a writable folder."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise SdknobsError(f"{what} {str(path)!r} is a file; expected a folder")
    check_out_path(p / "train.log", what, overwrite=True)


def resume_point(run_dir: Path, stages: tuple[str, ...], resume: bool, overwrite: bool, out: str | Path, warn):
    """Where a run starts: (stage, checkpoint path, read_checkpoint data) with --resume (the newest whole
    checkpoint of the latest stage; broken ones are skipped and named through `warn`), else None.

    Errors: --resume with no whole checkpoint; without --resume, checkpoints already in the run folder
    (unless --overwrite: `clear` then removes them once the run is validated)."""
    found = [p for s in stages for p in list_checkpoints(run_dir, s)]
    if resume:  # (with --overwrite too: that then only lets --out be replaced)
        skipped = []
        for stage in reversed(stages):
            hit = newest_whole(run_dir, stage, log=skipped.append)
            if hit is not None:
                for msg in skipped:
                    warn(f"--resume: {msg}; falling back to {hit[0].name}")
                return (stage, *hit)
        if skipped:
            raise SdknobsError(f"--resume: no whole checkpoint in --run-dir {str(run_dir)!r}: " + "; ".join(skipped))
        others = [p.name for p in list_checkpoints(run_dir) if p not in found]
        partial = sorted(p.name for p in run_dir.glob("ckpt-*") if p.name not in others) if run_dir.is_dir() else []
        raise SdknobsError(f"--resume: no checkpoint in --run-dir {str(run_dir)!r}"
                           + (f" ({', '.join(partial)} incomplete)" if partial else "")
                           + (f" (it holds {others[-1]}, from another kind of run)" if others else "")
                           + "; drop --resume to start a new run, or give the --run-dir of the run to continue")
    if found and not overwrite:
        if Path(out).exists():
            raise SdknobsError(f"--out {str(out)!r} and its checkpoints in --run-dir {str(run_dir)!r} ({found[-1].name}) are a "
                               f"finished run: pass --resume to continue it (e.g. with more --steps), or --overwrite "
                               f"to train again from scratch")
        raise SdknobsError(f"--run-dir {str(run_dir)!r} already holds checkpoints ({found[-1].name}); pass --resume to "
                           f"continue that run, or --overwrite to start again from scratch (its checkpoints are "
                           f"deleted), or choose another --run-dir")
    return None


def clear(run_dir: Path, stages: tuple[str, ...]) -> None:
    """--overwrite, once the new run is validated: remove the old run's checkpoints and temporary folders."""
    remove_stale(run_dir)
    for s in stages:
        for p in list_checkpoints(run_dir, s):
            shutil.rmtree(p)



HINT_SHOWN = "the resume hint was shown"  # KeyboardInterrupt args: the CLI adds no second line

class Keeper:
    """The checkpoints of one stage. A checkpoint is *good* once a step trained from its weights gave a
    finite loss and finite weights (or it is where this session resumed); pruning to `keep` never deletes the newest good one,
    so a loss that turns non-finite right after a checkpoint still leaves one to go on from."""

    def __init__(self, run_dir: Path, stage: str, keep: int, resumed: Path | None = None):
        self.run_dir, self.stage, self.keep = Path(run_dir), stage, keep
        self.good, self.pending, self.latest = resumed, None, resumed
        self.latest_step = step_of(resumed) if resumed is not None else None

    def save(self, step: int, **kw) -> Path:
        """save_checkpoint(run_dir/ckpt-<stage>-<step>, ...) and prune; NonFiniteWeights writes nothing."""
        p = save_checkpoint(self.run_dir / checkpoint_name(self.stage, step), step=step, **kw)
        self.pending, self.latest, self.latest_step = p, p, step
        prune_checkpoints(self.run_dir, self.stage, self.keep, protect=self.good)
        return p

    def finite_step(self) -> None:
        """A step gave a finite loss and weights: the weights it started from (the newest checkpoint's) are good."""
        if self.pending is not None:
            self.good, self.pending = self.pending, None
            prune_checkpoints(self.run_dir, self.stage, self.keep, protect=self.good)

    def finish(self) -> None:
        """The run ended well: prune to `keep` without protecting an older checkpoint."""
        prune_checkpoints(self.run_dir, self.stage, self.keep)

    def nonfinite(self, what: str, lr_flags: str) -> SdknobsError:
        """The error that stops a run whose loss or weights became NaN / inf; removes the checkpoint whose
        weights gave the non-finite loss (written this session)."""
        msg = f"{what}: training stopped"
        if self.pending is not None:
            shutil.rmtree(self.pending, ignore_errors=True)
            msg += f"; removed {self.pending.name} (training on from it gives that)"
        if self.good is not None:
            return SdknobsError(f"{msg}; kept {str(self.good)!r} (finite weights and loss): continue from it with "
                                f"--resume and a lower {lr_flags}")
        return SdknobsError(f"{msg}; no checkpoint was kept before it: start again with a lower {lr_flags}")

    def interrupted(self, done: int, save=None) -> str:
        """Ctrl-C: with `save`, step `done` is saved first (unless it is already); the line to show."""
        if save is not None and done and self.latest_step != done:
            save(done)
        if save is not None and done and self.latest_step == done:
            return (f"interrupted after step {done}: saved {str(self.latest)!r}; to continue, run the same "
                    f"command with --resume")
        newest = latest_checkpoint(self.run_dir)
        if newest is None:
            return "interrupted before any checkpoint was written: nothing to resume"
        return f"interrupted; the newest checkpoint is {newest.name}: to continue from it, run the same command with --resume"


class DeferredInterrupt:
    """While active (in the main thread, with Python's own SIGINT handler in place), the first Ctrl-C only
    sets `requested`: the training loop finishes its step, saves it and raises KeyboardInterrupt itself.
    A second Ctrl-C interrupts at once (the newest checkpoint on disk stays whole)."""

    def __init__(self, enabled: bool = True):
        self.enabled, self.requested, self._old = enabled, False, None

    def __enter__(self):
        if (self.enabled and threading.current_thread() is threading.main_thread()
                and signal.getsignal(signal.SIGINT) is signal.default_int_handler):
            self._old = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nsdknobs: Ctrl-C: saving a checkpoint after this step (Ctrl-C again to stop without saving)",
              file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
            self._old = None
        return False


class Guard:
    """The body of a training loop, kept whole:

        with Guard(keeper, save, "--learning-rate", warn, start) as g:
            for step in ...:
                if g.stop: break                  # Ctrl-C was pressed: the step before was the last
                loss = one_step(step)
                g.step_done(step + 1, loss)       # a non-finite loss stops the run (Keeper.nonfinite)
                ... save(step + 1) when due       # NonFiniteWeights stops it too

    On leaving after a Ctrl-C, the last finished step is saved (`save(done)`), the resume hint goes to `warn`
    and KeyboardInterrupt is raised (the CLI exits 130)."""

    def __init__(self, keeper: Keeper, save, lr_flag: str, warn, start: int, label: str = "", enabled: bool = True):
        self.keeper, self.save, self.lr_flag, self.warn, self.done, self.label = keeper, save, lr_flag, warn, start, label
        self.interrupt = DeferredInterrupt(enabled)

    @property
    def stop(self) -> bool:
        return self.interrupt.requested

    def __enter__(self):
        self.interrupt.__enter__()
        return self

    def step_done(self, done: int, loss: float, params=None) -> None:
        """After step `done`: its loss, and the trained `params` it left, must be finite."""
        self.done = done
        if not math.isfinite(loss):
            raise self.keeper.nonfinite(f"{self.label}the training loss became {loss} at step {done}", self.lr_flag)
        if params is not None and not all_finite(params):
            raise self.keeper.nonfinite(f"{self.label}the weights became non-finite at step {done}", self.lr_flag)
        self.keeper.finite_step()

    def __exit__(self, typ, exc, tb):
        self.interrupt.__exit__()
        try:
            if typ is None and self.interrupt.requested:
                self.warn(self.keeper.interrupted(self.done, self.save))
                raise KeyboardInterrupt(HINT_SHOWN)
        except NonFiniteWeights as e:
            typ, exc = NonFiniteWeights, e
        if typ is not None and issubclass(typ, NonFiniteWeights):
            raise self.keeper.nonfinite(f"{self.label}the weights became non-finite at step {self.done} ({exc})",
                                        self.lr_flag) from None
        if typ is not None and issubclass(typ, KeyboardInterrupt):  # a second Ctrl-C, mid-step: nothing saved now
            self.warn(self.keeper.interrupted(self.done))
            if exc is not None:
                exc.args = (HINT_SHOWN,)
        return False
