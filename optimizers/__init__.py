"""``torch.optim.Optimizer`` classes, each applying one deepopt rule."""

from .adam import Adam, AdamW
from .base import MemoryOptimizer, NonFiniteGradientError
from .deep_momentum import DeepMomentum
from .delta_momentum import DeltaMomentum
from .m3 import M3
from .momentum import Momentum
from .sgd import SGD

__all__ = ["SGD", "Adam", "AdamW", "DeepMomentum", "DeltaMomentum", "M3", "MemoryOptimizer", "Momentum",
           "NonFiniteGradientError"]
