"""The course notebooks (notebooks/*.ipynb) run top to bottom in a fresh Jupyter kernel, in their short
version (FAST = True injected after the cell tagged "parameters"); every exercise ends in asserts, so a
cell whose claim fails fails the test with the notebook's own traceback."""
import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("notebook_runner", ROOT / "notebooks" / "run.py")
runner = importlib.util.module_from_spec(spec)
spec.loader.exec_module(runner)


def test_sources_are_stripped_and_parametrised():
    """Outputs are stripped in git; each notebook has one parameters cell that defines FAST, FIGS, THREADS."""
    for name in runner.NOTEBOOKS:
        nb = json.loads((ROOT / "notebooks" / f"{name}.ipynb").read_text())
        code = [c for c in nb["cells"] if c["cell_type"] == "code"]
        assert all(not c["outputs"] and c["execution_count"] is None for c in code), f"{name}: outputs not stripped"
        params = [c for c in code if "parameters" in c.get("metadata", {}).get("tags", [])]
        assert len(params) == 1, f"{name}: needs exactly one cell tagged 'parameters'"
        src = "".join(params[0]["source"])
        assert all(f"{k} =" in src for k in ("FAST", "FIGS", "THREADS")), src
        assert sum("assert " in "".join(c["source"]) for c in code) >= 4, f"{name}: too few cells with asserts"


def test_injected_parameters_follow_the_parameters_cell():
    import nbformat

    nb = nbformat.read(ROOT / "notebooks" / "lora.ipynb", as_version=4)
    i = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    runner.inject(nb, {"FAST": True, "FIGS": ""})
    assert nb.cells[i + 1].metadata["tags"] == ["injected-parameters"]
    assert "FAST = True" in nb.cells[i + 1].source and "FIGS = ''" in nb.cells[i + 1].source


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    """All three notebooks run by `notebooks/run.py --fast --threads 1`, two at a time (the 2-core CI machine
    runs two one-thread kernels side by side); {name: (executed notebook or None, the runner's stderr or None)}."""
    import subprocess
    import sys

    import nbformat

    out = tmp_path_factory.mktemp("notebooks")
    results, queue, running = {}, list(runner.NOTEBOOKS), {}
    while queue or running:
        while queue and len(running) < 2:
            name = queue.pop(0)
            running[name] = subprocess.Popen([sys.executable, str(ROOT / "notebooks" / "run.py"), "--fast", "--threads", "1",
                                              "--out", str(out), name], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                             text=True)
        name = next(iter(running))
        proc = running.pop(name)
        so, se = proc.communicate()
        path = out / f"{name}-fast.ipynb"
        nb = nbformat.read(path, as_version=4) if path.exists() else None
        results[name] = (nb, None if proc.returncode == 0 and nb is not None else se[-8000:])
        print(so.strip())
    return results


@pytest.mark.timeout(1800)
@pytest.mark.parametrize("name", runner.NOTEBOOKS)
def test_notebook_runs_and_its_asserts_pass(name, executed):
    nb, error = executed[name]
    assert error is None, error
    images = sum("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))
    assert images >= 3, f"{name}: pictures should render inline, found {images}"
    run = nb.metadata["sdknobs_run"]  # on a busy machine the kernel's CPU time is the cost, not the wall time
    print(f"{name} (fast): {run['wall_s']:.1f} s wall, {run['kernel_cpu_s']:.1f} s kernel CPU")
