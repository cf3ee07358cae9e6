"""Never write half a file: every file sdknobs writes goes to a temporary name in the same folder and
is renamed into place (`os.replace` is atomic on one filesystem), so a crash, a full disk or a bad
tensor leaves the previous file, or none, behind."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path


def atomic_write(path: str | Path, write) -> Path:
    """Call `write(tmp_path)` on a temporary file beside `path`, then rename it to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
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
