"""Meta-training deepopt optimizers through unrolled inner loops (torch.func, higher, ES).

    from deepopt.meta_train import MetaParams, Unroll, Backprop, AntitheticES, InnerState, sample_task
    meta = MetaParams("deep_momentum", lr=0.03)              # learns θ₀ = (W1, W2), α, η, lr
    task = sample_task("digits", seed=0)
    est = Backprop()(Unroll(meta, task, steps=20), InnerState.fresh(task))   # est.loss, est.grads

Importing the package registers every deepopt optimizer with ``higher`` (see ``higher_backend``) where
``higher`` is installed.  Only that backend needs it: without it the torch.func and ES engines, the task families,
``deepopt meta-train`` and ``deepopt evaluate`` work, and ``DifferentiableMemoryOptimizer`` /
``higher_unroll_loss`` raise a one-line ``ModuleNotFoundError`` naming the package.
"""

from .es import PES, AntitheticES
from .evaluate import evaluate, load_learned, loss_curve, speedup
from .params import LEARNABLE, MetaParams
from .tasks import FAMILIES, HELD_OUT_SPECS, Task, held_out_task, quadratic_task, sample_task
from .trainer import MetaTrainConfig, MetaTrainer
from .unroll import Backprop, InnerState, MetaGrad, Unroll

__all__ = [
    "FAMILIES",
    "HELD_OUT_SPECS",
    "LEARNABLE",
    "PES",
    "AntitheticES",
    "Backprop",
    "InnerState",
    "MetaGrad",
    "MetaParams",
    "MetaTrainConfig",
    "MetaTrainer",
    "Task",
    "Unroll",
    "evaluate",
    "held_out_task",
    "load_learned",
    "loss_curve",
    "quadratic_task",
    "sample_task",
    "speedup",
]

_HIGHER_NAMES = ["DifferentiableMemoryOptimizer", "higher_unroll_loss"]
try:
    from .higher_backend import DifferentiableMemoryOptimizer as DifferentiableMemoryOptimizer
    from .higher_backend import higher_unroll_loss as higher_unroll_loss

    __all__ += _HIGHER_NAMES
except ModuleNotFoundError as err:  # the higher backend alone needs it (an image without it: the H200 run's)
    if err.name != "higher":
        raise

    def __getattr__(name: str):
        if name in _HIGHER_NAMES:
            raise ModuleNotFoundError(f"deepopt.meta_train.{name} needs the 'higher' package, which is not "
                                      "installed (pip install higher)", name="higher")
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
