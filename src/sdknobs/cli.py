"""The command line: thin. It builds configs from flags, calls the library, writes files.

Exit codes: 0 done; 2 bad input (a SdknobsError, a flag argparse refuses, a file that cannot be
written, memory that does not fit), one line on stderr and nothing written; 1 a bug (one line naming
the command and the exception; `-v` shows the traceback); 130 interrupted (Ctrl-C)."""
from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from pathlib import Path

from sdknobs.errors import SdknobsError
from sdknobs.flags import Parser, add_config_args, config_from_args  # noqa: F401  (re-exported)

log = logging.getLogger("sdknobs")


def _grid_path(out: str) -> Path:
    return Path(out).with_name(f"{Path(out).stem}-grid.png")


def _outputs(out: str, n: int, overwrite: bool = False, grid: bool = False) -> list[Path]:
    """The PNG paths a command will write (and NAME-grid.png for a grid of n > 1), checked before any work
    (`atomic.check_out_path`)."""
    from sdknobs.atomic import check_out_path

    p = Path(out)
    if p.suffix.lower() != ".png":
        raise SdknobsError(f"--out {out!r} must end in .png")
    paths = [p] if n == 1 else [p.with_name(f"{p.stem}-{i}{p.suffix}") for i in range(n)]
    for q in paths + ([_grid_path(out)] if grid and n > 1 else []):
        check_out_path(q, "--out", overwrite)
    return paths


def _write(result, out: str, grid: bool = False) -> None:
    from sdknobs.images import save_png

    for path, image, params in zip(_outputs(out, len(result.images), overwrite=True), result.images, result.parameters):
        save_png(image, path, params)
        print(path)
    if grid and len(result.images) > 1:  # A1111's grid: the first image's parameters
        print(save_png(result.extra["grid"], _grid_path(out), result.parameters[0]))


def _model(cfg):
    from sdknobs.model import load_model

    m = load_model(cfg.model, device=cfg.device or None, dtype=cfg.dtype or None, config=cfg.model_config or None,
                   jit=getattr(cfg, "jit", False), prediction_type=getattr(cfg, "prediction_type", "") or None)
    if getattr(cfg, "embedding", None):
        from sdknobs.ti import load_embedding_arg

        for arg in cfg.embedding:
            load_embedding_arg(m, arg)
    if getattr(cfg, "lora", None):
        from sdknobs.lora.layers import apply_loras

        apply_loras(m, cfg.lora)  # W + sum_i w_i (alpha_i/r_i) B_i A_i, windows switched per step
    return m


def _batches(cfg, pipeline, *args, **kwargs):
    """--batch-count runs of a pipeline, written as NAME-j.png (+ NAME-grid.png), all checked before any work."""
    from sdknobs.pipelines import batches

    _outputs(cfg.out, cfg.batch * cfg.batch_count, cfg.overwrite, cfg.grid)
    kw = {**cfg.sample_kwargs(), **kwargs}
    r = batches(pipeline, _model(cfg), *args, batch_count=cfg.batch_count, **kw)
    _write(r, cfg.out, cfg.grid)
    return r


def cmd_generate(cfg):
    from sdknobs.pipelines import generate

    _batches(cfg, generate, cfg.prompt)


def cmd_img2img(cfg):
    from sdknobs.images import load_image
    from sdknobs.pipelines import img2img

    _outputs(cfg.out, cfg.batch * cfg.batch_count, cfg.overwrite, cfg.grid)
    image = load_image(cfg.image, "--image")
    r = _batches(cfg, img2img, image, cfg.prompt, strength=cfg.strength)
    log.info("start step %d of %d, t=%.0f, alpha_bar=%.4f", r.start.index, r.start.index + r.start.steps_run,
             r.start.timestep, r.start.alpha_bar)


def cmd_inpaint(cfg):
    from sdknobs.images import load_image
    from sdknobs.pipelines import inpaint

    _outputs(cfg.out, cfg.batch * cfg.batch_count, cfg.overwrite, cfg.grid)
    image, mask = load_image(cfg.image, "--image"), load_image(cfg.mask, "--mask", mode="L")
    _batches(cfg, inpaint, image, mask, cfg.prompt, strength=cfg.strength, mask_blur=cfg.mask_blur,
             only_masked=cfg.only_masked, padding=cfg.padding, resize_mask=cfg.resize_mask)


def cmd_outpaint(cfg):
    from sdknobs.images import load_image
    from sdknobs.pipelines import outpaint

    _outputs(cfg.out, cfg.batch * cfg.batch_count, cfg.overwrite, cfg.grid)
    _batches(cfg, outpaint, load_image(cfg.image, "--image"), cfg.prompt, left=cfg.left, right=cfg.right, top=cfg.top,
             bottom=cfg.bottom, overlap=cfg.overlap, fill=cfg.fill, strength=cfg.strength, seam_strength=cfg.seam_strength,
             mask_blur=cfg.mask_blur,
             width=None, height=None)


