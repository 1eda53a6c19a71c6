"""The ``deepopt`` command line: one entry point, one subcommand per capability.

Each capability module exposes ``register(subparsers)``, which adds its subcommand and sets
``func`` on it; the parsed namespace is then passed to ``func``, after the command's ``--out`` folder
(``deepopt.runs.add_out_option``) has been checked.  Every user-facing error (a bad option, an unusable
``--out``, a missing or corrupt input file, a write that fails: disk full) is one line on stderr that names
the flag or file, with exit status 2; tracebacks are left for bugs.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import sys
from collections.abc import Sequence
from typing import NoReturn

# (subcommand, "module:function" of its registrar): a command line naming a subcommand imports its registrar
# only, so ``deepopt bench`` starts where another subcommand's optional dependency (``higher``) is missing.
_REGISTRARS: tuple[tuple[str, str], ...] = (
    ("bench", "deepopt.bench:register"),
    ("robustness", "deepopt.robustness:register"),
    ("meta-train", "deepopt.metatrain_cli:register"),
    ("evaluate", "deepopt.evaluate:register"),
    ("select", "deepopt.selection:register"),
    ("hope", "deepopt.hope.cli:register"),
    ("compare", "deepopt.compare:register"),
)


class _Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` (and, through ``parser_class``, its subcommands) whose errors are one line."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser with every subcommand, or with ``command``'s alone.  A subcommand whose module needs a package
    that is not installed is listed, and running it is a one-line error naming the package."""
    import deepopt

    parser = _Parser(
        prog="deepopt",
        description="Optimizers as associative memories: benchmarks, meta-training, HOPE, robustness.",
    )
    parser.add_argument("--version", action="version",
                        version=f"deepopt {deepopt.__version__} (torch {_torch_version()})")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    parser.unavailable = {}  # subcommand -> the missing package it needs
    for name, spec in _REGISTRARS:
        if command is not None and name != command:
            continue
        module, func = spec.split(":")
        try:
            getattr(importlib.import_module(module), func)(sub)
        except ModuleNotFoundError as err:
            if err.name is None or err.name.split(".")[0] == "deepopt":
                raise
            parser.unavailable[name] = err.name.split(".")[0]
            sub.add_parser(name, help=f"(needs the {parser.unavailable[name]!r} package, not installed)")
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
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            text += " (free some space, or choose another --out)"
    else:
        text = str(err) or type(err).__name__
    return " ".join(text.split())


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    named = next((a for a in argv if not a.startswith("-")), None)  # the CLI's own options take no values
    parser = build_parser(named if named in dict(_REGISTRARS) else None)
    package = parser.unavailable.get(named)
    if package is not None:
        parser.exit(2, f"deepopt {named}: error: needs the {package!r} package, which is not installed "
                       f"(pip install {package})\n")
    args = parser.parse_args(argv)
    prog = " ".join(["deepopt", args.command, *filter(None, [getattr(args, "hope_command", None)])])
    try:
        if getattr(args, "run_command", None) is not None:  # before the command: nothing is computed or created
            from deepopt.runs import check_out

            check_out(args)
        return int(args.func(args) or 0)
    except (ValueError, OSError) as err:  # bad input or an unusable file: one line, exit status 2 like argparse
        parser.exit(2, f"{prog}: error: {_one_line(err)}\n")
    except KeyboardInterrupt:
        parser.exit(130, f"{prog}: interrupted\n")


if __name__ == "__main__":
    raise SystemExit(main())
