"""The ``deepopt`` command line: one entry point, one subcommand per capability.

Each capability module exposes ``register(subparsers)``, which adds its subcommand and sets
``func`` on it; the parsed namespace is then passed to ``func``.  Every user-facing error (a bad
option, an unusable ``--out``, a missing or corrupt input file) is one line on stderr that names the
flag or file, with exit status 2; tracebacks are left for bugs.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Sequence
from typing import NoReturn

# "module:function" of each subcommand's registrar, imported when the CLI starts.
_REGISTRARS: tuple[str, ...] = (
    "deepopt.bench:register",
    "deepopt.robustness:register",
    "deepopt.metatrain_cli:register",
    "deepopt.evaluate:register",
    "deepopt.hope.cli:register",
    "deepopt.compare:register",
)


class _Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` (and, through ``parser_class``, its subcommands) whose errors are one line."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    import deepopt

    parser = _Parser(
        prog="deepopt",
        description="Optimizers as associative memories: benchmarks, meta-training, HOPE, robustness.",
    )
    parser.add_argument("--version", action="version",
                        version=f"deepopt {deepopt.__version__} (torch {_torch_version()})")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for spec in _REGISTRARS:
        module, func = spec.split(":")
        getattr(importlib.import_module(module), func)(sub)
    return parser


def _torch_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("torch")
    except PackageNotFoundError:
        return "not installed"


def _one_line(err: BaseException) -> str:
    if isinstance(err, OSError) and err.filename is not None:  # name the file, not just the errno
        text = f"{err.filename}: {err.strerror or err}"
    else:
        text = str(err) or type(err).__name__
    return " ".join(text.split())


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    prog = " ".join(["deepopt", args.command, *filter(None, [getattr(args, "hope_command", None)])])
    try:
        return int(args.func(args) or 0)
    except (ValueError, OSError) as err:  # bad input or an unusable file: one line, exit status 2 like argparse
        parser.exit(2, f"{prog}: error: {_one_line(err)}\n")
    except KeyboardInterrupt:
        parser.exit(130, f"{prog}: interrupted\n")


if __name__ == "__main__":
    raise SystemExit(main())
