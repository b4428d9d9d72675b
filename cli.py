"""Command lines generated from config dataclasses (sa2va.py and convert.py; train.py and eval.py will too).

    @dataclass
    class Options:
        model: str = arg(help="checkpoint folder", positional=True)
        steps: int = arg(100, "optimizer steps")
        fast: bool = arg(False, "skip the slow part")   # a flag: --fast
    opts = parse(Options, argv, "What the program does.")

Each field becomes `--field-name` (or a positional argument) typed by its annotation: str, int,
float, bool (a flag; `--no-x` when the default is True) or `X | None`; `choices` restricts
the values. The parsed values come back as an instance of the dataclass.
"""
import argparse
import dataclasses
import types
from typing import Any, Union, get_args, get_origin

_MISSING = dataclasses.MISSING


def arg(default: Any = _MISSING, help: str = "", *, choices: tuple | None = None, positional: bool = False,
        metavar: str | None = None) -> Any:
    """A dataclass field with the text and options of its command-line argument."""
    meta = {"help": help, "choices": choices, "positional": positional, "metavar": metavar}
    return dataclasses.field(default=default, metadata=meta)


def _scalar(tp) -> type:
    """The argument type behind an annotation: `int`, `str | None` -> str, ..."""
    if get_origin(tp) in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) != 1:
            raise TypeError(f"unsupported command-line type {tp}; use one type or `X | None`")
        tp = args[0]
    if tp not in (str, int, float, bool):
        raise TypeError(f"unsupported command-line type {tp}; use str, int, float or bool")
    return tp


def parser(cls, description: str = "") -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=description)
    for f in dataclasses.fields(cls):
        tp, meta = _scalar(f.type), f.metadata
        kwargs = dict(help=meta.get("help", ""))
        if meta.get("positional"):
            ap.add_argument(f.name, type=tp, choices=meta.get("choices"), metavar=meta.get("metavar"), **kwargs)
            continue
        flag = "--" + f.name.replace("_", "-")
        if tp is bool:
            action = argparse.BooleanOptionalAction if f.default is True else "store_true"
            ap.add_argument(flag, action=action, default=bool(f.default), **kwargs)
            continue
        if f.default is not _MISSING and f.default is not None:
            kwargs["help"] += f" (default: {f.default})"
        ap.add_argument(flag, type=tp, choices=meta.get("choices"), metavar=meta.get("metavar"),
                        default=None if f.default is _MISSING else f.default, required=f.default is _MISSING, **kwargs)
    return ap


def parse(cls, argv: list[str] | None = None, description: str = ""):
    """Parse argv (default sys.argv[1:]) into an instance of the dataclass cls."""
    return cls(**vars(parser(cls, description).parse_args(argv)))
