"""Real data that ships offline: scikit-learn's bundled data sets as tensors, split deterministically."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

DATASETS = ("digits", "breast_cancer", "wine", "iris")


def load_classification(name: str = "digits", test_fraction: float = 0.2, seed: int = 0,
                        dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(x_train, y_train, x_test, y_test)`` of a scikit-learn bundled data set, features standardised
    with the training split's mean and std; the split is a seeded permutation."""
    from sklearn import datasets

    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; accepted: {DATASETS}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    bunch = getattr(datasets, f"load_{name}")()
    x, y = np.asarray(bunch.data, dtype=np.float64), np.asarray(bunch.target, dtype=np.int64)
    perm = np.random.default_rng(seed).permutation(len(x))
    n_test = int(round(test_fraction * len(x)))
    test, train = perm[:n_test], perm[n_test:]
    mean, std = x[train].mean(0), x[train].std(0)
    std[std == 0] = 1.0
    x = (x - mean) / std
    as_x = lambda idx: torch.as_tensor(x[idx], dtype=dtype)  # noqa: E731
    as_y = lambda idx: torch.as_tensor(y[idx])  # noqa: E731
    return as_x(train), as_y(train), as_x(test), as_y(test)


def digits_cnn(seed: int = 0) -> torch.nn.Module:
    """The small digits CNN the comparisons use: two 3×3 convolutions (8, 16 channels) and a linear head,
    initialised from ``seed``."""
    nn = torch.nn
    torch.manual_seed(seed)
    return nn.Sequential(nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Conv2d(8, 16, 3), nn.ReLU(),
                         nn.Flatten(), nn.Linear(256, 10))


def fit_digits(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: int, seed: int = 0,
               batch_size: int = 64) -> tuple[float, float]:
    """Train ``model`` with ``opt`` for ``steps`` cross-entropy steps on minibatches of digits' training split
    (drawn from ``seed``); returns (held-out accuracy, loss on the whole training split)."""
    xtr, ytr, xte, yte = load_classification("digits", test_fraction=0.2, seed=0)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(xtr), (batch_size,), generator=gen)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(xtr[idx]), ytr[idx]).backward()
        opt.step()
    with torch.no_grad():
        accuracy = (model(xte).argmax(1) == yte).double().mean().item()
        return accuracy, float(torch.nn.functional.cross_entropy(model(xtr), ytr))
