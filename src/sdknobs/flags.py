"""Flags from config dataclasses, for every command: one flag per field (`add_config_args`), a
training config's DATA_DIR positional (`add_train_args`), and the parser class every command uses
(`Parser`: finite floats, one-line errors). The command modules (`cli`, `lora.cli`, `ti.cli`,
`shapes.pretrain`) import these from here, so none of them imports another's CLI."""
from __future__ import annotations

import argparse
import dataclasses
import math

from sdknobs.errors import SdknobsError


def finite_float(text: str) -> float:
    """argparse type for every float flag: a finite number (NaN and inf are refused)."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return v


class Parser(argparse.ArgumentParser):
    """argparse with our rules, for every command and subcommand: float flags must be finite, and a
    refused flag is one line on stderr with exit code 2 (no usage block)."""

    def add_argument(self, *args, **kwargs):
        if kwargs.get("type") is float:
            kwargs["type"] = finite_float
        return super().add_argument(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def add_config_args(parser: argparse.ArgumentParser, cls) -> None:
    """One flag per dataclass field: --field-name, typed from the default, help from metadata."""
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        meta = dict(f.metadata)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kw = {"help": meta.get("help", "") + f" (default: {meta.get('shown', default)})", "dest": f.name}
        if isinstance(default, bool):
            kw["action"] = argparse.BooleanOptionalAction
            kw["default"] = default
        elif isinstance(default, list) and meta.get("repeatable"):  # --flag A --flag B (or --flag A B) -> [A, B]
            kw.update(action="extend", nargs="+", type=meta.get("type", str), default=default)
        elif isinstance(default, list):  # nargs/metavar from metadata: e.g. --original-size W H
            kw.update(nargs=meta.get("nargs", "+"), type=meta.get("type", str), default=default)
            if "metavar" in meta:
                kw["metavar"] = meta["metavar"]
        else:  # None = unset: the model's or the picture's default, resolved by the pipeline
            kw.update(type=meta.get("type", type(default)) if default is None else type(default), default=default)
        if meta.get("required"):
            kw["required"] = True
            kw.pop("default", None)
        if f.name == "prompt" and "from_png" not in {x.name for x in dataclasses.fields(cls)}:
            kw["required"] = True  # else checked in main: --prompt or --from-png
        parser.add_argument(flag, **kw)


def config_from_args(cls, args: argparse.Namespace):
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


def add_train_args(sp: argparse.ArgumentParser, cls) -> None:
    """Flags of a training config, plus DATA_DIR as an optional positional alternative to --data-dir."""
    sp.add_argument("data", nargs="?", default="", metavar="DATA_DIR", help="folder of training images (or --data-dir)")
    add_config_args(sp, cls)
    from sdknobs.training.defaults import defaultable, help_text

    fields = defaultable(cls)
    for a in sp._actions:
        if a.dest == "data_dir":
            a.required = False
            a.default = ""
        elif a.dest in fields and getattr(cls, "METHOD", ""):  # unset = the model's value, resolved in training
            a.help = f"{fields[a.dest].metadata['help']} (default: {help_text(cls, a.dest, cls.METHOD)})"


def train_config_from_args(cls, args: argparse.Namespace):
    """The training config from parsed flags; DATA_DIR and --data-dir must not disagree."""
    if args.data and args.data_dir and args.data != args.data_dir:
        raise SdknobsError(f"two data folders given: DATA_DIR {args.data!r} and --data-dir {args.data_dir!r}")
    args.data_dir = args.data or args.data_dir
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})