def cmd_sweep_strength(cfg):
    from sdknobs.images import a1111_parameters, load_image, save_png
    from sdknobs.pipelines import sweep_strength

    _outputs(cfg.out, 1, cfg.overwrite)
    kw = cfg.sample_kwargs()
    for k in ("seed", "batch", "steps"):
        kw.pop(k)
    model = _model(cfg)
    steps = model.sampling(steps=cfg.steps)["steps"]  # unset: the model's
    g, infos = sweep_strength(model, load_image(cfg.image, "--image"), cfg.prompt, strengths=cfg.strengths,
                              seeds=cfg.seeds, steps=steps, scale=cfg.scale, **kw)
    for s, info in zip(cfg.strengths, infos[0]):
        print(f"strength {s:.2f}: start step {info.index}/{steps}, runs {info.steps_run}, "
              f"t={info.timestep:.0f}, alpha_bar={info.alpha_bar:.4f}")
    save_png(g, cfg.out, a1111_parameters(cfg.prompt, cfg.negative_prompt, Steps=steps,
                                          Strengths=" ".join(map(str, cfg.strengths)),
                                          Seeds=" ".join(map(str, cfg.seeds))))
    print(cfg.out)


def cmd_grid(cfg):
    from sdknobs.grid import run_command

    run_command(cfg)


def cmd_png_info(args):
    from sdknobs.prompt import read_parameters

    print(read_parameters(args.file))


_UNSET = object()


def _from_png(args: argparse.Namespace, argv: list[str]) -> None:
    """--from-png FILE: the picture's settings (`prompt.png_settings`) for every flag not on the command line."""
    from sdknobs.prompt import png_settings

    found = png_settings(args.from_png)
    if found.get("lora_flags") and not args.lora:
        log.warning("%s was made with --lora %s, which --from-png does not re-apply: pass it again", args.from_png,
                    " --lora ".join(found["lora_flags"]))
    settings = {k: v for k, v in found.items() if hasattr(args, k)}
    probe = argparse.Namespace(**dict.fromkeys(settings, _UNSET))  # argparse fills in defaults only where unset
    args.parser.parse_known_args(argv[argv.index(args.command) + 1 :], namespace=probe)
    for k, v in settings.items():
        if getattr(probe, k) is _UNSET:
            setattr(args, k, v)


def cmd_info(args):
    from sdknobs.model import load_model

    m = load_model(args.model, device=args.device or None, dtype=args.dtype or None, config=args.model_config or None,
                   prediction_type=args.prediction_type or None)
    attn = [n for n, mod in m.unet.named_modules() if n.endswith((".attn1", ".attn2"))]
    cross = [n for n in attn if n.endswith(".attn2")]
    print(f"model:            {m.source}")
    print(f"family:           {m.family}")
    why = m.extra.get("prediction_type_source")
    print(f"prediction type:  {m.prediction_type}" + (f" ({why})" if why else ""))
    print(f"default size:     {m.default_size}x{m.default_size} px (latent {m.unet.config.sample_size}x"
          f"{m.unet.config.sample_size}x{m.unet.config.in_channels}, VAE factor {m.vae_scale_factor}, "
          f"scaling factor {m.latent_scale:.5f})")
    for name, tok, enc in zip(m.text_encoder_names, m.tokenizers, m.text_encoders):
        proj = getattr(enc.config, "projection_dim", None) if hasattr(enc, "text_projection") else None
        print(f"{name.replace('_', ' ') + ':':<17} width {enc.config.hidden_size}, {enc.config.num_hidden_layers} layers, "
              f"vocabulary {len(tok)}, window {tok.model_max_length}" + (f", pooled projection {proj}" if proj else ""))
    if m.spec.two_encoders:
        layer = "penultimate" if m.spec.hidden_layer == -2 else "last"
        print(f"text conditioning: {layer} hidden states concatenated ({' + '.join(map(str, m.text_widths))} = "
              f"{m.context_width}), pooled output of {m.text_encoder_names[m.spec.pooled_from]}, size/crop time ids")
    for name, mod in m.components().items():
        print(f"{name + ':':<17} {sum(p.numel() for p in mod.parameters()):,} parameters")
    print(f"attention layers: {len(attn)} ({len(attn) - len(cross)} self, {len(cross)} cross)")
    print(f"cross-attention projections (to_q/to_k/to_v/to_out.0): {4 * len(cross)}")
    print(f"device, dtype:    {m.device}, {str(m.dtype).replace('torch.', '')}")


SAMPLERS = {
    "generate": ("txt2img: draw from a prompt", "SampleConfig", cmd_generate),
    "img2img": ("start from an image noised to the strength's timestep", "Img2ImgConfig", cmd_img2img),
    "inpaint": ("repaint the white area of a mask", "InpaintConfig", cmd_inpaint),
    "outpaint": ("extend the canvas and inpaint the new border", "OutpaintConfig", cmd_outpaint),
    "sweep-strength": ("a grid of img2img strengths (across) and seeds (down)", "SweepConfig", cmd_sweep_strength),
}


