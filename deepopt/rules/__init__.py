"""The associative-memory update rules, one pure ``init``/``update`` pair each (see ``base``)."""

from .adam import adam
from .base import Hparams, Rule, State
from .deep import deep_momentum
from .delta import delta_momentum
from .m3 import m3
from .momentum import momentum
from .sgd import sgd
from .transforms import newton_schulz

RULES: dict[str, Rule] = {r.name: r for r in (sgd, momentum, adam, delta_momentum, deep_momentum, m3)}


def get_rule(name: str) -> Rule:
    """The rule called ``name``; ``ValueError`` lists the accepted names."""
    if name not in RULES:
        raise ValueError(f"unknown rule {name!r}; accepted: {sorted(RULES)}")
    return RULES[name]


__all__ = [
    "RULES", "Hparams", "Rule", "State", "adam", "deep_momentum", "delta_momentum", "get_rule",
    "m3", "momentum", "newton_schulz", "sgd",
]
