"""Documented = reproduced: every ```sh / ```bash / ```python block of README.md and docs/*.md runs.

Each page runs on its own, top to bottom, in a fresh temporary folder, as a user in a fresh checkout would
(the checkout's `benchmarks/` and `notebooks/` are linked in, read-only use): `sdknobs ...` (and
`python -m sdknobs ...`) is run in-process through `sdknobs.cli.main(argv)` with the same arguments (one
torch import for the whole page instead of one per command), `python` / `.venv/bin/python` and
`accelerate` as processes of this venv, python blocks are executed in this process in the same folder.
Every command must exit 0; a failure names the page, the line and the command.

What the test changes, and only this:
- OVERRIDES appends size/steps flags to long commands (argparse keeps the last value), keyed on the
  command's subcommand (`train-lora`, `lora merge`, `dataset class`, a script's path); nothing else of a
  command is changed;
- FIXTURES puts a tiny random SD1.5 folder (`sdknobs/tiny.py`) at the docs' path for "your own SD1.5
  folder" before the page runs;
- SKIP lists, by exact text, the commands that cannot run here, each with its reason; a listed command
  that no longer appears in the docs fails `test_no_stale_skips`.
Synopsis lines (`[--flag X]`, `a|b|c`, `...`, FILE-style placeholders) are not commands: they belong in a
```text block, and `test_command_blocks_hold_commands` says where one is.
"""
from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RUN = {"sh": "sh", "bash": "sh", "shell": "sh", "console": "sh", "python": "python", "py": "python"}
LINKED = ("benchmarks", "notebooks")  # the checkout's folders that doc commands run scripts from

# Appended to long commands (last value wins): sizes and steps only.
SAMPLE = ["--steps", "2"]
OVERRIDES: dict[str, list[str]] = {
    "generate": SAMPLE, "img2img": SAMPLE, "inpaint": SAMPLE, "outpaint": SAMPLE, "sweep-strength": SAMPLE,
    "grid": SAMPLE,
    "train-lora": ["--steps", "2"],
    "train-ti": ["--steps", "2"],
    "dataset": ["--count", "4"],
    "dataset class": ["--count", "2", "--steps", "2"],
    "pretrain": ["--vae-steps", "2", "--vae-batch", "4", "--vae-warmup", "1", "--unet-steps", "2", "--unet-batch", "4",
                 "--warmup-steps", "1", "--latent-pool", "24", "--val-size", "8", "--sample-steps", "2", "--samples", "2",
                 "--threads", "1"],  # not a size: the test's one torch thread (conftest), as every other command here
    "bench quality": ["--steps", "2", "--n-single", "3", "--n-two", "2", "--n-baseline", "2"],
    "bench analyzers": ["--n", "4"],
    "bench outpaint": ["--steps", "2", "--prompts", "2", "--seeds", "0"],
    "-m sdknobs.demo": ["--steps", "2"],
    "benchmarks/bench_lora_train.py": ["--steps", "2", "--warmup", "0", "--repeats", "1", "--batch-sizes", "1"],
    "benchmarks/bench_inference.py": ["--steps", "2", "--repeats", "1"],
}

# Commands that cannot run here, by their exact text (comments stripped, whitespace collapsed).
SKIP: dict[str, str] = {
    "make demo": "the set-up itself (creates .venv, pip-installs), then `python -m sdknobs.demo`, not run here",
    "make test": "the set-up itself, then the whole test suite this test is part of",
    "make notebooks": "the notebooks at full length (~10 min); tests/test_notebooks.py runs their short versions",
    ".venv/bin/python notebooks/run.py --fast lora": "tests/test_notebooks.py runs exactly this (112 s for three)",
    ".venv/bin/python notebooks/run.py --report": "reads the executed copies `make notebooks` leaves in out/notebooks/",
    "python benchmarks/bench_lora_train.py --device cuda --sd15-random --resolution 512 --batch-sizes 1,8 --dtype bf16 "
    "--steps 20": "needs a CUDA GPU",
}


def _sd15(path: Path) -> None:
    from sdknobs.tiny import write_tiny_model

    write_tiny_model(path, seed=0)


