"""The LoRA commands: `train-lora DATA_DIR ...` and `lora targets|inspect|conflict|merge|trace-step`.
Thin: parse, call the library, print."""
from __future__ import annotations

from pathlib import Path

from sdknobs.errors import SdknobsError


def register_cli(sub) -> None:
    from sdknobs.flags import add_train_args
    from sdknobs.lora.train import LoraTrainConfig

    def train_parser(parent, name, help):
        sp = parent.add_parser(name, help=help, description=help)
        add_train_args(sp, LoraTrainConfig)
        return sp

    train_parser(sub, "train-lora", "train a LoRA (style, or subject with --instance-token/--class-word) on a folder of "
                               "captioned images").set_defaults(func=cmd_train_lora, config=None)

    lp = sub.add_parser("lora", help="LoRA tools: targets, inspect, conflict, merge, trace-step")
    lsub = lp.add_subparsers(dest="lora_command", required=True, metavar="TOOL")

    def model_args(p):
        p.add_argument("--model", default="shapes", help="a diffusers folder, a single-file checkpoint, or an embedded name")
        p.add_argument("--model-config", default="", help="for a single-file checkpoint: a diffusers folder with its configs")
        p.add_argument("--device", default="")
        p.add_argument("--dtype", default="")

    t = lsub.add_parser("targets", help="list the layers a preset or regex selects, their shapes and LoRA parameter counts")
    model_args(t)
    t.add_argument("--preset", nargs="+", action="extend", default=None, metavar="PRESET_OR_REGEX",
                   help="cross-attn (default), attn, attn-ff, conv, text-encoder, text-encoder-2 (SDXL's second), or a "
                        "regex ('te:REGEX' for the text encoder, 'te2:REGEX' for SDXL's second)")
    t.add_argument("--text-encoder", action="store_true", help="add the text-encoder preset (on SDXL: both encoders')")
    t.add_argument("--rank", type=int, default=4)
    t.set_defaults(func=cmd_targets, config=None)

    i = lsub.add_parser("inspect", help="targets, rank, alpha, parameters, file size and ||delta W|| per block of a LoRA file")
    i.add_argument("file", metavar="FILE")
    i.add_argument("--model", default="", help="also show ||delta W|| / ||W|| against this base model")
    i.set_defaults(func=cmd_inspect, config=None)

    c = lsub.add_parser("conflict", help="per-layer cosine of two LoRAs' delta W and a summary warning")
    c.add_argument("a", metavar="A")
    c.add_argument("b", metavar="B")
    c.add_argument("--top", type=int, default=10, help="layers listed (most opposed first; 0 = all)")
    c.set_defaults(func=cmd_conflict, config=None)

    m = lsub.add_parser("merge", help="fold LoRAs into the base model (OUT a folder), or combine several LoRAs into one "
                                      "file (OUT ending in .safetensors) by concatenation or SVD")
    m.add_argument("loras", nargs="+", metavar="FILE[:WEIGHT]")
    m.add_argument("--out", required=True, help="a model folder to write, or a .safetensors LoRA file")
    m.add_argument("--method", default="concat", help="combining into one file: concat (exact) or svd (to --rank)")
    m.add_argument("--rank", type=int, default=0, help="rank for --method svd")
    m.add_argument("--format", default="kohya", help="layout of a combined LoRA file: kohya or diffusers")
    m.add_argument("--overwrite", action="store_true", help="replace an existing --out file, or a model folder "
                                                            "written before (never a folder holding other files)")
    model_args(m)
    m.set_defaults(func=cmd_merge, config=None)

    train_parser(lsub, "trace-step", "one LoRA training step with the tensor shapes at every stage (writes nothing; "
                               "without DATA_DIR: 4 shapes-world pictures in a temporary folder)"
                 ).set_defaults(func=cmd_trace_step, config=None)


def _train_config(args):
    from sdknobs.flags import train_config_from_args
    from sdknobs.lora.train import LoraTrainConfig

    return train_config_from_args(LoraTrainConfig, args)


