"""Learning on real data: the memory optimizers train a 2-layer MLP on scikit-learn's digits."""

import pytest
import torch

import deepopt
from deepopt.data import fit_digits, load_classification


def digits_accuracy(opt_cls, lr: float, steps: int = 300, seed: int = 0) -> float:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
    return fit_digits(model, opt_cls(model.parameters(), lr=lr), steps, seed)[0]


@pytest.mark.parametrize("opt_cls,lr", [(deepopt.DeltaMomentum, 0.03), (deepopt.DeepMomentum, 0.1)])
def test_reaches_90_percent_on_held_out_digits(opt_cls, lr):
    assert digits_accuracy(opt_cls, lr) >= 0.90


def test_data_split_is_deterministic_and_disjoint():
    a = load_classification("digits", seed=3)
    b = load_classification("digits", seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    xtr, _, xte, _ = a
    assert len(xtr) + len(xte) == 1797 and len(xte) == 359
    with pytest.raises(ValueError, match="accepted"):
        load_classification("mnist")
