"""``deepopt.schedules``: the warm-up + cosine schedule the studies give their baselines."""

import math

import torch

from deepopt.hope.train import lr_at
from deepopt.schedules import warmup_cosine, warmup_cosine_factor


def test_warmup_is_linear_then_cosine_reaches_its_floor():
    steps, warmup = 100, 10
    assert [warmup_cosine_factor(t, steps, warmup) for t in range(3)] == [0.1, 0.2, 0.3]
    assert warmup_cosine_factor(9, steps, warmup) == 1.0 and warmup_cosine_factor(10, steps, warmup) == 1.0
    assert math.isclose(warmup_cosine_factor(55, steps, warmup), 0.5)
    assert math.isclose(warmup_cosine_factor(100, steps, warmup), 0.0, abs_tol=1e-12)
    assert math.isclose(warmup_cosine_factor(100, steps, warmup, floor=0.1), 0.1)
    assert warmup_cosine_factor(200, steps, warmup, floor=0.1) == warmup_cosine_factor(100, steps, warmup, floor=0.1)
    assert warmup_cosine_factor(80, steps, warmup, cosine=False) == 1.0
    values = [warmup_cosine_factor(t, steps, warmup) for t in range(warmup, steps + 1)]
    assert all(b <= a for a, b in zip(values, values[1:]))


def test_the_scheduler_and_hope_training_read_the_same_schedule():
    param = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([param], lr=0.3)
    scheduler = warmup_cosine(opt, 40)  # 2 warm-up steps
    for t in range(45):
        assert math.isclose(opt.param_groups[0]["lr"], 0.3 * warmup_cosine_factor(t, 40, 2)), t
        opt.step()
        scheduler.step()
    assert lr_at(5, 0.3, 40, 2, "cosine") == 0.3 * warmup_cosine_factor(5, 40, 2, floor=0.1)
    assert lr_at(5, 0.3, 40, 2, "constant") == 0.3 and lr_at(0, 0.3, 40, 2, "constant") == 0.15
