"""Does the README's training commands work as written? Runs every `sdknobs train-lora` / `sdknobs train-ti`
line of README.md's ```sh blocks, unchanged, in a fresh work folder (with the data folders they name, made
as docs/lora.md and docs/textual_inversion.md make them), then scores what each trained file does with the
exact analyzers (`shapes/analyze.py`) on held-out prompts (the file's own `sdknobs dataset` lines run first):

    python -m sdknobs.training.readme [--work out/readme-check] [--n 60] [--readme README.md]

  style LoRA (data of one non-solid style):   style rate on prompts naming the style, base model alongside
  subject LoRA (--instance-token T --class-word W, data of one kind): that kind's rate on "T W" prompts
  textual inversion (--token T, data of one kind): that kind's rate on prompts saying T

Held-out prompts: `lora.results.prompt_scenes` with seeds 211/212/213 (the docs' tables that tuned the shapes
model's training defaults used seeds 11 and 12 and ti.results' own), so no prompt here took part in the tuning.
Training runs as a subprocess per command (`python -m sdknobs ...`, OMP_NUM_THREADS as given, one log each).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from sdknobs.errors import SdknobsError

EVAL_SEEDS = {"style": 212, "subject": 211, "ti": 213}
# data folders the file's commands read and its own `sdknobs dataset` lines do not make: as docs/lora.md's
# `sdknobs dataset` makes them (lora.results' data; the star set like ti.results')
DATA = {
    "data/outline": dict(n=100, seed=1, styles=("outline",)),
    "data/hearts": dict(n=16, seed=1, kinds=("heart",), p_two=0),
    "data/stars": dict(n=20, seed=1, kinds=("star",), p_two=0),
}


def readme_commands(readme: Path, commands=("train-lora", "train-ti")) -> list[list[str]]:
    """The `sdknobs COMMAND` lines of the file's ```sh blocks (COMMAND in `commands`), continuation lines joined,
    comments cut."""
    text = readme.read_text(encoding="utf-8")
    out = []
    for block in re.findall(r"```sh\n(.*?)```", text, re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            argv = shlex.split(line, comments=True)
            if len(argv) >= 2 and argv[0] == "sdknobs" and argv[1] in commands:
                out.append(argv)
    if not out and "train-lora" in commands:
        raise SdknobsError(f"{readme}: no sdknobs train-lora / train-ti command in its ```sh blocks")
    return out


def _flag(argv: list[str], name: str, default: str = "") -> str:
    return argv[argv.index(name) + 1] if name in argv else default


def concept(folder: Path) -> tuple[str, str]:
    """What a shapes-world data folder teaches: ("style", s) if every shape has style s != solid, else
    ("kind", k) if every shape is of kind k."""
    from sdknobs.shapes import world

    shapes = [s for r in world.read_truth(folder) for s in r["scene"].shapes]
    styles, kinds = {s.style for s in shapes}, {s.kind for s in shapes}
    if len(styles) == 1 and styles != {"solid"}:
        return "style", styles.pop()
    if len(kinds) == 1:
        return "kind", kinds.pop()
    raise SdknobsError(f"{folder}: neither one style nor one kind; cannot tell what it teaches")


def evaluate(model, argv: list[str], out_file: Path, data: Path, n: int) -> dict:
    """The concept's share of pictures with the trained file and on the base model, on n held-out prompts."""
    from sdknobs.lora.layers import applied
    from sdknobs.lora.results import captions, prompt_scenes, rate, score_all
    from sdknobs.shapes import world
    from sdknobs.shapes.bench import sample

    what, value = concept(data)
    d = model.sampling()
    kw = dict(steps=d["steps"], guidance=d["guidance"], progress=False)
    if argv[1] == "train-ti":
        from sdknobs.ti import load_embedding

        token, mode = _flag(argv, "--token"), "ti"
        scenes = prompt_scenes(n, EVAL_SEEDS[mode], (value,))
        with_token, plain = captions(scenes, words={value: token}), captions(scenes)
        base = score_all(sample(model, plain, **kw), scenes)
        load_embedding(model, str(out_file))
        got = score_all(sample(model, with_token, **kw), scenes)
        check, prompts = "kind", with_token
    elif what == "style":
        mode = "style"
        scenes = prompt_scenes(n, EVAL_SEEDS[mode], world.KINDS_NAMED, value)
        prompts = captions(scenes)
        base = score_all(sample(model, prompts, **kw), scenes)
        with applied(model, [str(out_file)]):
            got = score_all(sample(model, prompts, **kw), scenes)
        check = "style"
    else:
        mode = "subject"
        trigger = f"{_flag(argv, '--instance-token')} {_flag(argv, '--class-word')}".strip()
        scenes = prompt_scenes(n, EVAL_SEEDS[mode], (value,))
        prompts = captions(scenes, words={value: trigger})
        base = score_all(sample(model, prompts, **kw), scenes)
        with applied(model, [str(out_file)]):
            got = score_all(sample(model, prompts, **kw), scenes)
        check = "kind"
    return {"mode": mode, "concept": value, "measure": f"{value} {check} rate", "prompts": n,
            "eval_seed": EVAL_SEEDS[mode], "example_prompt": prompts[0],
            "trained": rate(got, lambda s: s[check]), "base": rate(base, lambda s: s[check]),
            "colour": rate(got, lambda s: s["colour"])}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--readme", default="README.md", help="the file whose ```sh blocks hold the commands")
    ap.add_argument("--work", default="out/readme-check", help="work folder (must not exist, or --fresh)")
    ap.add_argument("--fresh", action="store_true", help="delete --work first (only a folder this script made)")
    ap.add_argument("--n", type=int, default=60, help="held-out prompts per command")
    ap.add_argument("--threads", type=int, default=1, help="OMP/torch threads for training and sampling")
    ap.add_argument("--only", default="", help="run only commands whose text contains this")
    args = ap.parse_args(argv)
    import torch

    from sdknobs.model import load_model
    from sdknobs.shapes import world

    torch.set_num_threads(args.threads)
    readme, work = Path(args.readme).absolute(), Path(args.work)
    cmds = [c for c in readme_commands(readme) if args.only in shlex.join(c)]
    if work.exists():
        if not (args.fresh and (work / "readme-check.json").exists() or args.fresh and not any(work.iterdir())):
            raise SdknobsError(f"--work {str(work)!r} exists; give a new folder, or --fresh for one this script made")
        shutil.rmtree(work)
    work.mkdir(parents=True)
    results = {"readme": str(readme), "commands": []}
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    for argv_ in readme_commands(readme, ("dataset",)):  # the file's own data commands first (sdknobs dataset)
        print(f"$ {shlex.join(argv_)}", flush=True)
        p = subprocess.run([sys.executable, "-m", "sdknobs", *argv_[1:]], cwd=work, env=env, capture_output=True, text=True)
        if p.returncode != 0:
            raise SdknobsError(f"{shlex.join(argv_)} failed with exit code {p.returncode}: {p.stderr.strip()[-300:]}")
    for argv_ in cmds:
        data = _flag(argv_, "--data-dir") or argv_[2]
        if not (work / data).exists():
            if data not in DATA:
                raise SdknobsError(f"{readme}: {shlex.join(argv_)} reads {data!r}, which this script cannot make")
            spec = dict(DATA[data])
            world.write_dataset(work / data, spec.pop("n"), **spec)
        name = re.sub(r"[^\w.-]+", "_", Path(_flag(argv_, "--out", _flag(argv_, "--token", "ti"))).stem).strip("_")
        log = work / f"{argv_[1]}-{name}.log"
        print(f"$ {shlex.join(argv_)}   (log: {log})", flush=True)
        t = time.time()
        with open(log, "w") as f:
            p = subprocess.run([sys.executable, "-m", "sdknobs", *argv_[1:], "--no-progress"], cwd=work, env=env,
                               stdout=subprocess.PIPE, stderr=f, text=True)
        f_out = p.stdout.strip().splitlines()
        if p.returncode != 0 or not f_out:
            raise SdknobsError(f"{shlex.join(argv_)} failed with exit code {p.returncode}; see {log}")
        seconds = time.time() - t
        out_file = work / f_out[-1]
        model = load_model("shapes" if "--model" not in argv_ else _flag(argv_, "--model"), device="cpu", dtype="fp32")
        r = {"command": shlex.join(argv_), "train_seconds": round(seconds, 1), "file": str(out_file),
             **evaluate(model, argv_, out_file, work / data, args.n)}
        results["commands"].append(r)
        (work / "readme-check.json").write_text(json.dumps(results, indent=1))
        print(f"  {r['measure']}: {r['trained']:.0%} with the file, {r['base']:.0%} on the base model "
              f"({r['prompts']} held-out prompts, seed {r['eval_seed']}, e.g. {r['example_prompt']!r}); "
              f"trained in {seconds:.0f} s", flush=True)


if __name__ == "__main__":
    try:
        main()
    except SdknobsError as e:
        print(f"sdknobs.training.readme: {e}", file=sys.stderr)
        sys.exit(2)
