"""Meta-training deepopt optimizers through unrolled inner loops (torch.func, higher, ES).

    from deepopt.meta_train import MetaParams, Unroll, Backprop, AntitheticES, InnerState, sample_task
    meta = MetaParams("deep_momentum", lr=0.03)              # learns θ₀ = (W1, W2), α, η, lr
    task = sample_task("digits", seed=0)
    est = Backprop()(Unroll(meta, task, steps=20), InnerState.fresh(task))   # est.loss, est.grads

Importing the package registers every deepopt optimizer with ``higher`` (see ``higher_backend``).
"""

from .es import PES, AntitheticES
from .evaluate import evaluate, load_learned, loss_curve, speedup
from .higher_backend import DifferentiableMemoryOptimizer, higher_unroll_loss
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
    "DifferentiableMemoryOptimizer",
    "InnerState",
    "MetaGrad",
    "MetaParams",
    "MetaTrainConfig",
    "MetaTrainer",
    "Task",
    "Unroll",
    "evaluate",
    "held_out_task",
    "higher_unroll_loss",
    "load_learned",
    "loss_curve",
    "quadratic_task",
    "sample_task",
    "speedup",
]