def cmd_train_lora(args) -> None:
    from sdknobs.lora.train import train_lora

    res, method = train_lora(_train_config(args))
    last = res.train_loss[-1][1] if res.train_loss else float("nan")
    val = f", validation loss {res.val_loss[0][1]:.5f} -> {res.val_loss[-1][1]:.5f}" if res.val_loss else ""
    print(f"{res.trainable_params:,} LoRA parameters on {len(method.targets)} layers; final train loss {last:.5f}{val}; "
          f"run folder {res.run_dir}")
    print(res.out)


def cmd_trace_step(args) -> None:
    import tempfile

    from sdknobs.lora.trace import trace
    from sdknobs.lora.train import load_base

    with tempfile.TemporaryDirectory() as tmp:
        if not (args.data or args.data_dir):
            from sdknobs.shapes import world

            args.data = str(world.write_dataset(Path(tmp) / "data", 4, seed=0))
        if not args.run_dir:
            args.run_dir = str(Path(tmp) / "run")
        cfg = _train_config(args)
        print("\n".join(trace(load_base(cfg), cfg)))


def _load(args):
    from sdknobs.model import load_model

    return load_model(args.model, device=args.device or None, dtype=args.dtype or None, config=args.model_config or None)


def cmd_targets(args) -> None:
    from sdknobs.lora.targets import describe, resolve_targets

    if args.rank < 1:
        raise SdknobsError(f"--rank must be >= 1, got {args.rank}")
    targets = resolve_targets(_load(args), args.preset or ["cross-attn"], args.text_encoder)
    print("\n".join(describe(targets, args.rank)))


def cmd_inspect(args) -> None:
    from sdknobs.lora.files import read_lora
    from sdknobs.lora.inspect import inspect_lines

    model = None
    if args.model:
        from sdknobs.model import load_model

        model = load_model(args.model, device="cpu", dtype="fp32")
    print("\n".join(inspect_lines(read_lora(args.file, model=model), model)))  # (an SDXL file on SD1: refused)


def cmd_conflict(args) -> None:
    from sdknobs.lora.files import read_lora
    from sdknobs.lora.inspect import conflict

    if args.top < 0:
        raise SdknobsError(f"--top must be >= 0 (0 = all layers), got {args.top}")
    lines = conflict(read_lora(args.a), read_lora(args.b)).lines()
    body, summary = lines[:-3], lines[-3:]
    if args.top and len(body) > args.top:
        body = body[: args.top] + [f"... {len(body) - args.top} more layers"]
    print("\n".join(body + summary))


def cmd_merge(args) -> None:
    from sdknobs.atomic import check_out_path
    from sdknobs.lora.files import read_lora, write_lora
    from sdknobs.lora.merge import combine
    from sdknobs.lora.spec import parse_spec

    specs = [parse_spec(s) for s in args.loras]
    if any(s.window for s in specs):
        raise SdknobsError("lora merge: a window (@...) cannot be merged into fixed weights; drop it")
    to_file = args.out.endswith(".safetensors")
    if to_file:
        if args.method not in ("concat", "svd"):
            raise SdknobsError(f"--method {args.method!r} is not known; choose concat or svd")
        if args.method == "svd" and args.rank < 1:
            raise SdknobsError(f"--method svd needs --rank >= 1, got {args.rank}")
        if args.format not in ("kohya", "diffusers"):
            raise SdknobsError(f"--format {args.format!r} is not known; choose kohya or diffusers")
    elif Path(args.out).suffix.lower() in (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".png"):
        raise SdknobsError(f"--out {args.out!r}: a combined LoRA file must end in .safetensors; a merged model is a "
                           f"folder (a name without a file suffix)")
    if args.rank < 0:
        raise SdknobsError(f"--rank must be >= 0, got {args.rank}")
    check_out_path(args.out, "--out", args.overwrite, folder=not to_file)
    loras = [(read_lora(s.path), s.weight) for s in specs]  # every file checked before any work
    if to_file:
        w, err = combine(loras, args.method, args.rank or None)
        write_lora(w, args.out, args.format)
        worst = max(err.values()) if err else 0.0
        print(f"{len(w.layers)} layers, {w.num_params():,} parameters, rank(s) {dict(w.ranks())}; "
              f"largest relative error of delta W {worst:.2e}")
        print(args.out)
        return
    from sdknobs.lora.merge import merge_check

    report = merge_check(_load(args), specs, args.out)
    print(report)
    print(args.out)
