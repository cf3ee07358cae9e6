"""Execute the course notebooks top to bottom with nbclient, papermill-style.

The cell tagged "parameters" in each notebook holds the defaults (FAST = False: the full-length run);
a cell tagged "injected-parameters" with the overrides is inserted right after it, so the notebook
runs exactly as a person would run it with those values typed in.

    python notebooks/run.py                    # full length: executed copies in out/notebooks/,
                                               # figures and runtimes in docs/notebooks/
    python notebooks/run.py --fast lora        # the test suite's short version of one notebook

tests/test_notebooks.py calls `execute` with FAST = True.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
NOTEBOOKS = ("lora", "img2img_inpainting", "textual_inversion")


def inject(nb, params: dict):
    """Insert a cell assigning `params` after the cell tagged "parameters" (an error if there is none)."""
    import nbformat

    idx = next((i for i, c in enumerate(nb.cells) if "parameters" in c.get("metadata", {}).get("tags", [])), None)
    if idx is None:
        raise ValueError("the notebook has no cell tagged 'parameters'")
    src = "# injected by notebooks/run.py\n" + "\n".join(f"{k} = {v!r}" for k, v in params.items())
    cell = nbformat.v4.new_code_cell(src, metadata={"tags": ["injected-parameters"]})
    cell["id"] = "injected-parameters"
    nb.cells.insert(idx + 1, cell)
    return nb


def execute(name: str, params: dict | None = None, out: Path | None = None, timeout: int = 1800,
            threads: int | None = None):
    """Run notebooks/<name>.ipynb in a fresh kernel (working folder: notebooks/); returns (notebook, seconds).
    `out`: write the executed notebook there. `threads`: OMP/MKL threads of the kernel process.
    nb.metadata["sdknobs_run"] gets the wall time and the kernel's CPU time (user + system, read once the
    kernel process has exited): on a busy machine the CPU time is what the run costs, the wall time is not."""
    import resource

    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(HERE / f"{name}.ipynb", as_version=4)
    inject(nb, dict(params or {}))
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    if threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(HERE)}})
    t = time.time()
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    try:
        client.execute(env=env)
    finally:
        seconds = time.time() - t
        r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
        nb.metadata["sdknobs_run"] = {"wall_s": round(seconds, 1), "kernel_cpu_s": round(cpu, 1), "params": params or {}}
        if out is not None:
            Path(out).parent.mkdir(parents=True, exist_ok=True)
            nbformat.write(nb, out)
    return nb, seconds


def cell_times(nb) -> list[tuple[str, float]]:
    """(first line, seconds) of every executed code cell, from nbclient's timing metadata."""
    from datetime import datetime

    rows = []
    for c in nb.cells:
        ex = c.get("metadata", {}).get("execution", {})
        a, b = ex.get("iopub.execute_input"), ex.get("shell.execute_reply")
        if c.cell_type == "code" and a and b:
            d = datetime.fromisoformat(b.replace("Z", "+00:00")) - datetime.fromisoformat(a.replace("Z", "+00:00"))
            rows.append((c.source.splitlines()[0] if c.source else "", d.total_seconds()))
    return rows


def exercise_times(nb) -> dict[str, float]:
    """Seconds per exercise: the executed code cells grouped under the markdown cell that opens each
    exercise ("## 1a. ..."); cells before the first exercise count as "setup"."""
    import re
    from datetime import datetime

    out, current = {"setup": 0.0}, "setup"
    for c in nb.cells:
        if c.cell_type == "markdown":
            m = re.search(r"^## (\d[a-d])\. ", c.source, re.M)
            if m:
                current = m[1]
                out.setdefault(current, 0.0)
            continue
        ex = c.get("metadata", {}).get("execution", {})
        a, b = ex.get("iopub.execute_input"), ex.get("shell.execute_reply")
        if a and b:
            d = datetime.fromisoformat(b.replace("Z", "+00:00")) - datetime.fromisoformat(a.replace("Z", "+00:00"))
            out[current] += d.total_seconds()
    return {k: round(v, 1) for k, v in out.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="*", default=list(NOTEBOOKS), help=f"notebooks to run (default: {' '.join(NOTEBOOKS)})")
    ap.add_argument("--fast", action="store_true", help="the test suite's short version (FAST = True)")
    ap.add_argument("--out", default="out/notebooks", help="folder for the executed copies")
    ap.add_argument("--figs", default="docs/notebooks", help="folder for the figures the docs cite (full runs only)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads in the kernels (0 = torch's default)")
    ap.add_argument("--report", action="store_true", help="run nothing: print the seconds per exercise of the "
                                                          "executed copies in --out")
    args = ap.parse_args(argv)
    if args.report:
        import nbformat

        for path in sorted(Path(args.out).glob("*.ipynb")):
            nb = nbformat.read(path, as_version=4)
            run = nb.metadata.get("sdknobs_run", {})
            print(f"{path.name}: {run.get('wall_s', '?')} s wall, {run.get('kernel_cpu_s', '?')} s kernel CPU; "
                  + ", ".join(f"{k} {v:.1f} s" for k, v in exercise_times(nb).items()))
        return 0
    bad = [n for n in args.names if n not in NOTEBOOKS]
    if bad:
        print(f"unknown notebook(s) {', '.join(bad)}; choose from {', '.join(NOTEBOOKS)}", file=sys.stderr)
        return 2
    out = Path(args.out).resolve()
    figs = None if args.fast else Path(args.figs).resolve()
    times = {}
    for name in args.names:
        params = {"FAST": args.fast, "THREADS": args.threads}
        if figs is not None:
            params["FIGS"] = str(figs)
        suffix = "-fast" if args.fast else ""
        nb, seconds = execute(name, params, out / f"{name}{suffix}.ipynb", threads=args.threads or None)
        times[name] = {**nb.metadata["sdknobs_run"], "exercises_s": exercise_times(nb)}
        print(f"{name}: {seconds:.1f} s wall, {times[name]['kernel_cpu_s']:.1f} s kernel CPU, load average "
              f"{os.getloadavg()[0]:.1f} -> {out / f'{name}{suffix}.ipynb'}")
        for line, s in cell_times(nb):
            if s >= 1:
                print(f"    {s:6.1f} s  {line[:70]}")
    if figs is not None:
        figs.mkdir(parents=True, exist_ok=True)
        path = figs / "runtimes.json"
        old = json.loads(path.read_text()) if path.exists() else {}
        old.update({k: {**{x: v[x] for x in ("wall_s", "kernel_cpu_s", "exercises_s")}, "date": time.strftime("%Y-%m-%d"),
                        "threads": args.threads or "default", "load_average": round(os.getloadavg()[0], 1)}
                    for k, v in times.items()})
        path.write_text(json.dumps(old, indent=1, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
