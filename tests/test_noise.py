import math

import pytest
import torch

import deepopt
from deepopt.noise import (
    NOISES,
    DropoutNoise,
    GaussianNoise,
    MultiplicativeNoise,
    NoisyGradients,
    StudentTNoise,
    batch_size_for_level,
    corrupt_labels,
    make_noise,
    register_noise_hooks,
)

N = 400_000  # draws per statistics check: the std's standard error is ~0.1-0.3%


def grad(n: int = N, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=dtype) * 3.0 + 0.5


def rms(g: torch.Tensor) -> float:
    return float(g.pow(2).mean().sqrt())


def within(value: float, target: float, rel: float = 0.05) -> bool:
    return abs(value - target) <= rel * target


@pytest.mark.parametrize("relative", [True, False])
@pytest.mark.parametrize("cls, options", [(GaussianNoise, {}), (StudentTNoise, {"dof": 6.0})])
def test_additive_noise_has_requested_std(cls, options, relative):
    g = grad()
    level = 0.7
    noise = (cls(level, relative=relative, seed=1, **options)(g) - g)
    target = level * (rms(g) if relative else 1.0)
    assert within(float(noise.std()), target)
    assert abs(float(noise.mean())) < 0.01 * target


def test_student_t_tails_are_heavier_than_gaussian():
    g = torch.ones(N, dtype=torch.float64)
    gauss = GaussianNoise(1.0, seed=0)(g) - g
    heavy = StudentTNoise(1.0, dof=3.0, seed=0)(g) - g
    assert within(float(heavy.std()), 1.0, rel=0.25)  # infinite kurtosis: the std converges slowly
    gauss_tail = int((gauss.abs() > 4).sum())
    heavy_tail = int((heavy.abs() > 4).sum())
    assert gauss_tail < 0.0002 * N  # P(|N(0,1)| > 4) = 6e-5
    assert heavy_tail > 20 * max(gauss_tail, 1)
    excess_kurtosis = lambda x: float(((x - x.mean()) ** 4).mean() / x.var() ** 2 - 3)
    assert abs(excess_kurtosis(gauss)) < 0.1 and excess_kurtosis(heavy) > 3


def test_multiplicative_noise_scales_with_each_coordinate():
    g = grad()
    noisy = MultiplicativeNoise(0.5, seed=2)(g)
    assert within(float(((noisy - g) / g).std()), 0.5)


def test_dropout_noise_is_unbiased_with_requested_drop_rate():
    g = torch.full((N,), 2.0, dtype=torch.float64)
    p = 0.3
    noisy = DropoutNoise(p, seed=3)(g)
    assert within(float((noisy == 0).double().mean()), p, rel=0.02)
    assert within(float(noisy.mean()), 2.0, rel=0.01)
    assert within(float((noisy - g).std()), 2.0 * math.sqrt(p / (1 - p)))


def test_decaying_schedule():
    noise = GaussianNoise(2.0, gamma=1.0, seed=0)
    assert noise.level_at(0) == 2.0 and noise.level_at(3) == pytest.approx(1.0)
    g = grad()
    assert within(float((noise(g, t=99) - g).std()), 0.2 * rms(g))


@pytest.mark.parametrize("name", sorted(NOISES))
def test_same_seed_same_noise_and_global_rng_untouched(name):
    g = grad(1000)
    state = torch.get_rng_state()
    a, b = make_noise(name, 0.5, seed=7), make_noise(name, 0.5, seed=7)
    first = [a(g, t) for t in range(3)]
    assert all(torch.equal(x, b(g, t)) for t, x in enumerate(first))
    assert not torch.equal(first[0], first[1])
    assert not torch.equal(first[0], make_noise(name, 0.5, seed=8)(g))
    a.reset()
    assert torch.equal(a(g, 0), first[0])
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(make_noise(name, 0.0)(g), g)  # level 0 is exactly clean


def test_low_precision_gradients_keep_their_dtype():
    g = grad(1000, dtype=torch.bfloat16)
    for name in NOISES:
        assert make_noise(name, 0.5)(g).dtype == torch.bfloat16