def build_parser() -> argparse.ArgumentParser:
    from sdknobs import config

    p = Parser(prog="sdknobs", description="Customize Stable Diffusion: LoRA, img2img/inpainting, textual inversion.")
    p.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help, cls_name, fn) in SAMPLERS.items():
        cls = getattr(config, cls_name)
        sp = sub.add_parser(name, help=help, description=help)
        add_config_args(sp, cls)
        sp.set_defaults(func=fn, config=cls, parser=sp)
    from sdknobs.grid import GridConfig

    help = "A1111's X/Y/Z plot: a sheet of pictures, one setting across (--x), one down (--y), one sheet per --z value"
    sp = sub.add_parser("grid", help=help, description=help)
    add_config_args(sp, GridConfig)
    sp.set_defaults(func=cmd_grid, config=GridConfig, parser=sp)
    sp = sub.add_parser("png-info", help="print the parameters a PNG was made with (A1111's PNG Info); "
                                         "--from-png FILE re-renders them", description="print a PNG's parameters")
    sp.add_argument("file", metavar="FILE", help="a PNG written by sdknobs or AUTOMATIC1111")
    sp.set_defaults(func=cmd_png_info, config=None)
    sp = sub.add_parser("info", help="what a model is: family, prediction type, parameters, attention layers")
    sp.add_argument("--model", default="shapes", help="a diffusers folder, a single-file checkpoint, or an embedded name")
    sp.add_argument("--model-config", default="", help="for a single-file checkpoint of another architecture: a "
                                                          "diffusers folder with its configs")
    sp.add_argument("--prediction-type", default="", choices=["", "epsilon", "v_prediction"],
                    help="epsilon or v_prediction, over the model's or the single file's guess (default: theirs)")
    sp.add_argument("--device", default="", help="cpu, cuda, cuda:N (default: cuda if available, else cpu)")
    sp.add_argument("--dtype", default="", help="fp32, fp16 or bf16 (default: fp32 on CPU, fp16 on CUDA)")
    sp.set_defaults(func=cmd_info, config=None)
    from sdknobs.shapes import bench, pretrain

    sp = sub.add_parser("pretrain", help="train the shapes model from scratch (VAE, then text encoder + U-Net)",
                        description=pretrain.__doc__.splitlines()[0])
    pretrain.build_parser(sp)
    sp.set_defaults(func=cmd_pretrain, config=pretrain.PretrainConfig)
    bench.register_cli(sub)
    from sdknobs.shapes import datasets

    datasets.register_cli(sub)
    from sdknobs.ti import cli as ti_cli

    ti_cli.register_cli(sub)
    from sdknobs.lora import cli as lora_cli

    lora_cli.register_cli(sub)
    _verbose_everywhere(p)
    return p


def _verbose_everywhere(parser: argparse.ArgumentParser) -> None:
    """`-v` after the command too (`sdknobs generate ... -v`), not only before it."""
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            for sp in a.choices.values():
                if not any("-v" in x.option_strings for x in sp._actions):
                    sp.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="log more")
                _verbose_everywhere(sp)


def cmd_pretrain(cfg):
    from sdknobs.shapes.pretrain import pretrain

    print(pretrain(cfg))


def _quiet_libraries():
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _command(args: argparse.Namespace) -> str:
    words = [getattr(args, k, None) for k in ("command", "lora_command", "ti_command", "bench")]
    return " ".join(["sdknobs", *[w for w in words if w]])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        parser = build_parser()  # imports torch: Ctrl-C may come here already
    except KeyboardInterrupt:
        print("sdknobs: interrupted", file=sys.stderr)
        return 130
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="sdknobs: %(levelname)s: %(message)s")
    try:
        _quiet_libraries()
        if getattr(args, "from_png", ""):
            _from_png(args, argv)
        if hasattr(args, "from_png") and not args.prompt:
            args.parser.error("the following arguments are required: --prompt (or --from-png FILE)")
        cfg = config_from_args(args.config, args) if args.config is not None else args
        args.func(cfg)
        sys.stdout.flush()
    except SdknobsError as e:
        print("sdknobs: error: " + " ".join(str(e).split()), file=sys.stderr)  # one line
        return 2
    except KeyboardInterrupt as e:
        if not e.args:  # training says how to resume and passes an argument: no second line then
            print("sdknobs: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `sdknobs ... | head`: the reader left; end quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except OSError as e:  # a file that cannot be read or written: the user's to fix
        if args.verbose:
            traceback.print_exc()
        where = f"{e.filename}: " if e.filename else ""
        print(f"sdknobs: error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    except MemoryError:
        print(f"sdknobs: error: {_command(args)} ran out of memory; use a smaller --width/--height or --batch",
              file=sys.stderr)
        return 2
    except Exception as e:  # a bug: one line, the traceback only with -v
        if args.verbose:
            traceback.print_exc()
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        print(f"sdknobs: internal error in {_command(args)}: {type(e).__name__}: {msg} "
              f"(a bug; rerun with -v for the traceback)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
