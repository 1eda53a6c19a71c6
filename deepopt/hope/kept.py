"""Chunk loops that keep each chunk's intermediates for their backward pass.

HOPE's memory scans (``deepopt::titans_scan``, ``deepopt::cms_scan``) save only the states at the chunk boundaries
and recompute every chunk in their backward op.  Off their Triton kernels (the CPU), eager training can instead run
the same torch chunk loop under ``KeptChunks``: the loop hands over each chunk's intermediates (dicts of tensors),
which are saved with the inputs and the boundary states, and the backward loop reads them back instead of
recomputing the chunk.  Same numbers; more memory held from the forward to the backward pass
(``HopeConfig.recompute_chunks`` chooses).
"""

from __future__ import annotations

import torch


def keeps(*tensors: torch.Tensor) -> bool:
    """Whether a backward pass can follow and a chunk loop may keep its chunks for it: grad mode on, an input
    that requires grad, not under ``torch.compile`` (which traces the scan ops instead) and not under autocast
    (the ops recompute their chunks without it in the backward pass; kept chunks would mix its dtypes in)."""
    return (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
            and not torch.compiler.is_compiling() and not _autocast(tensors[0].device.type))


def _autocast(device: str) -> bool:
    if device not in ("cpu", "cuda"):
        return False
    try:
        return torch.is_autocast_enabled(device)
    except TypeError:  # torch before the device argument
        return torch.is_autocast_cpu_enabled() if device == "cpu" else torch.is_autocast_enabled()


class KeptChunks(torch.autograd.Function):
    """``apply(loop, reverse, n, *tensors, *static)``: ``loop(*tensors, *static, kept=list)`` returns
    ``(y, s1, s2)`` (outputs, boundary states) and appends each chunk's intermediates (a tuple of dicts of
    tensors); ``reverse(dy, ds1, ds2, tensors, s1, s2, static, kept)`` returns the ``n`` tensors' gradients
    (None for one that gets none) from the outputs' (None: not used)."""

    @staticmethod
    def forward(ctx, loop, reverse, n, *args):
        tensors, static = args[:n], args[n:]
        kept: list = []
        y, s1, s2 = loop(*tensors, *static, kept=kept)
        ctx.layout = [tuple(tuple(part) for part in chunk) for chunk in kept]  # each chunk's dicts' keys
        ctx.save_for_backward(*tensors, s1, s2, *(t for chunk in kept for part in chunk for t in part.values()))
        ctx.n, ctx.reverse, ctx.static = n, reverse, static
        ctx.set_materialize_grads(False)  # unused boundary states get no zero cotangents
        return y, s1, s2

    @staticmethod
    def backward(ctx, dy, ds1, ds2):
        saved = ctx.saved_tensors
        tensors, (s1, s2), flat = saved[:ctx.n], saved[ctx.n:ctx.n + 2], iter(saved[ctx.n + 2:])
        kept = [tuple({key: next(flat) for key in keys} for keys in chunk) for chunk in ctx.layout]
        grads = ctx.reverse(dy, ds1, ds2, tensors, s1, s2, ctx.static, kept)
        return None, None, None, *grads, *(None for _ in ctx.static)
