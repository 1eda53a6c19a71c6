"""Gradient-noise models that wrap any optimizer or hook any model, without changing the training loop.

Gradient-level noise (``g`` a gradient tensor of ``n`` coordinates, ``ξ`` fresh draws, ``σ_t`` the level
at step ``t``)::

    gaussian        g + σ_t·s·ξ,            ξ ~ N(0, 1)
    student_t       g + σ_t·s·ξ,            ξ ~ t_ν, rescaled to unit variance when ν > 2
    multiplicative  g ⊙ (1 + σ_t·ξ),        ξ ~ N(0, 1)
    dropout         g ⊙ b / (1 − σ_t),      b ~ Bernoulli(1 − σ_t)   (σ_t is the drop probability)

with ``s = RMS(g) = ‖g‖/√n`` per tensor (``relative=True``, the default) or ``s = 1`` (absolute), and
the decaying schedule of Neelakantan et al. (2015), ``σ_t² = σ²/(1 + t)^γ``.  Every model draws from
its own ``torch.Generator`` seeded by ``seed``, so runs are reproducible and leave torch's global RNG
alone.  Two ways to apply a model:

    NoisyGradients(optimizer, noise)     # step hooks: the optimizer sees noisy copies of p.grad
    register_noise_hooks(model, noise)   # tensor hooks: backward itself produces noisy gradients

Task-level noise: ``corrupt_labels`` (label noise) and ``batch_size_for_level`` (small batches).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from deepopt.rules.base import check_range

TASK_NOISES = ("label", "batch")


class GradientNoise:
    """Base class: ``noise(grad, t)`` returns a perturbed copy of ``grad`` (never modifies it)."""

    name: ClassVar[str]
    max_level: ClassVar[float] = math.inf

    def __init__(self, level: float, *, gamma: float = 0.0, seed: int = 0) -> None:
        check_range("level", level, 0.0, self.max_level, high_open=math.isfinite(self.max_level))
        check_range("gamma", gamma, 0.0)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        self.level, self.gamma, self.seed = float(level), float(gamma), seed
        self._generators: dict[torch.device, torch.Generator] = {}

    def level_at(self, t: int) -> float:
        """``σ_t = σ / (1 + t)^(γ/2)``, i.e. ``σ_t² = σ²/(1 + t)^γ``."""
        return self.level / (1.0 + t) ** (self.gamma / 2)

    def reset(self) -> None:
        """Restart every generator from ``seed``."""
        self._generators.clear()

    def generator(self, device: torch.device) -> torch.Generator:
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device).manual_seed(self.seed)
        return self._generators[device]

    def __call__(self, grad: Tensor, t: int = 0) -> Tensor:
        if grad.is_sparse:
            raise TypeError(f"{type(self).__name__} needs dense gradients, got layout {grad.layout}")
        level = self.level_at(t)
        if level == 0.0:
            return grad.clone()
        work = grad.to(torch.promote_types(grad.dtype, torch.float32))
        return self._perturb(work, level, self.generator(grad.device)).to(grad.dtype)

    def _perturb(self, g: Tensor, level: float, gen: torch.Generator) -> Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        opts = {"level": self.level, **self._options(), "gamma": self.gamma, "seed": self.seed}
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in opts.items())})"

    def _options(self) -> dict[str, Any]:
        return {}


def _randn(g: Tensor, gen: torch.Generator) -> Tensor:
    return torch.randn(g.shape, generator=gen, device=g.device, dtype=g.dtype)


class _AdditiveNoise(GradientNoise):
    """``g + σ_t·s·ξ`` with ``s = RMS(g)`` (``relative``) or 1, ``ξ`` unit-variance draws."""

    def __init__(self, level: float, *, relative: bool = True, gamma: float = 0.0, seed: int = 0) -> None:
        super().__init__(level, gamma=gamma, seed=seed)
        if not isinstance(relative, bool):
            raise TypeError(f"relative must be a bool, got {type(relative).__name__}")
        self.relative = relative

    def _perturb(self, g: Tensor, level: float, gen: torch.Generator) -> Tensor:
        scale = g.pow(2).mean().sqrt() * level if self.relative else level
        return g + scale * self._draw(g, gen)

    def _draw(self, g: Tensor, gen: torch.Generator) -> Tensor:
        raise NotImplementedError

    def _options(self) -> dict[str, Any]:
        return {"relative": self.relative}


class GaussianNoise(_AdditiveNoise):
    """Additive Gaussian noise, std ``σ_t·RMS(g)`` (relative) or ``σ_t`` (absolute)."""

    name = "gaussian"

    def _draw(self, g: Tensor, gen: torch.Generator) -> Tensor:
        return _randn(g, gen)


class StudentTNoise(_AdditiveNoise):
    """Additive Student-t noise with ``dof`` ν: ``ξ = z/√(v/ν)``, ``z ~ N(0,1)``, ``v ~ χ²_ν``, scaled by
    ``√((ν−2)/ν)`` when ν > 2 so that its std is ``σ_t·s`` like ``GaussianNoise`` (for ν ≤ 2 the
    variance is infinite and ``σ_t·s`` is the t scale)."""

    name = "student_t"

    def __init__(self, level: float, *, dof: float = 3.0, relative: bool = True, gamma: float = 0.0,
                 seed: int = 0) -> None:
        super().__init__(level, relative=relative, gamma=gamma, seed=seed)
        check_range("dof", dof, 0.0, low_open=True)
        self.dof = float(dof)

    def _draw(self, g: Tensor, gen: torch.Generator) -> Tensor:
        nu = self.dof
        chi2 = 2.0 * torch._standard_gamma(torch.full_like(g, nu / 2), generator=gen)
        t = _randn(g, gen) / (chi2 / nu).sqrt()
        return t * math.sqrt((nu - 2) / nu) if nu > 2 else t

    def _options(self) -> dict[str, Any]:
        return {"dof": self.dof, **super()._options()}


class MultiplicativeNoise(GradientNoise):
    """``g ⊙ (1 + σ_t·ξ)``, ``ξ ~ N(0, 1)``: noise proportional to each coordinate's magnitude."""

    name = "multiplicative"

    def _perturb(self, g: Tensor, level: float, gen: torch.Generator) -> Tensor:
        return g * (1.0 + level * _randn(g, gen))


