"""Command-line plumbing shared by sa2va.py and convert.py (train.py and eval.py will use it too):
argparse generated from a config dataclass, one-line errors, and result folders written whole.

    @dataclass
    class Options:
        model: str = arg(help="checkpoint folder", positional=True)
        steps: int = arg(100, "optimizer steps")
        fast: bool = arg(False, "skip the slow part")   # a flag: --fast
    opts = parse(Options, argv, "What the program does.")
    run("prog.py", lambda: work(opts))                  # user errors -> one line, exit code 2

Each field becomes `--field-name` (or a positional argument) typed by its annotation: str, int,
float, bool (a flag; `--no-x` when the default is True), `X | None`, or `tuple[X, ...]` (a
repeatable option: `--prompt a --prompt b` -> ("a", "b"); default ()); `choices` restricts the
values. The parsed values come back as an instance of the dataclass.
"""
import argparse
import contextlib
import dataclasses
import os
import shutil
import signal
import sys
import tempfile
import types
from collections.abc import Callable, Iterator
from typing import Any, Union, get_args, get_origin

_MISSING = dataclasses.MISSING


def arg(default: Any = _MISSING, help: str = "", *, choices: tuple | None = None, positional: bool = False,
        metavar: str | None = None) -> Any:
    """A dataclass field with the text and options of its command-line argument."""
    meta = {"help": help, "choices": choices, "positional": positional, "metavar": metavar}
    return dataclasses.field(default=default, metadata=meta)


def _repeated(tp) -> bool:
    return get_origin(tp) is tuple


def _scalar(tp) -> type:
    """The argument type behind an annotation: `int`, `str | None` -> str, `tuple[str, ...]` -> str, ..."""
    if _repeated(tp):
        args = get_args(tp)
        if len(args) != 2 or args[1] is not Ellipsis:
            raise TypeError(f"unsupported command-line type {tp}; a repeatable option is `tuple[X, ...]`")
        tp = args[0]
    if get_origin(tp) in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) != 1:
            raise TypeError(f"unsupported command-line type {tp}; use one type or `X | None`")
        tp = args[0]
    if tp not in (str, int, float, bool):
        raise TypeError(f"unsupported command-line type {tp}; use str, int, float or bool")
    return tp


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit code 2 (argparse would print the usage first)
        self.exit(2, f"{self.prog}: {message}; see --help\n")


def parser(cls, description: str = "", prog: str | None = None) -> argparse.ArgumentParser:
    ap = _Parser(prog=prog, description=description)
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
        if _repeated(f.type):  # each use appends; the dataclass gets a tuple
            ap.add_argument(flag, type=tp, choices=meta.get("choices"), metavar=meta.get("metavar"), action="append",
                            default=None, **kwargs)
            continue
        if f.default is not _MISSING and f.default is not None:
            kwargs["help"] += f" (default: {f.default})"
        ap.add_argument(flag, type=tp, choices=meta.get("choices"), metavar=meta.get("metavar"),
                        default=None if f.default is _MISSING else f.default, required=f.default is _MISSING, **kwargs)
    return ap


def parse(cls, argv: list[str] | None = None, description: str = "", prog: str | None = None):
    """Parse argv (default sys.argv[1:]) into an instance of the dataclass cls."""
    ap = parser(cls, description, prog)
    values = vars(ap.parse_args(argv))
    for f in dataclasses.fields(cls):
        if _repeated(f.type):
            values[f.name] = tuple(values[f.name] or f.default)
    opts = cls(**values)
    for name, value in vars(opts).items():
        for v in value if isinstance(value, tuple) else (value,):
            if not isinstance(v, str):
                continue
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:  # bytes the shell passed that are not UTF-8 (kept as surrogates)
                ap.error(f"{name.replace('_', '-')} is not valid UTF-8 text; pass it in a UTF-8 locale")
    return opts


# ----------------------------------------------------------------------------- running a command

def _one_line(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        where = f"{e.filename}: " if e.filename else ""
        return f"{where}{e.strerror}"
    return " ".join(str(e).split())


def _terminate(signum, frame):
    # SIGTERM unwinds like SIGINT, so every `finally`/`except BaseException` cleanup runs.
    raise SystemExit(128 + signum)


def run(prog: str, body: Callable[[], Any]) -> Any:
    """Run a command's body. A user error (ValueError: bad input, as our code raises it; OSError:
    a path that cannot be read or written) becomes one line on stderr and exit code 2; SIGINT and
    SIGTERM unwind the work (its cleanup runs) and exit with 130 / 143. Any other exception is a
    bug and keeps its traceback."""
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        return body()
    except (ValueError, OSError) as e:
        print(f"{prog}: {_one_line(e)}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; nothing was left half-written", file=sys.stderr)
        raise SystemExit(130) from None
    finally:
        signal.signal(signal.SIGTERM, previous)


# ----------------------------------------------------------------------------- result folders

def check_output_folder(path: str, flag: str, not_inside: tuple[str, ...] = ()) -> None:
    """Fail now, before any work, unless `path` can become a new folder of results: it is missing
    or an empty folder, the nearest existing folder above it is writable, and it is neither one of
    `not_inside` (a source) nor inside one. What is already there is never deleted."""
    real = os.path.realpath(path)
    for src in not_inside:
        src_real = os.path.realpath(src)
        if real == src_real or real.startswith(src_real.rstrip(os.sep) + os.sep):
            raise ValueError(f"{flag} {path} is {'the same as' if real == src_real else 'inside'} {src}; "
                             "choose a folder elsewhere")
    if os.path.lexists(path):
        if os.path.islink(path):
            raise ValueError(f"{flag} {path} is a symbolic link; give the path of a new folder")
        if not os.path.isdir(path):
            raise ValueError(f"{flag} {path} already exists and is not a folder; choose a new folder")
        if os.listdir(path):
            raise ValueError(f"{flag} {path} already exists and is not an empty folder; choose a new folder")
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.lexists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ValueError(f"{flag} {path}: {parent} is a file, not a folder; choose another location")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {path}: {parent} is not writable; choose a writable location")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def output_folder(path: str) -> Iterator[str]:
    """Write a folder of results all at once: the block writes into a hidden temporary folder
    beside `path` (yielded), which takes its place (missing or empty, see check_output_folder)
    only when the block finishes. On an error, Ctrl-C or SIGTERM it is removed; the folder ends
    with the permissions the user's umask gives a new folder."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(path))}.partial-", dir=parent)
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it 0700
        if os.path.isdir(path):
            os.rmdir(path)  # empty (checked before the work; rmdir refuses otherwise)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
