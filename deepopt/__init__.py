"""deepopt: optimizers as associative memories (Nested Learning), as ``torch.optim`` optimizers.

    import deepopt
    opt = deepopt.DeepMomentum(model.parameters(), lr=1e-2)

The pure rules live in ``deepopt.rules``; the optimizer classes in ``deepopt.optimizers`` (the
repository's ``optimizers/`` folder), re-exported here (lazily, since ``deepopt.optimizers`` itself imports
``deepopt.rules``), as are the submodules ``deepopt.hope``, ``deepopt.noise``, ``deepopt.meta_train`` and
``deepopt.robustness``.
"""

from typing import Any

from . import rules
from .rules import RULES, get_rule

__version__ = "0.1.0"

_FROM_OPTIMIZERS = ("SGD", "Adam", "AdamW", "DeepMomentum", "DeltaMomentum", "M3", "MemoryOptimizer", "Momentum",
                    "NonFiniteGradientError")
_SUBMODULES = ("hope", "noise", "robustness", "checkpoint", "data", "bench", "cli", "optimizers", "meta_train")
__all__ = ["OPTIMIZERS", "RULES", *_FROM_OPTIMIZERS, *_SUBMODULES, "get_rule", "rules"]


def __getattr__(name: str) -> Any:
    import importlib

    if name in _SUBMODULES:  # imported on first use: ``import deepopt; deepopt.noise.make_noise(...)``
        return importlib.import_module(f"{__name__}.{name}")
    optimizers = importlib.import_module(f"{__name__}.optimizers")
    if name in _FROM_OPTIMIZERS:
        return getattr(optimizers, name)
    if name == "OPTIMIZERS":  # name -> class, as the CLIs spell them
        return {"sgd": optimizers.SGD, "momentum": optimizers.Momentum, "adam": optimizers.Adam,
                "adamw": optimizers.AdamW, "delta_momentum": optimizers.DeltaMomentum,
                "deep_momentum": optimizers.DeepMomentum, "m3": optimizers.M3}
    raise AttributeError(f"module 'deepopt' has no attribute {name!r}")
