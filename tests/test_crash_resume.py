"""Interrupted training always resumes: SIGKILL at several moments (between steps, half-way through writing a
checkpoint, while the final file is renamed into place, at a random moment) leaves only whole checkpoints and
`--resume` reaches the uninterrupted run's bits; Ctrl-C saves the last finished step and exits 130; a
truncated, garbage, missing or malicious checkpoint is skipped (and named) on resume; a non-finite loss keeps
a finite checkpoint that trains on at a lower learning rate.

Run as a script (`python test_crash_resume.py HOOK K -- ARGV`) this file is the killed worker: it installs
HOOK at step K and runs `sdknobs ARGV`."""
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

STEPS = 16


def _worker(hook: str, k: int, argv: list[str]) -> int:
    torch.set_num_threads(1)
    from sdknobs.cli import main
    from sdknobs.training import trainer

    def at_step(action):
        real = trainer._Session.optimizer_step

        def step(self, s):
            if s == k:
                action()
            return real(self, s)

        trainer._Session.optimizer_step = step

    kill = lambda: os.kill(os.getpid(), signal.SIGKILL)  # noqa: E731
    if hook == "kill-before-step":
        at_step(kill)
    elif hook == "sigint-in-step":  # Ctrl-C arrives in the middle of step k
        at_step(lambda: os.kill(os.getpid(), signal.SIGINT))
    elif hook == "kill-in-save":  # half of checkpoint k's state.pt is on disk when the process dies
        real_save = torch.save

        def save(obj, f, *a, **kw):
            if isinstance(obj, dict) and obj.get("step") == k:
                Path(f).write_bytes(pickle.dumps(obj)[:50])
                kill()
            return real_save(obj, f, *a, **kw)

        torch.save = save
    elif hook == "kill-in-out":  # the finished --out file is complete under its temporary name
        out, real_replace = Path(argv[argv.index("--out") + 1]).absolute(), os.replace

        def replace(src, dst, **kw):
            if Path(dst).absolute() == out:
                kill()
            return real_replace(src, dst, **kw)

        os.replace = replace
    return main(argv)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from sdknobs.shapes import world

    return world.write_dataset(tmp_path_factory.mktemp("crash") / "data", 4, seed=0)


def _argv(data, tiny_dir, out, *extra, steps=STEPS):
    return ["train-lora", str(data), "--model", str(tiny_dir), "--out", str(out), "--steps", str(steps),
            "--checkpoint-every", "2", "--keep-checkpoints", "2", "--batch-size", "2", "--flip", "--caption-dropout",
            "0.3", "--learning-rate", "3e-3", "--lr-scheduler", "cosine", "--validate-every", "0", "--no-progress",
            *extra]


@pytest.fixture(scope="module")
def reference(data, tiny_dir, tmp_path_factory):
    from sdknobs.cli import main

    out = tmp_path_factory.mktemp("ref") / "w.safetensors"
    assert main(_argv(data, tiny_dir, out)) == 0
    return load_file(str(out))


