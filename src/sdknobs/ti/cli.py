"""The TI commands: `train-ti DATA_DIR --token ...` and `ti verify|nearest|trace-step`.
Thin: parse, call the library, print."""
from __future__ import annotations


from sdknobs.errors import SdknobsError


def register_cli(sub) -> None:
    from sdknobs.flags import add_train_args
    from sdknobs.ti.train import TITrainConfig

    sp = sub.add_parser("train-ti", help="textual inversion: learn a new token's embedding rows (everything else frozen)",
                        description="Textual inversion: add TOKEN to the vocabulary and train only its new embedding rows.")
    add_train_args(sp, TITrainConfig)
    sp.set_defaults(func=cmd_train_ti, config=None)

    ti = sub.add_parser("ti", help="textual-inversion tools: verify, nearest, trace-step")
    tsub = ti.add_subparsers(dest="ti_command", required=True, metavar="TOOL")

    def common(p, with_file=True):
        if with_file:
            p.add_argument("file", metavar="FILE", help="embedding file (.safetensors diffusers/kohya, or A1111 .pt)")
            p.add_argument("--token", default="", help="use this token instead of the one the file names")
        p.add_argument("--model", default="shapes", help="a diffusers folder, a single-file checkpoint, or an embedded name")
        p.add_argument("--model-config", default="", help="for a single-file checkpoint: a diffusers folder with its configs")
        p.add_argument("--device", default="")
        p.add_argument("--dtype", default="")

    v = tsub.add_parser("verify", help="prompts without the token render bit-identically with and without the "
                                       "embedding loaded, and no weight changes")
    common(v)
    v.add_argument("--prompts", nargs="+", default=None, help="prompts without the token (default: a fixed set)")
    v.add_argument("--steps", type=int, default=10)
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--guidance", type=float, default=7.5)
    v.set_defaults(func=cmd_verify, config=None)

    n = tsub.add_parser("nearest", help="top-k vocabulary tokens by cosine similarity for each learned vector, "
                                        "or for any word (--word)")
    n.add_argument("file", metavar="FILE", nargs="?", default="",
                   help="embedding file (.safetensors diffusers/kohya, or A1111 .pt); not needed with --word")
    n.add_argument("--token", default="", help="use this token instead of the one the file names")
    common(n, with_file=False)
    n.add_argument("--word", default="", help="a word of the vocabulary (one token): its row's neighbours and norm, "
                                              "no embedding file needed")
    n.add_argument("--k", type=int, default=10, help="neighbours per vector")
    n.add_argument("--init-word", default="", help="compare with this word (default: the init word in the file's metadata)")
    n.set_defaults(func=cmd_nearest, config=None)

    t = tsub.add_parser("trace-step", help="one TI training step: tensor shapes and which embedding rows get a "
                                           "non-zero gradient before the restore")
    common(t, with_file=False)
    t.add_argument("--data-dir", default="", help="training images (default: 4 shapes-world star pictures in a temp folder)")
    t.add_argument("--token", default="<trace-shape>")
    t.add_argument("--init-word", default="shape")
    t.add_argument("--vectors", type=int, default=1)
    t.add_argument("--template", default="captions")
    t.add_argument("--caption-word", default="shape")
    t.add_argument("--batch-size", type=int, default=1)
    t.add_argument("--learning-rate", type=float, default=5e-3)
    t.add_argument("--seed", type=int, default=0)
    t.set_defaults(func=cmd_trace_step, config=None)


def _load(args):
    from sdknobs.model import load_model

    return load_model(args.model, device=args.device or None, dtype=args.dtype or None, config=args.model_config or None)


def cmd_train_ti(args) -> None:
    from sdknobs.ti.train import TITrainConfig, train_ti

    from sdknobs.flags import train_config_from_args

    cfg = train_config_from_args(TITrainConfig, args)
    res, method = train_ti(cfg)
    print(f"token {cfg.token!r} ({cfg.vectors} vector(s), rows {method.ids}); use it with --embedding {res.out}")
    print(res.out)


def cmd_verify(args) -> None:
    from sdknobs.ti.verify import verify

    if args.steps < 1:
        raise SdknobsError(f"--steps must be >= 1, got {args.steps}")
    rep = verify(_load(args), args.file, prompts=args.prompts, steps=args.steps, seed=args.seed,
                 guidance=args.guidance, token=args.token or None)
    print("\n".join(rep.lines()))
    if not rep.ok:
        raise SdknobsError(f"verify {args.file}: prompts without the token changed or weights changed (see above)")


def cmd_nearest(args) -> None:
    from sdknobs.ti.files import check_width, read_embedding

    if args.k < 1:
        raise SdknobsError(f"--k must be >= 1, got {args.k}")
    if bool(args.file) == bool(args.word):
        raise SdknobsError("ti nearest: give an embedding FILE or --word WORD (one of the two)")
    if args.word:
        from sdknobs.ti.nearest import word_lines

        print("\n".join(word_lines(_load(args), args.word, k=args.k)))  # (each text encoder's table on SDXL)
        return
    model = _load(args)
    emb = read_embedding(args.file, args.token or None)
    check_width(emb, model)
    init = args.init_word or str(emb.metadata.get("init_word", "") or "")
    from sdknobs.ti.nearest import embedding_lines

    print(f"{args.file}: token {emb.token!r}, {emb.n_vectors} vector(s) of width {' + '.join(map(str, emb.widths))}, "
          f"format {emb.format}")
    print("\n".join(embedding_lines(model, emb, k=args.k, init_word=init)))


def cmd_trace_step(args) -> None:
    import tempfile
    from pathlib import Path

    from sdknobs.ti.trace import format_trace, trace

    with tempfile.TemporaryDirectory() as tmp:
        data = args.data_dir
        if not data:
            from sdknobs.shapes import world

            data = str(world.write_dataset(Path(tmp) / "data", 4, seed=0, kinds=("star",), positions=("centre",)))
        print("\n".join(format_trace(trace(
            _load_fp32(args), data_dir=data, token=args.token, init_word=args.init_word, vectors=args.vectors,
            template=args.template, caption_word=args.caption_word, batch_size=args.batch_size,
            learning_rate=args.learning_rate, seed=args.seed, model_name=args.model, run_dir=str(Path(tmp) / "run")))))


def _load_fp32(args):
    from sdknobs.model import load_model

    return load_model(args.model, device=args.device or None, dtype="fp32", config=args.model_config or None)

