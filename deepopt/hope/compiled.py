"""``torch.compile``'d versions of the scan ops' per-chunk functions, named by an int the ops take.

A custom op is opaque to ``torch.compile``: compiling a model leaves the torch chunk loop inside the op eager.
``compile_model`` therefore registers its compile options here (``key = compile_options(**options)``) and passes the
key through the Titans scan op's ``chunk_fns`` argument (``deepopt::titans_scan``; the CMS op does not take one
yet); the op's loop then calls ``compiled(key, fn)``, ``fn`` compiled with those options (once per options and
function: every layer of every model compiled with them shares its graphs).  Key 0 is the eager function.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

_OPTIONS: dict[int, dict[str, Any]] = {}  # key -> torch.compile options
_KEYS: dict[tuple, int] = {}
_COMPILED: dict[tuple[int, Callable], Callable] = {}


def compile_options(**options: Any) -> int:
    """The key (≥ 1) of these ``torch.compile`` options, the same key for the same options."""
    try:
        token = tuple(sorted(options.items()))
        hash(token)
    except TypeError:  # unhashable options: a key of their own
        token = (id(options),)
    if token not in _KEYS:
        _KEYS[token] = len(_OPTIONS) + 1
        _OPTIONS[_KEYS[token]] = dict(options)
    return _KEYS[token]


def check_key(key: int) -> None:
    """``ValueError`` naming ``chunk_fns`` unless ``key`` is 0 or a ``compile_options`` key."""
    if key and key not in _OPTIONS:
        raise ValueError(f"chunk_fns must be 0 (eager) or a key of compile_options {sorted(_OPTIONS)}, got {key}")


def compiled(key: int, fn: Callable) -> Callable:
    """``fn`` itself for key 0, else ``torch.compile(fn, **options of key)`` (made on first use, then kept)."""
    if not key:
        return fn
    if (key, fn) not in _COMPILED:
        _COMPILED[key, fn] = torch.compile(fn, **_OPTIONS[key])
    return _COMPILED[key, fn]