# "Your own model" paths the docs name -> what the test puts there before the page runs.
FIXTURES = {"path/to/sd15": _sd15}


@dataclass
class Command:
    page: str
    line: int
    lang: str  # sh or python
    text: str  # one logical command (continuations joined), or a whole python block

    def where(self) -> str:
        return f"{self.page}:{self.line}"


def _strip_comment(line: str) -> str:
    """The line without a trailing shell comment (a # that starts a word outside quotes)."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def commands(page: Path) -> list[Command]:
    """Every runnable command of a page, in order."""
    name = str(page.relative_to(ROOT)) if page.is_relative_to(ROOT) else str(page)
    out, lines = [], page.read_text().splitlines()
    i = 0
    while i < len(lines):
        m = re.match(r"^\s*```\s*([\w+-]*)", lines[i])
        if not m:
            i += 1
            continue
        lang, start = RUN.get(m.group(1).lower()), i + 1
        j = start
        while j < len(lines) and not re.match(r"^\s*```\s*$", lines[j]):
            j += 1
        body = lines[start:j]
        if lang == "python":
            out.append(Command(name, start + 1, "python", "\n".join(body)))
        elif lang == "sh":
            k = 0
            while k < len(body):
                first, text = k, ""
                while True:
                    part = _strip_comment(body[k])
                    k += 1
                    if part.endswith("\\"):
                        text += part[:-1] + " "
                        if k < len(body):
                            continue
                    text += part
                    break
                text = " ".join(text.split())
                if text:
                    out.append(Command(name, start + first + 1, "sh", text))
        i = j + 1
    return out


ALL = {str(p.relative_to(ROOT)): commands(p) for p in PAGES}


def _unquoted(text: str) -> str:
    return re.sub(r"\"(\\.|[^\"\\])*\"|'[^']*'", "Q", text)


def synopsis(text: str) -> str:
    """Why a sh line is a synopsis rather than a command ('' if it is a command)."""
    bare = _unquoted(text)
    if re.search(r"\[-", bare) or re.search(r"\[[A-Za-z]", bare):
        return "an optional [--flag X] part"
    if "|" in bare:
        return "a|b alternatives (or a pipe)"
    if re.search(r"(^|\s)\.\.\.(\s|$)", bare):
        return "'...' for more arguments"
    caps = [w for w in bare.split() if re.fullmatch(r"[A-Z][A-Z0-9_]{2,}", w)]
    if caps:
        return f"the placeholder {caps[0]}"
    return ""


def test_command_blocks_hold_commands():
    bad = [f"{c.where()}: `{c.text}` has {why}; write a real command, or put it in a ```text block"
           for cs in ALL.values() for c in cs if c.lang == "sh" and (why := synopsis(c.text))]
    assert not bad, "\n".join(bad)


def test_the_reader_on_a_sample_page(tmp_path):
    """Continuations joined, comments dropped, languages told apart, line numbers kept; synopses and keys found."""
    page = tmp_path / "p.md"
    page.write_text('text\n```sh\n# a comment\nsdknobs train-lora data/x --out "a #b.safetensors" \\\n    --steps 400   # long\n'
                    '\nsdknobs lora inspect|conflict FILE\n```\n```text\nsdknobs nothing [--x]\n```\n'
                    '```python\nprint(1)\n```\n')
    cs = commands(page)
    assert [(c.line, c.lang, c.text) for c in cs] == [
        (4, "sh", 'sdknobs train-lora data/x --out "a #b.safetensors" --steps 400'),
        (7, "sh", "sdknobs lora inspect|conflict FILE"), (13, "python", "print(1)")]
    assert synopsis(cs[0].text) == "" and "a|b" in synopsis(cs[1].text)
    assert "FILE" in synopsis("sdknobs ti verify FILE") and "[--flag" in synopsis('sdknobs x --p "a [b]" [--y 1]')
    assert synopsis('sdknobs generate --prompt "a|b [c] ..." --out o.png') == ""
    argv = shlex.split(cs[0].text)[1:]
    assert overrides(_key_argv(argv)) == ["--steps", "2"] and overrides(["dataset", "class"])[:2] == ["--count", "2"]
    assert overrides(["lora", "inspect"]) == []


def test_no_stale_skips():
    texts = {c.text for cs in ALL.values() for c in cs}
    stale = [t for t in SKIP if t not in texts]
    assert not stale, f"SKIP lists commands the docs no longer have (remove them): {stale}"


def _key_argv(argv: list[str]) -> list[str]:
    """The words that name a command: `train-lora`, `lora merge`, `dataset class` (flags and values skipped)."""
    words = []
    for w in argv:
        if w.startswith("-"):
            break
        words.append(w)
    return words[:2]


def overrides(key: list[str]) -> list[str]:
    for n in (2, 1):
        if len(key) >= n and " ".join(key[:n]) in OVERRIDES:
            return OVERRIDES[" ".join(key[:n])]
    return []


def _in_process(argv: list[str], cwd: Path, module: str = "") -> tuple[int, str]:
    """`sdknobs ARGV` (or `python -m MODULE ARGV`, run as __main__ with sys.argv set) in this process, in `cwd`."""
    import runpy

    import torch

    from sdknobs.cli import main

    buf = io.StringIO()
    old, threads = os.getcwd(), torch.get_num_threads()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            try:
                if module:
                    saved, sys.argv = sys.argv, [module, *argv]
                    try:
                        runpy.run_module(module, run_name="__main__", alter_sys=True)
                    finally:
                        sys.argv = saved
                    rc = 0
                else:
                    rc = main(argv)
            except SystemExit as e:  # argparse refusals, a module's sys.exit(main())
                rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        os.chdir(old)
        torch.set_num_threads(threads)  # a command that sets its own (pretrain --threads) leaves the next alone
    return rc, buf.getvalue()


def _process(argv: list[str], cwd: Path, env: dict) -> tuple[int, str]:
    p = subprocess.run(argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    return p.returncode, p.stdout


def run_sh(cmd: Command, cwd: Path, env: dict) -> tuple[int, str, str]:
    """(exit code, output, the argv actually run) of one sh command."""
    words = shlex.split(cmd.text)
    extra_env = {}
    while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", words[0]):
        k, v = words.pop(0).split("=", 1)
        extra_env[k] = v
    bindir = Path(sys.executable).parent
    prog, rest = words[0], words[1:]
    if prog in ("python", "python3", ".venv/bin/python") and rest[:2] == ["-m", "sdknobs"]:
        prog, rest = "sdknobs", rest[2:]
    if prog == "sdknobs" and not extra_env:
        argv = rest + overrides(_key_argv([w for w in rest if w not in ("-v", "--verbose")]))
        return (*_in_process(argv, cwd), shlex.join(["sdknobs", *argv]))
    if prog in ("python", "python3", ".venv/bin/python") and rest[:1] == ["-m"] and not extra_env:
        argv = rest[2:] + overrides([f"-m {rest[1]}"])
        return (*_in_process(argv, cwd, module=rest[1]), shlex.join(["python", "-m", rest[1], *argv]))
    if prog in ("python", "python3", ".venv/bin/python"):
        script = next((w for w in rest if not w.startswith("-")), "") if rest[:1] != ["-c"] else ""
        key = [f"-m {rest[1]}"] if rest[:1] == ["-m"] else [script]
        argv = [sys.executable, *rest, *overrides(key)]
    elif prog == "accelerate":  # accelerate launch [its flags] -m sdknobs COMMAND ...
        i = rest.index("sdknobs") + 1 if "sdknobs" in rest else len(rest)
        argv = [str(bindir / "accelerate"), *rest, *overrides(_key_argv(rest[i:]))]
    elif prog == "sdknobs":
        argv = [str(bindir / "sdknobs"), *rest, *overrides(_key_argv(rest))]
    else:
        return 127, f"the docs test does not know how to run {prog!r}: run it through sdknobs/python, or list the " \
                    f"command in SKIP with the reason", cmd.text
    return (*_process(argv, cwd, {**env, **extra_env}), shlex.join(argv))


def _cpu() -> float:
    """CPU seconds of this process and its finished children (the load of other jobs on the machine left out)."""
    import resource

    ch = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + ch.ru_utime + ch.ru_stime


def run_python(cmd: Command, cwd: Path) -> tuple[int, str]:
    import traceback

    buf = io.StringIO()
    old = os.getcwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            try:
                exec(compile(cmd.text, f"{cmd.where()} (python block)", "exec"), {"__name__": "__main__"})
                rc = 0
            except BaseException:  # noqa: BLE001 - reported with the page and line
                traceback.print_exc(file=buf)
                rc = 1
    finally:
        os.chdir(old)
    return rc, buf.getvalue()


def run_page(page: str, tmp: Path) -> dict:
    """Run one page's commands in order in a fresh folder under `tmp`; stop at the first that fails."""
    work = tmp / "checkout"
    work.mkdir(parents=True)
    for name in LINKED:
        (work / name).symlink_to(ROOT / name, target_is_directory=True)
    os.environ["XDG_DATA_HOME"] = str(tmp / "xdg")  # --lora-dir / --embedding-dir defaults: not the user's
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    cmds = ALL[page]
    text = "\n".join(c.text for c in cmds)
    for rel, make in FIXTURES.items():
        if rel in text:
            make(work / rel)
    timings, failure = [], ""
    for cmd in cmds:
        if cmd.lang == "sh" and (cmd.text in SKIP or synopsis(cmd.text)):
            continue  # synopsis lines: test_command_blocks_hold_commands reports them
        t, cpu = time.perf_counter(), _cpu()
        if cmd.lang == "python":
            rc, out, ran = (*run_python(cmd, work), "python block")
        else:
            rc, out, ran = run_sh(cmd, work, env)
        timings.append((time.perf_counter() - t, _cpu() - cpu, cmd.where()))
        if rc != 0:
            tail = "\n".join(out.strip().splitlines()[-15:])
            failure = f"{cmd.where()}: `{cmd.text}` exited {rc} (ran as: {ran})\n{tail}"
            break
    summary = (f"{page}: {len(timings)} commands, {sum(t[0] for t in timings):.1f} s wall, "
               f"{sum(t[1] for t in timings):.1f} s CPU; slowest (wall/CPU): "
               + ", ".join(f"{w} {s:.1f}/{c:.1f}s" for s, c, w in sorted(timings, reverse=True)[:8]))
    return {"failure": failure, "summary": summary}