def test_bad_arguments_name_the_choices():
    with pytest.raises(ValueError, match="accepted: .*gaussian.*student_t"):
        make_noise("pink", 0.1)
    with pytest.raises(ValueError, match="level must be in"):
        make_noise("gaussian", -0.1)
    with pytest.raises(ValueError, match="level must be in"):
        make_noise("dropout", 1.0)
    with pytest.raises(ValueError, match="dof"):
        make_noise("student_t", 1.0, dof=0.0)
    with pytest.raises(ValueError, match="gamma"):
        make_noise("gaussian", 1.0, gamma=-1.0)
    with pytest.raises(TypeError, match="relative"):
        make_noise("gaussian", 1.0, relative="yes")
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        NoisyGradients([torch.zeros(1)], make_noise("gaussian", 1.0))
    with pytest.raises(TypeError, match="GradientNoise"):
        register_noise_hooks(torch.nn.Linear(2, 2), 0.5)
    with pytest.raises(ValueError, match="fraction"):
        corrupt_labels(torch.zeros(4, dtype=torch.long), 1.5, 3, torch.Generator())


def linear_problem(seed: int = 0) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    model = torch.nn.Linear(6, 3, bias=False).double()
    x = torch.randn(16, 6, dtype=torch.float64)
    return model, x, torch.randn(16, 3, dtype=torch.float64)


def test_noisy_gradients_steps_on_noisy_copies_and_restores_clean_grads():
    model, x, y = linear_problem()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=1.0)  # schedulers keep working
    noisy = NoisyGradients(opt, GaussianNoise(0.5, seed=4))
    reference = GaussianNoise(0.5, seed=4)
    for t in range(3):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        w, g = model.weight.detach().clone(), model.weight.grad.clone()
        opt.step()
        sched.step()
        torch.testing.assert_close(model.weight.detach(), w - reference(g, t))
        assert torch.equal(model.weight.grad, g)
    assert noisy.steps == 3
    noisy.remove()
    w, g = model.weight.detach().clone(), model.weight.grad.clone()
    opt.step()
    torch.testing.assert_close(model.weight.detach(), w - g)


@pytest.mark.parametrize("by_keyword", [False, True])
def test_noisy_gradients_perturbs_grads_computed_by_a_closure(by_keyword):
    model, x, y = linear_problem()
    opt = deepopt.SGD(model.parameters(), lr=1.0)
    NoisyGradients(opt, GaussianNoise(0.5, seed=5))

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    w = model.weight.detach().clone()
    loss = opt.step(closure=closure) if by_keyword else opt.step(closure)
    assert loss is not None
    torch.testing.assert_close(model.weight.detach(), w - GaussianNoise(0.5, seed=5)(model.weight.grad))


def test_model_hooks_match_the_optimizer_wrapper():
    """With one parameter tensor both mechanisms draw the same noise for the same seed."""
    finals = []
    for use_hooks in (False, True):
        model, x, y = linear_problem()
        opt = deepopt.Momentum(model.parameters(), lr=0.1)
        noise = StudentTNoise(1.0, dof=4.0, gamma=0.5, seed=6)
        handle = register_noise_hooks(model, noise) if use_hooks else NoisyGradients(opt, noise)
        for _ in range(4):
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
        handle.remove()
        finals.append(model.weight.detach().clone())
    torch.testing.assert_close(finals[0], finals[1], rtol=0, atol=0)
    clean, _, _ = linear_problem()
    assert not torch.allclose(finals[0], clean.weight)


@pytest.mark.parametrize("shape", [(1000,), (40, 25)])  # class labels, or next-token targets (n, T)
def test_corrupt_labels_flips_exactly_the_requested_fraction(shape):
    labels = (torch.arange(1000) % 10).reshape(shape)
    noisy = corrupt_labels(labels, 0.3, 10, torch.Generator().manual_seed(0))
    changed = noisy != labels
    assert noisy.shape == labels.shape and int(changed.sum()) == 300
    assert noisy.min() >= 0 and noisy.max() < 10
    assert torch.equal(labels.flatten(), torch.arange(1000) % 10)  # input untouched
    assert torch.equal(noisy, corrupt_labels(labels, 0.3, 10, torch.Generator().manual_seed(0)))


def test_batch_size_for_level():
    assert batch_size_for_level(1000, 0.0) == 1000
    assert batch_size_for_level(1000, 9.0) == 100
    assert batch_size_for_level(10, 1e6) == 1
    with pytest.raises(ValueError, match="level"):
        batch_size_for_level(10, -1.0)
