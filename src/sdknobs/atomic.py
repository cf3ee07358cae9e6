"""Never write half a file, never lose one: every file sdknobs writes goes to a temporary name in the
same folder and is renamed into place (`os.replace` is atomic on one filesystem), so a crash, a full
disk or a bad tensor leaves the previous file, or none, behind.

- `check_out_path` is called before any work: the target is not a folder, its parent is not a file,
  the folder is writable, and an existing file is only replaced when the user asked (`--overwrite`).
- Files get the modes the umask gives (0644 under umask 022), as `open()` would; `mkstemp`'s 0600
  and `mkdtemp`'s 0700 are widened to those.
- Folders created for a write that then fails are removed again; temporary files always are.
- OSError (full disk, read-only folder) becomes an SdknobsError naming the path."""
from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from sdknobs.errors import SdknobsError


def umask() -> int:
    m = os.umask(0o022)
    os.umask(m)
    return m


def file_mode() -> int:
    return 0o666 & ~umask()


def dir_mode() -> int:
    return 0o777 & ~umask()


def _existing_ancestor(path: Path) -> Path:
    p = path.absolute().parent
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_out_path(path: str | Path, what: str = "--out", overwrite: bool = False, folder: bool = False) -> Path:
    """Refuse, before any work, an output path that cannot or must not be written.

    folder: the output is a folder (a model); an existing non-empty one is refused unless `overwrite`
    and it holds what we would write (`model_index.json`), so a user's own files are never replaced."""
    p = Path(path)
    if not str(path).strip():
        raise SdknobsError(f"{what}: empty path")
    if p.exists() or p.is_symlink():
        if folder:
            if not p.is_dir():
                raise SdknobsError(f"{what} {str(path)!r} is a file; expected a folder to write the model into")
            entries = list(p.iterdir())
            if entries and not overwrite:
                raise SdknobsError(f"{what} {str(path)!r} is a folder that is not empty ({len(entries)} entries); "
                                   f"choose a new folder, or pass --overwrite to replace a model written there")
            if entries and not (p / "model_index.json").is_file():
                raise SdknobsError(f"{what} {str(path)!r} is not empty and holds no model (no model_index.json); "
                                   f"sdknobs will not replace its files even with --overwrite: choose a new folder")
        else:
            if p.is_dir():
                raise SdknobsError(f"{what} {str(path)!r} is a folder; expected a file name")
            if not overwrite:
                raise SdknobsError(f"{what} {str(path)!r} already exists; pass --overwrite to replace it, or choose "
                                   f"another name")
    parent = _existing_ancestor(p)
    if not parent.is_dir():
        raise SdknobsError(f"{what} {str(path)!r}: {str(parent)!r} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK) or not parent.stat().st_mode & 0o222:  # root too: 0555 means read-only
        raise SdknobsError(f"{what} {str(path)!r}: the folder {str(parent)!r} is not writable")
    try:
        if os.statvfs(parent).f_flag & os.ST_RDONLY:
            raise SdknobsError(f"{what} {str(path)!r}: {str(parent)!r} is on a read-only filesystem")
    except (AttributeError, OSError):
        pass
    return p


@contextmanager
def _new_parents(path: Path):
    """Create `path`'s missing parent folders; remove the ones created here if the body fails."""
    missing = []
    p = path.absolute().parent
    while not p.exists():
        missing.append(p)
        p = p.parent
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SdknobsError(f"cannot create the folder for {str(path)!r}: {e.strerror or e}") from e
    try:
        yield
    except BaseException:
        for d in missing:  # deepest first
            try:
                d.rmdir()
            except OSError:
                break
        raise


def _oserror(path: Path, e: OSError) -> SdknobsError:
    return SdknobsError(f"cannot write {str(path)!r}: {e.strerror or e}")


def atomic_write(path: str | Path, write) -> Path:
    """Call `write(tmp_path)` on a temporary file beside `path`, then rename it to `path`."""
    path = Path(path)
    with _new_parents(path):
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        except OSError as e:
            raise _oserror(path, e) from e
        os.close(fd)
        try:
            write(tmp)
            os.chmod(tmp, file_mode())
            os.replace(tmp, path)
        except OSError as e:
            Path(tmp).unlink(missing_ok=True)
            raise _oserror(path, e) from e
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return path


def atomic_folder(path: str | Path, write) -> Path:
    """Call `write(tmp_folder)` on a temporary folder beside `path`, then rename it to `path`.

    An existing `path` (checked by `check_out_path(folder=True)`: empty, or a model folder the user
    asked to overwrite) is moved aside first and removed only once the new folder is in place."""
    path = Path(path)
    with _new_parents(path):
        try:
            tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
        except OSError as e:
            raise _oserror(path, e) from e
        old = None
        try:
            write(tmp)
            for p in [tmp, *tmp.rglob("*")]:  # libraries may write through their own temp files (0600)
                if not p.is_symlink():
                    os.chmod(p, dir_mode() if p.is_dir() else file_mode())
            if path.exists():
                old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
                os.replace(path, old / "x")
            os.replace(tmp, path)
        except BaseException as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if old is not None and (old / "x").exists() and not path.exists():
                os.replace(old / "x", path)  # put the previous folder back
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
            if isinstance(e, OSError):
                raise _oserror(path, e) from e
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return path


def save_safetensors(tensors: dict, path: str | Path, metadata: dict | None = None, clone: bool = True) -> Path:
    """safetensors.save_file, atomically; tensors go to the CPU, contiguous, and (clone) unshared, as
    safetensors refuses tensors that share memory; metadata values become strings (safetensors
    stores only strings)."""
    from safetensors.torch import save_file

    data = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    if clone:
        data = {k: v.clone() for k, v in data.items()}
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    return atomic_write(path, lambda tmp: save_file(data, tmp, metadata=meta))


def write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))