class DropoutNoise(GradientNoise):
    """Random coordinate drop-out: each coordinate is zeroed with probability ``σ_t`` (``level`` in
    [0, 1)) and the survivors scaled by ``1/(1 − σ_t)``, so the noisy gradient is unbiased."""

    name = "dropout"
    max_level = 1.0

    def _perturb(self, g: Tensor, level: float, gen: torch.Generator) -> Tensor:
        keep = torch.rand(g.shape, generator=gen, device=g.device, dtype=g.dtype) >= level
        return torch.where(keep, g / (1.0 - level), torch.zeros_like(g))


NOISES: dict[str, type[GradientNoise]] = {
    cls.name: cls for cls in (GaussianNoise, StudentTNoise, MultiplicativeNoise, DropoutNoise)
}


def make_noise(name: str, level: float, **options: Any) -> GradientNoise:
    """The gradient-noise model ``name`` (one of ``NOISES``) at ``level``; ``options`` go to its class."""
    if name not in NOISES:
        raise ValueError(f"unknown noise {name!r}; accepted: {sorted(NOISES)}")
    return NOISES[name](level, **options)


class NoisyGradients:
    """Make ``optimizer`` step on noisy copies of the gradients, through its step pre/post hooks.

    Before each ``optimizer.step()`` every ``p.grad`` is replaced by ``noise(p.grad, t)``
    (``t`` = steps taken since attaching; a ``closure`` passed to ``step`` is wrapped so the gradients it
    computes are perturbed); after the step the clean gradients are put back.  The training loop, LR
    schedulers and the optimizer's own code are untouched.  ``remove()`` detaches the noise.  If ``step``
    raises, the noisy gradients stay in ``p.grad``.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, noise: GradientNoise) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if not isinstance(noise, GradientNoise):
            raise TypeError(f"noise must be a GradientNoise (see make_noise), got {type(noise).__name__}")
        self.optimizer, self.noise, self.steps = optimizer, noise, 0
        self._clean: list[tuple[Tensor, Tensor]] = []
        self._handles = [optimizer.register_step_pre_hook(self._pre_step),
                         optimizer.register_step_post_hook(self._post_step)]

    def _perturb(self) -> None:
        params = [p for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None]
        self._clean = [(p, p.grad) for p in params]
        for p in params:
            p.grad = self.noise(p.grad, self.steps)

    def _pre_step(self, optimizer: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        # torch passes step's own arguments: args = (optimizer, closure?) or closure= in kwargs
        closure = kwargs.get("closure", args[1] if len(args) > 1 else None)
        if closure is None:
            self._perturb()
            return None

        def noisy_closure() -> Any:
            loss = closure()
            self._perturb()
            return loss

        if "closure" in kwargs:
            return args, {**kwargs, "closure": noisy_closure}
        return (args[0], noisy_closure, *args[2:]), kwargs

    def _post_step(self, optimizer: Any, args: tuple, kwargs: dict) -> None:
        for p, clean in self._clean:
            p.grad = clean
        self._clean = []
        self.steps += 1

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


class NoiseHooks:
    """Handle returned by ``register_noise_hooks``; ``remove()`` detaches every hook."""

    def __init__(self, params: list[Tensor], noise: GradientNoise) -> None:
        self.noise = noise
        self.calls = [0] * len(params)
        self._handles = [p.register_hook(self._hook(i)) for i, p in enumerate(params)]

    def _hook(self, i: int):
        def hook(grad: Tensor) -> Tensor:
            noisy = self.noise(grad, self.calls[i])
            self.calls[i] += 1
            return noisy
        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def register_noise_hooks(model: nn.Module | Iterable[Tensor], noise: GradientNoise) -> NoiseHooks:
    """Perturb the gradient of every trainable parameter of ``model`` as backward computes it.

    ``t`` in the schedule counts the backward passes through each parameter (one per step without
    gradient accumulation); each backward pass draws fresh noise.
    """
    if not isinstance(noise, GradientNoise):
        raise TypeError(f"noise must be a GradientNoise (see make_noise), got {type(noise).__name__}")
    params = list(model.parameters() if isinstance(model, nn.Module) else model)
    return NoiseHooks([p for p in params if p.requires_grad], noise)


def corrupt_labels(labels: Tensor, fraction: float, num_classes: int, generator: torch.Generator) -> Tensor:
    """Label noise: a copy of ``labels`` (any shape, e.g. next-token targets) with ``round(fraction·n)``
    of its ``n`` entries, chosen at random, replaced by a uniformly drawn *different* class."""
    check_range("fraction", fraction, 0.0, 1.0)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
    flat = labels.reshape(-1)
    n = flat.numel()
    chosen = torch.randperm(n, generator=generator)[: round(fraction * n)]
    shift = torch.randint(1, num_classes, (chosen.numel(),), generator=generator)
    noisy = flat.clone()
    noisy[chosen] = (flat[chosen] + shift) % num_classes
    return noisy.reshape(labels.shape)


def batch_size_for_level(n: int, level: float) -> int:
    """Small-batch noise: ``B = round(n/(1 + level))``, so the minibatch gradient's variance
    ``S²(1/B − 1/n) ≈ level·S²/n`` grows linearly with ``level`` (``level = 0`` is the full batch)."""
    check_range("level", level, 0.0)
    return max(1, round(n / (1.0 + level)))
