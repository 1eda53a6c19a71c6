"""Output folders of the CLI's runs: checked before any compute, never overwritten unless asked, never mixed.

Every subcommand declares its ``--out DIR`` with :func:`add_out_option` (which also adds ``--overwrite`` and
records the files the command writes, plots included, as names or ``fnmatch`` patterns).  A run then has two
moments:

* **check** (:func:`check_out`, which ``deepopt.cli.main`` runs before the command's function): the path and
  the flags against what is there.  It touches nothing, so a refused command leaves no folder behind.
* **start** (:func:`prepare_out`, which the command calls once every argument and input is valid, right before
  it computes): creates the folder, and with ``--overwrite`` moves the previous run's outputs out of it (then
  deletes them), so that no file of the old run stays beside the new one; marks the folder as this command's.

Both refuse, with a :class:`UsageError` that the CLI prints as one line (exit status 2):

* a path that is a file, or whose folder cannot be created or written to;
* a folder holding another command's run (``.deepopt-run.json``, written when a run starts in a folder without
  one, names the command that made it);
* a folder holding this command's outputs, unless ``--overwrite`` (outputs replaced when the new run starts) or
  ``--resume`` (the command continues the run);
* ``--resume`` where there is no run to continue.

Long work reports through :func:`progress_bar`: a tqdm bar on a terminal, plain lines in a log.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import deepopt

RUN_MARKER = ".deepopt-run.json"
_REPLACED = ".deepopt-replaced-"  # the previous run's outputs, moved here when an --overwrite run starts


class UsageError(ValueError):
    """A bad argument, path or input file: ``deepopt.cli.main`` prints it as one line, exit status 2."""


def add_out_option(parser: argparse.ArgumentParser, command: str, outputs: Sequence[str], *,
                   shares: Sequence[str] = ()) -> None:
    """Add ``--out DIR`` and ``--overwrite`` to ``parser``.

    ``outputs``: every file (or folder) the command writes into ``--out``, as names or ``fnmatch`` patterns
    (``curves_*.png``); their presence marks an existing run, and an ``--overwrite`` run removes all of them when
    it starts.  ``shares``: other commands whose run folders this command may write into (its outputs have
    names of their own), e.g. ``hope eval`` into a ``hope train`` run.
    """
    parser.add_argument("--out", type=Path, default=None, metavar="DIR",
                        help=f"output folder (default runs/<timestamp>-{command.replace(' ', '-')}); checked "
                             "before any compute, and a previous run there is never replaced without --overwrite")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the outputs of an existing run in --out once every argument and input has "
                             "been checked and the new run starts (default: refuse)")
    parser.set_defaults(run_command=command, run_outputs=tuple(outputs), run_shares=tuple(shares))


def default_out(command: str, taken: int = 1) -> Path:
    """``runs/<timestamp>-<command>``, with ``-2``, ``-3``, ... after it while that name is taken (runs started in
    the same second each get a folder of their own)."""
    stem = Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{command.replace(' ', '-')}"
    while True:
        out = stem if taken == 1 else stem.with_name(f"{stem.name}-{taken}")
        if not out.exists():
            return out
        taken += 1


def run_command_of(folder: Path) -> str | None:
    """The command recorded in ``folder``'s run marker, or ``None`` when there is none (or it is unreadable)."""
    try:
        return json.loads((folder / RUN_MARKER).read_text())["command"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def run_outputs(folder: Path, patterns: Sequence[str]) -> list[str]:
    """The entries of ``folder`` that match one of ``patterns`` (sorted names; none for a missing folder)."""
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return []
    return [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]


def check_out(args: argparse.Namespace) -> Path:
    """Check ``args.out`` (filled with :func:`default_out` when unset) for ``args.run_command`` against
    ``args.overwrite`` and, where the command has it, ``args.resume``, without creating or changing anything;
    returns it.  ``deepopt.cli.main`` calls it before any command runs."""
    command, outputs = args.run_command, args.run_outputs
    if args.out is None:
        args.out, args.run_default_out = default_out(command), True
    out = args.out = Path(args.out)
    if getattr(args, "run_checked", None) != out:  # what the first check saw
        args.run_checked, args.run_marked = out, (out / RUN_MARKER).is_file()
    resume, overwrite = bool(getattr(args, "resume", False)), bool(args.overwrite)
    if resume and overwrite:
        raise UsageError("--resume and --overwrite exclude each other: continue the run in --out or replace it")
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; expected a folder (new, or a previous `deepopt {command}` run)")
    existing = run_outputs(out, outputs)
    if resume and not existing:
        raise UsageError(f"--resume: --out {out} holds no `deepopt {command}` run to continue; check the folder, "
                         "or run without --resume")
    if not out.is_dir():
        _check_creatable(out)
        return out
    owner = run_command_of(out)
    if owner is not None and owner != command and owner not in args.run_shares:
        raise UsageError(f"--out {out} holds a `deepopt {owner}` run; choose another folder for "
                         f"`deepopt {command}`")
    if existing and not (resume or overwrite):
        how = "--resume to continue it or --overwrite to replace it" if hasattr(args, "resume") else \
            "--overwrite to replace it"
        raise UsageError(f"--out {out} already holds a `deepopt {command}` run ({existing[0]}); pass {how}, "
                         "or choose another folder")
    _check_writable(out, f"--out {out} is not writable")
    return out


def prepare_out(args: argparse.Namespace) -> Path:
    """Start the run in ``args.out``: check it again (:func:`check_out`), create it, and with ``--overwrite`` remove
    the previous run's outputs; returns it.  Call it once every argument and input file is valid, right before
    the command computes: nothing is created or removed before.

    A folder without a run marker when first checked is claimed with one, created exclusively: of two runs
    started into the same new folder, the second is refused, even when the first started while the second was
    still reading its inputs; the default ``--out`` takes the next free name instead (``...-2``)."""
    for attempt in range(100):
        out = check_out(args)
        marked = args.run_marked  # a run's folder when first checked (not one a run started in since)
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise UsageError(f"--out {out}: cannot create the folder ({err.strerror or err}); choose a writable "
                             "location") from None
        if marked or _claim(out, args.run_command):
            break
        if not getattr(args, "run_default_out", False):
            raise UsageError(f"--out {out}: another deepopt run started in this folder at the same time; choose "
                             "another folder")
        args.out = default_out(args.run_command, taken=attempt + 2)
    _remove(out, [n for n in os.listdir(out) if n.startswith(_REPLACED) or _temporary(n, args.run_outputs)])
    if args.overwrite:
        _remove(out, run_outputs(out, args.run_outputs))
        if run_command_of(out) == args.run_command:
            from .checkpoint import atomic_save_json

            atomic_save_json(_marker(args.run_command), out / RUN_MARKER)  # the new run's start
    return out


def _marker(command: str) -> dict[str, str]:
    return {"command": command, "deepopt": deepopt.__version__, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def _claim(out: Path, command: str) -> bool:
    """Create ``out``'s run marker for ``command`` unless a marker exists (``False`` then)."""
    try:
        fd = os.open(out / RUN_MARKER, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except FileExistsError:
        return False
    from .checkpoint import naming

    with naming(out / RUN_MARKER), os.fdopen(fd, "w") as f:
        json.dump(_marker(command), f, indent=2, sort_keys=True)
        f.write("\n")
    return True


def _temporary(name: str, patterns: Sequence[str]) -> bool:
    """``name`` is a temporary file of an atomic write of one of ``patterns`` (``.<output>.<random>.tmp``), which a
    killed run can leave behind."""
    if not (name.startswith(".") and name.endswith(".tmp")):
        return False
    target = name[1:-4].rpartition(".")[0]
    return any(fnmatch.fnmatchcase(target, p) for p in (*patterns, RUN_MARKER))


def _remove(folder: Path, names: Sequence[str]) -> None:
    """Move ``names`` out of the way in one rename each, then delete them: a kill in between leaves a hidden
    ``.deepopt-replaced-*`` folder (removed by the next start), never half a run."""
    if not names:
        return
    trash = Path(tempfile.mkdtemp(dir=folder, prefix=_REPLACED))
    for name in names:
        if name != trash.name:
            os.replace(folder / name, trash / name)
    shutil.rmtree(trash)


def _check_creatable(out: Path) -> None:
    """``out`` does not exist: its nearest existing parent must be a folder this process can write to."""
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise UsageError(f"--out {out}: cannot create the folder ({parent} is not a folder); choose a writable "
                         "location")
    _check_writable(parent, f"--out {out}: cannot create the folder")


def _check_writable(folder: Path, problem: str) -> None:
    """Create and remove an empty file in ``folder``; a :class:`UsageError` saying ``problem`` if this process
    cannot."""
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".deepopt-write-probe-", suffix=".tmp")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise UsageError(f"{problem} ({err.strerror or err}); choose a writable location") from None


class JsonLines:
    """A results file of one JSON object per line, ``{"key": ..., "value": ...}``, each appended, flushed
    and fsync'd as it is computed, so a kill or a late failure keeps what was done.  Opened with
    ``resume``, it reads back the entries (``done``: key → value; a last line torn by a kill is dropped, any
    other unreadable line is a ``ValueError`` naming the file and the line); otherwise it starts empty."""

    def __init__(self, path: str | os.PathLike, resume: bool) -> None:
        from .checkpoint import atomic_write, naming

        self.path = Path(path)
        self.done: dict[str, Any] = {}
        if resume and self.path.is_file():
            with naming(self.path):
                lines = self.path.read_bytes().split(b"\n")
            for number, line in enumerate(lines, 1):
                try:
                    entry = json.loads(line) if line.strip() else None
                    if entry is not None:
                        self.done[entry["key"]] = entry["value"]
                except (ValueError, KeyError, TypeError) as err:
                    if number == len(lines):  # no newline after it: torn by a kill, its run is done again
                        continue
                    raise ValueError(f"--resume: {self.path} line {number} is not a record of this run "
                                     f"({type(err).__name__}: the file is corrupt); remove that line to run it again, "
                                     "or start over with --overwrite") from None
        kept = "".join(json.dumps({"key": k, "value": v}) + "\n" for k, v in self.done.items())
        atomic_write(self.path, lambda tmp: Path(tmp).write_text(kept))

    def add(self, key: str, value: Any) -> None:
        from .checkpoint import naming

        with naming(self.path), open(self.path, "a") as f:
            f.write(json.dumps({"key": key, "value": value}) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.done[key] = value


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


# ------------------------------------------------------------------------------------------- progress
def show_progress(wanted: bool) -> bool:
    """For a raw tqdm bar: only when asked for and stderr is a terminal.  :func:`progress_bar` also reports
    into logs."""
    return bool(wanted) and sys.stderr.isatty()


def progress_bar(iterable: Iterable[Any] | None = None, *, total: int | None = None, desc: str = "",
                 enabled: bool = True, initial: int = 0, unit: str = "it") -> Any:
    """Progress of long work on stderr: a tqdm bar on a terminal, :class:`LineProgress`'s plain lines when
    stderr is a file or a pipe (a log), nothing when not ``enabled`` (``--no-progress``)."""
    if enabled and sys.stderr.isatty():
        from tqdm.auto import tqdm

        return tqdm(iterable, total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True)
    return LineProgress(iterable, total=total, desc=desc, initial=initial, unit=unit, enabled=enabled)


class LineProgress:
    """The part of tqdm's interface the commands use (iteration, ``update``, ``set_postfix``, ``close``, ``with``),
    written as whole lines for a log: one when the work starts, one each time another tenth of ``total`` is done
    or ``every`` seconds have passed since the last line, and one at the end::

        hope train hope: 200/2000 steps (10%), 0:45 elapsed, ~6:45 left, loss 2.310
    """

    every = 60.0

    def __init__(self, iterable: Iterable[Any] | None = None, *, total: int | None = None, desc: str = "",
                 initial: int = 0, unit: str = "it", enabled: bool = True) -> None:
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.iterable, self.total, self.desc, self.unit, self.enabled = iterable, total, desc, unit, enabled
        self.n = self.initial = initial
        self.postfix = ""
        self.t0 = self.last = time.monotonic()
        self.shown: int | None = None
        self.closed = False
        self._line()

    def _tenths(self, n: int) -> int:
        return math.floor(10 * n / self.total) if self.total else 0

    def update(self, n: int = 1) -> None:
        before, self.n = self.n, self.n + n
        if self._tenths(self.n) > self._tenths(before) or time.monotonic() - self.last >= self.every:
            self._line()

    def set_postfix(self, ordered_dict: dict[str, Any] | None = None, refresh: bool = True, **kwargs: Any) -> None:
        items = {**(ordered_dict or {}), **kwargs}
        self.postfix = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in items.items())

    def close(self) -> None:
        if not self.closed and self.shown != self.n:
            self._line()
        self.closed = True

    def __iter__(self) -> Iterator[Any]:
        for item in self.iterable or ():
            yield item
            self.update(1)
        self.close()

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _line(self) -> None:
        self.last, self.shown = time.monotonic(), self.n
        if not self.enabled:
            return
        elapsed = self.last - self.t0
        text = f"{self.desc}: {self.n}" if self.desc else f"{self.n}"
        if self.total:
            text += f"/{self.total} {self.unit} ({100 * self.n / self.total:.0f}%)"
        else:
            text += f" {self.unit}"
        text += f", {_clock(elapsed)} elapsed"
        done = self.n - self.initial
        if self.total and 0 < done and self.n < self.total:
            text += f", ~{_clock(elapsed / done * (self.total - self.n))} left"
        if self.postfix:
            text += f", {self.postfix}"
        print(text, file=sys.stderr, flush=True)


def _clock(seconds: float) -> str:
    minutes, s = divmod(int(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{s:02d}" if minutes >= 60 else f"{minutes}:{s:02d}"


# ------------------------------------------------------------------------------------------- closing lines
def finish(out: Path, targets: Sequence[tuple[str, bool | None]] = (), files: Sequence[tuple[str, str]] = ()
            ) -> None:
    """The closing lines of a long command: each target with whether it was met (``None``: not measured by
    this run), the files to open with what they hold, then :func:`wrote`."""
    if targets:
        print("targets:")
        for text, met in targets:
            print(f"  [{'met' if met else 'n/a' if met is None else 'NOT met'}] {text}")
    shown = [(name, what) for name, what in files if (out / name).exists()]
    if shown:
        print("open:")
        width = max(len(str(out / name)) for name, _ in shown)
        for name, what in shown:
            print(f"  {str(out / name):<{width}}  {what}")
    wrote(out)


def wrote(out: Path) -> None:
    """The completion line every command prints last."""
    print(f"wrote {out}", flush=True)
