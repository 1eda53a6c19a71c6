"""Evolution strategies: meta-gradient estimates that need no backprop through the unroll — antithetic ES
(``AntitheticES``) and its persistent, unbiased-over-truncations form (``PES``).

With ε_i ~ N(0, I) over all raw meta-parameters r (flattened) and common random numbers (the
same inner batches) for every evaluation::

    ĝ = 1/(2σN) Σ_{i=1..N} [F(r + σε_i) − F(r − σε_i)] ε_i

an unbiased estimate of the gradient of the Gaussian-smoothed outer loss, for horizons where
backprop is too costly or chaotic.  The 2N evaluations run under ``torch.no_grad``, batched with
``torch.func.vmap`` (``vectorize=True``) or one by one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.func import vmap
from torch.utils._pytree import tree_map

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


@dataclass
class PES:
    """Persistent evolution strategies (Vicol, Metz, Sohl-Dickstein, ICML 2021): an unbiased estimate of the
    gradient of the smoothed loss of the *whole* inner run, from truncations of it — where truncated backprop
    (``Backprop`` on carried state) and plain ES are biased towards the short horizon they see.

    Each of N antithetic pairs keeps its own inner trajectories (weights and rule state under ``r ± σε_i``)
    and the sum ξ_i of the perturbations it has run under since its task started; a truncation draws fresh
    ε_i, runs both trajectories K steps further and estimates::

        ξ_i ← ξ_i + ε_i;     ĝ = 1/(2σN) Σ_i (F_i⁺ − F_i⁻) ξ_i

    (``F_i^±``: the truncation's outer loss on trajectory ``r ± σε_i``).  The central trajectory (``r``) is run
    too, for the reported loss and the carried ``InnerState``; the particles ride in ``InnerState.particles``,
    so a checkpointed meta-training run resumes them.  Same interface as ``Backprop``.

    Args: ``sigma`` (> 0, raw-parameter space), ``pairs`` N (≥ 1), ``chunk`` (particles per ``vmap`` call).
    """

    sigma: float = 0.01
    pairs: int = 8
    chunk: int = 64

    def __post_init__(self) -> None:
        AntitheticES.__post_init__(self)  # the same checks on sigma, pairs and chunk

    def __call__(self, unroll: Unroll, inner: InnerState, key: int = 0) -> MetaGrad:
        raw = {k: v.detach() for k, v in unroll.meta.raw.items()}
        gen = torch.Generator().manual_seed(key)
        eps = {k: torch.randn((self.pairs, *v.shape), generator=gen, dtype=torch.float64).to(v)
               for k, v in raw.items()}
        particles = inner.particles or self.fresh_particles(inner, raw)
        xi = {k: particles["xi"][k] + e for k, e in eps.items()}
        both = {k: torch.cat([raw[k] + self.sigma * e, raw[k] - self.sigma * e]) for k, e in eps.items()}

        def one(r: dict[str, Tensor], params: dict[str, Tensor], state: Any):
            total, params, state = unroll.segment(unroll.hparams(r), params, state, inner.step, unroll.steps)
            return total / unroll.steps, params, state

        state_dim = None if particles["state"] is None else 0
        with torch.no_grad():
            losses, params, state = vmap(one, in_dims=(0, 0, state_dim), randomness="same", chunk_size=self.chunk)(
                both, particles["params"], particles["state"])
            center, out = unroll.loss(raw, inner)
        diff = (losses[: self.pairs] - losses[self.pairs:]) / (2 * self.sigma * self.pairs)
        grads = {k: torch.tensordot(diff, x, dims=1) for k, x in xi.items()}
        out.particles = {"params": params, "state": state, "xi": xi}
        return MetaGrad(center, grads, out.detached())

    def fresh_particles(self, inner: InnerState, raw: dict[str, Tensor]) -> dict[str, Any]:
        """2N copies of ``inner``'s trajectory and ξ = 0: the particles at the start of a task (or of a run
        resumed from a state that carried none)."""
        def copies(tree: Any) -> Any:
            return tree_map(lambda t: t.unsqueeze(0).expand(2 * self.pairs, *t.shape).clone(), tree)

        xi = {k: torch.zeros((self.pairs, *v.shape), dtype=v.dtype, device=v.device) for k, v in raw.items()}
        return {"params": copies(inner.params), "state": None if inner.state is None else copies(inner.state),
                "xi": xi}
