"""Antithetic evolution strategies: a meta-gradient estimate that needs no backprop through the unroll.

With ε_i ~ N(0, I) over all raw meta-parameters r (flattened) and common random numbers (the
same inner batches) for every evaluation::

    ĝ = 1/(2σN) Σ_{i=1..N} [F(r + σε_i) − F(r − σε_i)] ε_i

an unbiased estimate of the gradient of the Gaussian-smoothed outer loss, for horizons where
backprop is too costly or chaotic.  The 2N evaluations run under ``torch.no_grad``, batched with
``torch.func.vmap`` (``vectorize=True``) or one by one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.func import vmap

from .unroll import InnerState, MetaGrad, Unroll


@dataclass
class AntitheticES:
    """Same interface as ``Backprop``: ``estimator(unroll, inner, key) -> MetaGrad``.

    Args:
        sigma: perturbation scale σ in raw-parameter space (> 0).
        pairs: number N of antithetic pairs (≥ 1).
        vectorize: evaluate the perturbed unrolls with ``vmap`` (``chunk`` at a time) instead of a loop.
        chunk: perturbations per ``vmap`` call (bounds memory).
    The perturbations are drawn from a generator seeded with ``key``, so a step is reproducible.
    """

    sigma: float = 0.01
    pairs: int = 32
    vectorize: bool = True
    chunk: int = 64

    def __post_init__(self) -> None:
        if not (isinstance(self.sigma, (int, float)) and self.sigma > 0):
            raise ValueError(f"sigma must be a number > 0, got {self.sigma!r}")
        for name in ("pairs", "chunk"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")

    def __call__(self, unroll: Unroll, inner: InnerState, key: int = 0) -> MetaGrad:
        raw = {k: v.detach() for k, v in unroll.meta.raw.items()}
        gen = torch.Generator().manual_seed(key)
        eps = {
            k: torch.randn((self.pairs, *v.shape), generator=gen, dtype=torch.float64).to(v.dtype)
            for k, v in raw.items()
        }
        both = {k: torch.cat([raw[k] + self.sigma * e, raw[k] - self.sigma * e]) for k, e in eps.items()}
        with torch.no_grad():
            losses = self._evaluate(unroll, inner, both)
            center, out = unroll.loss(raw, inner)
        diff = (losses[: self.pairs] - losses[self.pairs :]) / (2 * self.sigma * self.pairs)
        grads = {k: torch.tensordot(diff, e, dims=1) for k, e in eps.items()}
        return MetaGrad(center, grads, out.detached())

    def _evaluate(self, unroll: Unroll, inner: InnerState, batched: dict[str, Tensor]) -> Tensor:
        def one(r: dict[str, Tensor]) -> Tensor:
            return unroll.loss(r, inner)[0]

        if self.vectorize:
            return vmap(one, randomness="same", chunk_size=self.chunk)(batched)
        n = next(iter(batched.values())).shape[0]
        return torch.stack([one({k: v[i] for k, v in batched.items()}) for i in range(n)])
