"""Learning on real data: the memory optimizers train a 2-layer MLP on scikit-learn's digits."""

import pytest
import torch

import deepopt
from deepopt.data import load_classification


def digits_accuracy(opt_cls, lr: float, steps: int = 300, seed: int = 0) -> float:
    xtr, ytr, xte, yte = load_classification("digits", test_fraction=0.2, seed=0)
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
    opt = opt_cls(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(xtr), (64,), generator=gen)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(xtr[idx]), ytr[idx]).backward()
        opt.step()
    with torch.no_grad():
        return (model(xte).argmax(1) == yte).float().mean().item()


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