def _spawn(*args) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    # SIG_DFL: a shell's background job inherits SIGINT ignored, and Python then never raises KeyboardInterrupt
    return subprocess.Popen([sys.executable, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _names(run: Path) -> list[str]:
    return sorted(p.name for p in run.iterdir() if p.name.startswith("ckpt-"))


def _all_whole(run: Path) -> None:
    from sdknobs.training.checkpoint import list_checkpoints, read_checkpoint

    for p in list_checkpoints(run):
        read_checkpoint(p)  # raises if not whole
        assert oct(p.stat().st_mode & 0o777) == oct(0o777 & ~_umask()) and (p / "state.pt").stat().st_mode & 0o777 == 0o666 & ~_umask()


def _umask() -> int:
    m = os.umask(0o022)
    os.umask(m)
    return m


def _resume_and_compare(data, tiny_dir, out, reference, capsys, *extra):
    from sdknobs.cli import main

    capsys.readouterr()
    assert main(_argv(data, tiny_dir, out, "--resume", *extra)) == 0, capsys.readouterr().err
    got = load_file(str(out))
    assert got.keys() == reference.keys() and all(torch.equal(got[k], reference[k]) for k in got)
    left = [p.name for d in (out.parent, out.parent / "w-run") for p in d.iterdir() if p.name.startswith(".")]
    assert not left, left  # no temporary files or folders left behind
    assert out.stat().st_mode & 0o777 == 0o666 & ~_umask()
    return capsys.readouterr()


@pytest.mark.parametrize("hook, k, left", [
    ("kill-before-step", 5, ["ckpt-train-0000002", "ckpt-train-0000004"]),  # between steps 5 and 6
    ("kill-in-save", 6, ["ckpt-train-0000002", "ckpt-train-0000004"]),  # while ckpt-train-0000006 is written
    ("kill-in-out", 0, ["ckpt-train-0000014", "ckpt-train-0000016"]),  # while the final file is renamed into place
])
def test_sigkill_then_resume_is_bit_identical(hook, k, left, data, tiny_dir, reference, tmp_path, capsys):
    out = tmp_path / "w.safetensors"
    p = _spawn(__file__, hook, str(k), "--", *_argv(data, tiny_dir, out))
    _, err = p.communicate(timeout=300)
    assert p.returncode == -signal.SIGKILL, err[-2000:]
    run = tmp_path / "w-run"
    assert _names(run) == left and not out.exists()
    temp = {"kill-in-save": run.glob(".ckpt-train-0000006.tmp*"), "kill-in-out": tmp_path.glob(".w.safetensors.*.tmp")}
    assert hook not in temp or list(temp[hook])  # it died half-way through the write
    _all_whole(run)
    _resume_and_compare(data, tiny_dir, out, reference, capsys)


def test_sigkill_at_a_random_moment(data, tiny_dir, reference, tmp_path, capsys):
    out, run = tmp_path / "w.safetensors", tmp_path / "w-run"
    p = _spawn("-m", "sdknobs", *_argv(data, tiny_dir, out))
    deadline = time.time() + 300
    while not (run / "ckpt-train-0000004").exists() and p.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    p.kill()
    p.communicate(timeout=60)
    assert not out.exists(), "the run ended before it was killed"
    _all_whole(run)
    _resume_and_compare(data, tiny_dir, out, reference, capsys)


def test_sigint_saves_the_last_finished_step_and_exits_130(data, tiny_dir, reference, tmp_path, capsys):
    out, run = tmp_path / "w.safetensors", tmp_path / "w-run"
    p = _spawn(__file__, "sigint-in-step", "6", "--", *_argv(data, tiny_dir, out))  # Ctrl-C during step 7
    _, err = p.communicate(timeout=300)
    assert p.returncode == 130, err[-2000:]
    assert "interrupted after step 7: saved" in err and "ckpt-train-0000007" in err and "--resume" in err
    assert "Traceback" not in err
    assert _names(run) == ["ckpt-train-0000006", "ckpt-train-0000007"] and not out.exists()
    _all_whole(run)
    _resume_and_compare(data, tiny_dir, out, reference, capsys)
    # and a real Ctrl-C from outside, at whatever moment it lands
    shutil.rmtree(run)
    out.unlink()
    p = _spawn("-m", "sdknobs", *_argv(data, tiny_dir, out))
    while not (run / "ckpt-train-0000004").exists() and p.poll() is None:
        time.sleep(0.005)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130 and "--resume" in err and "Traceback" not in err, err[-2000:]
    _all_whole(run)
    _resume_and_compare(data, tiny_dir, out, reference, capsys)


def _break(ckpt: Path, how: str) -> None:
    if how == "truncated":
        w = ckpt / "weights.safetensors"
        w.write_bytes(w.read_bytes()[:100])
    elif how == "garbage":
        (ckpt / "state.pt").write_bytes(os.urandom(300))
    elif how == "missing":
        (ckpt / "state.pt").unlink()
    elif how == "malicious":  # a pickle that would run code when unpickled without weights_only
        class Evil:
            def __reduce__(self):
                return (os.system, (f"touch {ckpt.parent / 'PWNED'}",))

        torch.save({"step": 1, "x": Evil()}, ckpt / "state.pt")


@pytest.mark.parametrize("how", ["truncated", "garbage", "missing", "malicious"])
def test_resume_skips_a_broken_checkpoint(how, data, tiny_dir, reference, tmp_path, capsys):
    from sdknobs.cli import main

    out, run = tmp_path / "w.safetensors", tmp_path / "w-run"
    assert main(_argv(data, tiny_dir, out)) == 0
    out.unlink()
    _break(run / "ckpt-train-0000016", how)
    res = _resume_and_compare(data, tiny_dir, out, reference, capsys)
    assert "skipping ckpt-train-0000016" in res.err and "falling back to ckpt-train-0000014" in res.err
    assert not (run / "PWNED").exists()


def test_resume_errors(data, tiny_dir, tmp_path, capsys):
    from sdknobs.cli import main

    out, run = tmp_path / "w.safetensors", tmp_path / "w-run"
    assert main(_argv(data, tiny_dir, out, "--resume", steps=4)) == 2
    assert "--resume: no checkpoint in --run-dir" in capsys.readouterr().err and not run.exists()
    assert main(_argv(data, tiny_dir, out, steps=4)) == 0
    for c in run.glob("ckpt-*"):
        _break(c, "garbage")
    capsys.readouterr()
    assert main(_argv(data, tiny_dir, out, "--resume", steps=4)) == 2
    err = capsys.readouterr().err
    assert "--resume: no whole checkpoint" in err and "ckpt-train-0000004" in err and "ckpt-train-0000002" in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_a_checkpoint_of_the_other_method_is_refused(data, tiny_dir, tmp_path, capsys):
    from sdknobs.cli import main

    ti = ["train-ti", str(data), "--model", str(tiny_dir), "--token", "<crash-shape>", "--init-word", "shape", "--steps", "2",
          "--validate-every", "0", "--no-progress", "--run-dir", str(tmp_path / "run")]
    assert main(ti + ["--out", str(tmp_path / "ti" / "e.safetensors")]) == 0
    capsys.readouterr()
    lora = _argv(data, tiny_dir, tmp_path / "l.safetensors", "--run-dir", str(tmp_path / "run"), "--resume", steps=2)
    assert main(lora) == 2
    err = capsys.readouterr().err
    assert "textual-inversion (train-ti) checkpoint" in err and "LoRA (train-lora)" in err
    assert main(_argv(data, tiny_dir, tmp_path / "l.safetensors", "--run-dir", str(tmp_path / "lrun"), steps=2)) == 0
    capsys.readouterr()
    assert main(ti + ["--out", str(tmp_path / "ti2" / "e.safetensors"), "--run-dir", str(tmp_path / "lrun"),
                      "--resume"]) == 2
    err = capsys.readouterr().err
    assert "is a LoRA (train-lora) checkpoint" in err and "textual-inversion (train-ti)" in err


def test_nonfinite_loss_keeps_a_finite_checkpoint_that_trains_on(data, tiny_dir, tmp_path, capsys):
    from sdknobs.cli import main

    out, run = tmp_path / "w.safetensors", tmp_path / "w-run"
    argv = _argv(data, tiny_dir, out, "--checkpoint-every", "1", "--keep-checkpoints", "1", steps=12)
    assert main(argv + ["--learning-rate", "300"]) == 2
    err = capsys.readouterr().err
    assert "non-finite" in err and "training stopped" in err and "--resume" in err and "--learning-rate" in err
    kept = sorted(run.glob("ckpt-*"))
    assert len(kept) == 1 and kept[0].name in err and not out.exists()
    weights = load_file(str(kept[0] / "weights.safetensors"))
    assert all(torch.isfinite(v).all() for v in weights.values())
    assert main(argv + ["--learning-rate", "1e-3", "--resume"]) == 0
    res = capsys.readouterr()
    assert "peak learning rate(s) now 0.001" in res.out
    assert all(torch.isfinite(v).all() for v in load_file(str(out)).values())
    assert [p.name for p in run.glob("ckpt-*")] == ["ckpt-train-0000012"]


def _pretrain_argv(tmp_path, *extra):
    return ["pretrain", "--out", str(tmp_path / "model"), "--run-dir", str(tmp_path / "run"), "--image-size", "16",
            "--vae-channels", "8,16,16", "--unet-channels", "16,32", "--layers-per-block", "1", "--text-width", "16",
            "--heads", "2", "--vae-steps", "6", "--vae-batch", "4", "--vae-warmup", "1", "--unet-steps", "2",
            "--unet-batch", "4", "--warmup-steps", "1", "--latent-pool", "16", "--val-size", "4", "--checkpoint-every",
            "2", "--eval-every", "2", "--log-every", "1", "--sample-steps", "0", "--threads", "1", "--no-progress", *extra]


def test_pretrain_sigint_and_nonfinite_loss(tmp_path, capsys, monkeypatch):
    from sdknobs.cli import main
    from sdknobs.shapes.pretrain import _Run

    real = _Run.vae_step

    def step(self, s, *a):
        if s == 2:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C in the middle of stage-1 step 3
        return real(self, s, *a)

    monkeypatch.setattr(_Run, "vae_step", step)
    assert main(_pretrain_argv(tmp_path)) == 130
    err = capsys.readouterr().err
    assert "interrupted after step 3: saved" in err and "--resume" in err
    assert _names(tmp_path / "run") == ["ckpt-vae-0000002", "ckpt-vae-0000003"] and not (tmp_path / "model").exists()
    monkeypatch.setattr(_Run, "vae_step", real)
    # resumed with a learning rate that blows up: stopped, a finite checkpoint kept, then on at a sane rate
    assert main(_pretrain_argv(tmp_path, "--resume", "--vae-lr", "1e9", "--keep-checkpoints", "1")) == 2
    err = capsys.readouterr().err
    assert "stage 1: the" in err and "training stopped" in err, err
    assert "--vae-lr (now 1e+09)" in err and "--resume" in err
    assert main(_pretrain_argv(tmp_path, "--resume", "--keep-checkpoints", "1")) == 0
    assert (tmp_path / "model" / "model_index.json").is_file()
    assert main(_pretrain_argv(tmp_path)) == 2  # the same command again: a finished run
    err = capsys.readouterr().err
    assert "--resume" in err and "--overwrite" in err


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1], int(sys.argv[2]), sys.argv[sys.argv.index("--") + 1:]))
