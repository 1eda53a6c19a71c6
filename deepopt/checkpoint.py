"""Safe, atomic checkpoint files: safetensors for tensors, JSON for configuration.

Nothing here unpickles: tensors load with ``safetensors`` and torch files with ``weights_only=True``.
Every write goes to a temporary file in the destination folder and is renamed into place, so a
crash leaves either the old file or the new one, never a torn one; the file gets the permissions a
plain ``open(path, "w")`` would (0644 under the usual umask 022).  A missing, truncated or corrupt file
raises a ``ValueError`` (``FileNotFoundError`` when missing) that names it; a write that fails (disk full,
file too large, no permission) raises an ``OSError`` whose ``filename`` is the destination, whichever library
wrote it.
"""

from __future__ import annotations

import io
import json
import os
import re
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save, save_file
from torch import Tensor

PRETRAINED_CONFIG = "config.json"
PRETRAINED_TENSORS = "memory.safetensors"


@contextmanager
def naming(path: str | os.PathLike) -> Iterator[None]:
    """Re-raise an ``OSError`` of the block that names no file (``write()``, ``fsync()``) or ``path``'s temporary
    file as one whose ``filename`` is ``path``: the file the user knows."""
    try:
        yield
    except OSError as err:
        name = None if err.filename is None else Path(err.filename).name
        path = Path(path)
        if name is not None and not (name.startswith(f".{path.name}.") and name.endswith(".tmp")):
            raise  # about another file (a folder to create, an input): it names that one
        raise OSError(err.errno, err.strerror or str(err), str(path)) from err


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it onto ``path``.  Any failure
    removes the temporary file and leaves ``path`` as it was; an ``OSError`` names ``path``."""
    path = Path(path)
    with naming(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        try:
            write(tmp)
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it 0600
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise


def _write_bytes(tmp: str, data: bytes | memoryview) -> None:
    with open(tmp, "wb") as f:
        f.write(data)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_save_json(obj: Any, path: str | os.PathLike) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
            f.write("\n")
    atomic_write(path, write)


def atomic_save_tensors(tensors: Mapping[str, Tensor], path: str | os.PathLike) -> None:
    """Write a flat ``name -> tensor`` mapping as safetensors (contiguous CPU copies)."""
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}

    def write(tmp: str) -> None:
        try:
            save_file(cpu, tmp)
        except SafetensorError as err:
            if "I/O error" not in str(err):
                raise
            _write_bytes(tmp, save(cpu))  # through Python's I/O: the failure becomes an OSError with its errno
    atomic_write(path, write)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` through a temporary file; ``obj`` must hold only tensors and plain Python data."""
    def write(tmp: str) -> None:
        try:
            torch.save(obj, tmp)
        except RuntimeError as err:
            if not _TORCH_WRITE_FAILED.search(str(err)):
                raise
            # torch's zip writer reports a failed write (disk full, file too large) without its cause; writing
            # the same bytes through Python's I/O raises the OSError that says it (or succeeds)
            buffer = io.BytesIO()
            torch.save(obj, buffer)
            _write_bytes(tmp, buffer.getbuffer())
    atomic_write(path, write)


_TORCH_WRITE_FAILED = re.compile(r"inline_container|PytorchStreamWriter|file write failed")


def torch_load(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Any:
    """Load a torch file with ``weights_only=True`` (no arbitrary unpickling)."""
    _require_file(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # the unpickler fails on a torn file in many ways (EOFError, IndexError, ...)
        raise ValueError(f"{path} is not a readable torch checkpoint of plain tensors and data (truncated or "
                         f"corrupt?): {type(err).__name__}") from err


def load_tensors(path: str | os.PathLike) -> dict[str, Tensor]:
    _require_file(path)
    try:
        return load_file(str(path))
    except SafetensorError as err:
        raise ValueError(f"{path} is not a readable safetensors file (truncated or corrupt?): {err}") from err


def load_json(path: str | os.PathLike) -> Any:
    """``json.load`` of ``path``; a truncated or invalid file raises a ``ValueError`` naming it."""
    _require_file(path)
    try:
        return json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON (truncated or corrupt?): {err}") from err


def _require_file(path: str | os.PathLike) -> None:
    if not os.path.isfile(path):
        raise FileNotFoundError(2, "no such file" if not os.path.exists(path) else "not a file", str(path))


def save_pretrained(path: str | os.PathLike, optimizer: str, hparams: Mapping[str, Any],
                    tensors: Mapping[str, Tensor]) -> Path:
    """Write a trained optimizer: ``config.json`` ({"optimizer", "hparams"}) + ``memory.safetensors``."""
    path = Path(path)
    plain = (bool, int, float, str, type(None))
    for key, value in hparams.items():
        if not (isinstance(value, plain) or (isinstance(value, (list, tuple))
                                             and all(isinstance(v, plain) for v in value))):
            raise TypeError(f"hparams[{key!r}] must be a plain number, string, bool, None or a list of them, got "
                            f"{type(value).__name__}; pass tensors in `tensors`")
    atomic_save_tensors(tensors, path / PRETRAINED_TENSORS)
    atomic_save_json({"optimizer": optimizer, "hparams": dict(hparams)}, path / PRETRAINED_CONFIG)
    return path


def load_pretrained(path: str | os.PathLike) -> tuple[str, dict[str, Any], dict[str, Tensor]]:
    """Read what ``save_pretrained`` wrote: (optimizer class name, hparams, tensors)."""
    path = Path(path)
    for f in (path / PRETRAINED_CONFIG, path / PRETRAINED_TENSORS):
        if not f.is_file():
            raise FileNotFoundError(f"{path} is not a saved optimizer: missing {f.name}")
    return (*load_pretrained_config(path), load_tensors(path / PRETRAINED_TENSORS))


def load_pretrained_config(path: str | os.PathLike) -> tuple[str, dict[str, Any]]:
    """``save_pretrained``'s config alone: (optimizer class name, hparams), the tensors not read."""
    config_file = Path(path) / PRETRAINED_CONFIG
    if not config_file.is_file():
        raise FileNotFoundError(f"{path} is not a saved optimizer: missing {config_file.name}")
    config = load_json(config_file)
    if not isinstance(config, dict) or not {"optimizer", "hparams"} <= set(config):
        raise ValueError(f"{config_file} must hold an object with 'optimizer' and 'hparams'")
    return config["optimizer"], dict(config["hparams"])
