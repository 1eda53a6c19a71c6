"""Learned optimizers shipped inside the package (``config.json`` + ``memory.safetensors`` per folder, a few KB).

    import deepopt
    opt = deepopt.DeepMomentum.pretrained(model.parameters(), total_steps=10_000)   # the default, DEFAULT
    opt = deepopt.DeepMomentum.from_pretrained("dmgd-general", model.parameters(), total_steps=10_000)   # another

``dmgd-dog`` (the default): ``DeepMomentum(keys="momenta", lr_adapt="dog")``, per-tensor step sizes from the
distance travelled, its lr a multiplier of order 1; chosen among meta-training seeds by ``deepopt select``.
``dmgd-general``: the same recipe at a fixed lr (the default until 2026-12-07).

Each folder also holds ``recipe.json``, the ``deepopt meta-train --config`` file that reproduced it, and
``card.json`` (what it was meta-trained on, its meta-training cost, and its evaluation command); the docs page
``docs/meta-training.md`` has the table.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from deepopt.checkpoint import PRETRAINED_CONFIG, load_pretrained_config

DEFAULT = "dmgd-dog"
_ROOT = Path(__file__).resolve().parent


def names() -> list[str]:
    """The names of the shipped learned optimizers (folders holding a saved optimizer)."""
    return sorted(p.name for p in _ROOT.iterdir() if (p / PRETRAINED_CONFIG).is_file())


def resolve(name_or_path: str | os.PathLike) -> Path:
    """The folder of a shipped optimizer's name, or ``name_or_path`` itself when it is a folder; a name that is
    neither raises ``FileNotFoundError`` listing the shipped names."""
    path = Path(name_or_path)
    if path.is_dir():
        return path
    if isinstance(name_or_path, str) and name_or_path in names():
        return _ROOT / name_or_path
    raise FileNotFoundError(f"{name_or_path!r} is neither a folder nor a shipped learned optimizer; shipped: "
                            f"{names()}")


def hparams(name_or_path: str | os.PathLike = DEFAULT) -> dict[str, Any]:
    """A saved learned optimizer's hyperparameters (its ``config.json``; e.g. ``hparams()["lr"]``, the default's
    learned lr), read without loading its tensors."""
    return load_pretrained_config(resolve(name_or_path))[1]
