"""HOPE's Triton scans on a GPU that cannot hold them: the torch reference instead of a crash.

A Triton kernel is compiled at its first launch and loaded onto the device, which refuses it when the program
needs more shared memory (or registers) per block than the GPU offers: Triton raises ``OutOfResources`` before
anything runs.  The per-block limit differs by GPU (227 KiB on H100/H200, 163 KiB on A100, 99 KiB on RTX 30/40
cards and L4), and the Titans backward kernel needs up to 224 KiB at the sizes the routing gives it (HOPE base,
bfloat16; ``benchmarks/triton_aot.py``), so a launch the routing makes can still be refused by the GPU at hand.
``kernel_or_reference`` runs the kernel path and, on such a refusal, warns once and runs the reference path,
which computes the same values with torch ops; later calls with the same key go straight to the reference.
A refused launch has written nothing, so nothing is left half done.  (The CMS kernels' tiles have fixed sizes:
at most 44 KiB for the persistent kernels and 80 KiB for the tiled ones in sm_80/sm_89 builds (A100, RTX 30/40,
L4), 120 KiB on sm_90, at any shape (``benchmarks/triton_aot.py``, 2026-12-07): they need no such path.)
"""
from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import TypeVar

try:
    from triton.runtime.errors import OutOfResources
except ImportError:  # no Triton (or a Triton without it): no kernel is ever launched
    class OutOfResources(Exception):  # type: ignore[no-redef]
        """Stand-in: never raised."""

R = TypeVar("R")
refused: set[tuple] = set()  # keys whose kernel a device refused in this process


def kernel_or_reference(key: tuple, kernel: Callable[[], R], reference: Callable[[], R]) -> R:
    """``kernel()`` unless a launch with this ``key`` (the op's name first, then the device, shapes, dtypes: whatever
    decides the compiled program) was refused before; on ``OutOfResources`` warn once per key and return
    ``reference()``."""
    if key not in refused:
        try:
            return kernel()
        except OutOfResources as err:
            refused.add(key)
            warnings.warn(f"{key[0]}: the GPU cannot run the Triton kernel for {key} ({err}); using the torch "
                          "reference for it (same values, slower)", RuntimeWarning, stacklevel=3)
    return reference()
