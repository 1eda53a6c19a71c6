"""Output folders of the CLI's runs: checked before any compute, never overwritten unless asked.

Every subcommand declares its ``--out DIR`` with :func:`add_out_option` (which also adds ``--overwrite``
and records the files the command writes) and calls :func:`prepare_out` once its other arguments are
valid and before it computes.  ``prepare_out`` refuses, with a :class:`UsageError` that the CLI prints
as one line (exit status 2):

* a path that is a file, or whose folder cannot be created or written to;
* a folder holding another command's run (``.deepopt-run.json``, written into a fresh folder, names
  the command that made it);
* a folder holding this command's outputs, unless ``--overwrite`` (outputs deleted first) or
  ``--resume`` (the command continues the run);
* ``--resume`` where there is no run to continue.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import deepopt

RUN_MARKER = ".deepopt-run.json"


class UsageError(ValueError):
    """A bad argument, path or input file: ``deepopt.cli.main`` prints it as one line, exit status 2."""


def add_out_option(parser: argparse.ArgumentParser, command: str, outputs: Sequence[str], *,
                   shares: Sequence[str] = ()) -> None:
    """Add ``--out DIR`` and ``--overwrite`` to ``parser``.

    ``outputs``: the files (or folders) the command writes into ``--out``; their presence marks an
    existing run.  ``shares``: other commands whose run folders this command may write into (its
    outputs have names of their own), e.g. ``hope eval`` into a ``hope train`` run.
    """
    parser.add_argument("--out", type=Path, default=None, metavar="DIR",
                        help=f"output folder (default runs/<timestamp>-{command.replace(' ', '-')}); checked "
                             "before any compute, and a previous run there is never replaced without --overwrite")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the outputs of an existing run in --out (default: refuse)")
    parser.set_defaults(run_command=command, run_outputs=tuple(outputs), run_shares=tuple(shares))


def default_out(command: str) -> Path:
    return Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{command.replace(' ', '-')}"


def run_command_of(folder: Path) -> str | None:
    """The command recorded in ``folder``'s run marker, or ``None`` when there is none (or it is unreadable)."""
    try:
        return json.loads((folder / RUN_MARKER).read_text())["command"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def prepare_out(args: argparse.Namespace) -> Path:
    """Validate and create ``args.out`` (filled with :func:`default_out` when unset) for ``args.run_command``;
    returns it.  Honours ``args.overwrite`` and, where the command has it, ``args.resume``."""
    command, outputs = args.run_command, args.run_outputs
    out = args.out = Path(args.out) if args.out is not None else default_out(command)
    resume, overwrite = bool(getattr(args, "resume", False)), bool(args.overwrite)
    if resume and overwrite:
        raise UsageError("--resume and --overwrite exclude each other: continue the run in --out or replace it")
    if resume and not (out.is_dir() and any((out / name).exists() for name in outputs)):
        raise UsageError(f"--resume: --out {out} holds no `deepopt {command}` run to continue; check the folder, "
                         "or run without --resume")
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; expected a folder (new, or a previous `deepopt {command}` run)")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UsageError(f"--out {out}: cannot create the folder ({err.strerror or err}); choose a writable "
                         "location") from None
    fresh = not any(out.iterdir())
    owner = run_command_of(out)
    if owner is not None and owner != command and owner not in args.run_shares:
        raise UsageError(f"--out {out} holds a `deepopt {owner}` run; choose another folder for "
                         f"`deepopt {command}`")
    existing = [name for name in outputs if (out / name).exists()]
    if existing and not (resume or overwrite):
        how = "--resume to continue it or --overwrite to replace it" if hasattr(args, "resume") else \
            "--overwrite to replace it"
        raise UsageError(f"--out {out} already holds a `deepopt {command}` run ({existing[0]}); pass {how}, "
                         "or choose another folder")
    _check_writable(out)
    if overwrite:
        for name in existing:
            path = out / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    if fresh:  # a folder that held something else before stays unmarked
        from .checkpoint import atomic_save_json

        atomic_save_json({"command": command, "deepopt": deepopt.__version__,
                          "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, out / RUN_MARKER)
    return out


class JsonLines:
    """A results file of one JSON object per line, ``{"key": ..., "value": ...}``, each appended, flushed
    and fsync'd as it is computed, so a kill or a late failure keeps what was done.  Opened with
    ``resume``, it reads back the entries (``done``: key → value; a line torn by a kill is dropped);
    otherwise it starts empty."""

    def __init__(self, path: str | os.PathLike, resume: bool) -> None:
        from .checkpoint import atomic_write

        self.path = Path(path)
        self.done: dict[str, Any] = {}
        for line in self.path.read_text().splitlines() if resume and self.path.is_file() else []:
            try:
                entry = json.loads(line)
                self.done[entry["key"]] = entry["value"]
            except (ValueError, KeyError, TypeError):
                continue
        kept = "".join(json.dumps({"key": k, "value": v}) + "\n" for k, v in self.done.items())
        atomic_write(self.path, lambda tmp: Path(tmp).write_text(kept))

    def add(self, key: str, value: Any) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"key": key, "value": value}) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.done[key] = value


def _check_writable(folder: Path) -> None:
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".deepopt-write-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise UsageError(f"--out {folder} is not writable ({err.strerror or err}); choose a writable "
                         "folder") from None


def check_device(device: str, flag: str = "--device") -> str:
    """``cpu``, ``cuda`` or ``cuda:N`` with CUDA available; else a :class:`UsageError`."""
    import torch

    if device != "cpu" and device != "cuda" and not (device.startswith("cuda:") and device[5:].isdigit()):
        raise UsageError(f"{flag} must be cpu, cuda or cuda:N, got {device!r}")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UsageError(f"{flag} {device}: CUDA is not available on this machine (torch {torch.__version__}); "
                             "use --device cpu")
        if ":" in device and int(device[5:]) >= torch.cuda.device_count():
            raise UsageError(f"{flag} {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def check_at_least(args: argparse.Namespace, minimum: int, *names: str) -> None:
    """Each ``args.<name>`` that is set must be an integer ``>= minimum`` (named as its ``--flag``)."""
    for name in names:
        value = getattr(args, name, None)
        if value is not None and value < minimum:
            raise UsageError(f"--{name.replace('_', '-')} must be >= {minimum}, got {value}")


def show_progress(wanted: bool) -> bool:
    """Progress bars only when asked for and stderr is a terminal (no bar floods in log files)."""
    return bool(wanted) and sys.stderr.isatty()


def wrote(out: Path) -> None:
    """The completion line every command prints last."""
    print(f"wrote {out}", flush=True)