RUNNABLE = sorted((p for p, cs in ALL.items() if cs), key=lambda p: -len(ALL[p]))  # the longest first


@pytest.fixture(scope="module")
def page_runs(tmp_path_factory):
    """Every page in its own process, two at a time (the machine's 2 cores; each process uses one torch thread):
    page -> a future of run_page's result."""
    import json
    from concurrent.futures import ThreadPoolExecutor

    root = tmp_path_factory.mktemp("docs")

    def one(i: int, page: str) -> dict:
        tmp, res = root / f"page{i}", root / f"page{i}.json"
        p = subprocess.run([sys.executable, __file__, page, str(tmp), str(res)], stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, timeout=1200, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        if not res.exists():
            return {"failure": f"{page}: the page's runner died (exit {p.returncode}):\n{p.stdout[-3000:]}", "summary": ""}
        return json.loads(res.read_text())

    pool = ThreadPoolExecutor(max_workers=max(1, min(2, os.cpu_count() or 1)))
    futures = {page: pool.submit(one, i, page) for i, page in enumerate(RUNNABLE)}
    yield futures
    pool.shutdown(wait=True, cancel_futures=True)


@pytest.mark.timeout(1200)
@pytest.mark.parametrize("page", RUNNABLE)
def test_page_runs_top_to_bottom(page, page_runs):
    r = page_runs[page].result()
    print(r["summary"])
    assert not r["failure"], r["failure"]


if __name__ == "__main__":  # the runner of one page: python tests/test_docs.py PAGE TMP RESULT.json
    import json

    import torch

    torch.set_num_threads(1)  # as conftest.py: tiny models, a shared 2-core machine
    page_, tmp_, result_ = sys.argv[1:4]
    Path(result_).write_text(json.dumps(run_page(page_, Path(tmp_))))
