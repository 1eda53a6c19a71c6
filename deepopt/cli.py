"""The ``deepopt`` command line: one entry point, one subcommand per capability.

Each capability module exposes ``register(subparsers)``, which adds its subcommand and sets
``func`` on it; the parsed namespace is then passed to ``func``.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Sequence

# "module:function" of each subcommand's registrar, imported when the CLI starts.
_REGISTRARS: tuple[str, ...] = (
    "deepopt.bench:register",
    "deepopt.robustness:register",
    "deepopt.metatrain_cli:register",
    "deepopt.hope.cli:register",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deepopt",
        description="Optimizers as associative memories: benchmarks, meta-training, HOPE, robustness.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for spec in _REGISTRARS:
        module, func = spec.split(":")
        getattr(importlib.import_module(module), func)(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ValueError as err:  # a bad option value found by the library: one line, exit status 2 like argparse
        parser.exit(2, f"deepopt {args.command}: error: {err}\n")


if __name__ == "__main__":
    raise SystemExit(main())
