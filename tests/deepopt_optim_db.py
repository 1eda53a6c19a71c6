"""``OptimizerInfo`` entries for every deepopt class, in the form of torch's
``torch.testing._internal.common_optimizers.optim_db``, so PyTorch's generic optimizer tests
(``test_torch_optim_renewed.py``, vendored from ``test/test_optim.py``) run against them.

Each entry lists the configurations its class is tested in (``optim_inputs_func``: no ``foreach``/``fused``,
which the tests add themselves), the errors it must raise (``optim_error_inputs_func``: torch's checks for every
optimizer plus ours) and the allow-list: tests that do not apply, each skipped with its reason (``ALLOW_LIST``).
Two options that read 2-D structure (Newton–Schulz on Momentum, ``keys="rows"`` on DeltaMomentum) refuse complex
parameters; they get entries of their own (test-only subclasses named after the configuration) so the complex
tests keep covering every other configuration of those classes.
"""

from __future__ import annotations

import unittest

import torch
from torch.nn import Parameter
from torch.optim.lr_scheduler import (
    ConstantLR,
    ExponentialLR,
    LinearLR,
    PolynomialLR,
    ReduceLROnPlateau,
    StepLR,
)
from torch.testing._internal.common_methods_invocations import DecorateInfo
from torch.testing._internal.common_optimizers import (
    ErrorOptimizerInput,
    OptimizerErrorEnum,
    OptimizerInfo,
    OptimizerInput,
    get_error_inputs_for_all_optims,
)

import deepopt


class MomentumNewtonSchulz(deepopt.Momentum):
    """``Momentum(nesterov=True, nonlinearity="newton_schulz")``, i.e. Muon (its own entry: no complex)."""

    def __init__(self, params, lr=0.02, momentum=0.95, nesterov=True, nonlinearity="newton_schulz", **options):
        super().__init__(params, lr=lr, momentum=momentum, nesterov=nesterov, nonlinearity=nonlinearity, **options)


class MomentumRelativeEps(deepopt.Momentum):
    """``Momentum(preconditioner="adam", relative_eps=1.0)`` (its own entry: a per-tensor statistic, see
    ``_PER_TENSOR_PEAK``)."""

    def __init__(self, params, preconditioner="adam", relative_eps=1.0, **options):
        super().__init__(params, preconditioner=preconditioner, relative_eps=relative_eps, **options)


class DeltaMomentumRows(deepopt.DeltaMomentum):
    """``DeltaMomentum(keys="rows")`` (its own entry: no complex)."""

    def __init__(self, params, keys="rows", **options):
        super().__init__(params, keys=keys, **options)


def _inputs(*configs: tuple[str, dict], eps_in_fp16: bool = False):
    """An ``optim_inputs_func`` returning ``OptimizerInput(kwargs, desc)`` for each ``(desc, kwargs)``; fresh
    tensors on every call (a test may mutate a tensor lr).  ``eps_in_fp16``: in float16 ``eps = 0.1``, as torch's
    Adam entry sets it (1e-8 rounds to 0 in fp16, so a coordinate whose g² underflowed divides m by 0)."""

    def optim_inputs_func(device, dtype=None):
        inputs = [OptimizerInput(params=None, kwargs={k: v.clone() if isinstance(v, torch.Tensor) else v
                                                      for k, v in kwargs.items()}, desc=desc)
                  for desc, kwargs in configs]
        if eps_in_fp16 and dtype == torch.float16:
            for optim_input in inputs:
                optim_input.kwargs["eps"] = 0.1
        return inputs

    return optim_inputs_func


def _errors(*extra: tuple[dict, type, str]):
    """torch's error inputs for every optimizer, plus ``(kwargs, error type, message regex)`` of our own."""

    def optim_error_inputs_func(device, dtype):
        inputs = get_error_inputs_for_all_optims(device, dtype)
        if torch.device(device).type == "cpu":
            inputs += [ErrorOptimizerInput(OptimizerInput(params=None, kwargs=kwargs, desc=regex),
                                           error_type=error, error_regex=regex,
                                           error_on=OptimizerErrorEnum.CONSTRUCTION_ERROR)
                       for kwargs, error, regex in extra]
            sample = Parameter(torch.randn(4, 3, device=device, dtype=dtype))
            sample.grad = torch.full_like(sample, float("nan"))
            inputs.append(ErrorOptimizerInput(
                OptimizerInput(params=[sample], kwargs={"nonfinite": "raise"}, desc="nonfinite='raise' on NaN"),
                error_type=ValueError, error_regex="holds NaN or Inf", error_on=OptimizerErrorEnum.STEP_ERROR))
        return inputs

    return optim_error_inputs_func


TENSOR_LR = ("tensor lr", {"lr": torch.tensor(0.001)})
SKIP_NONFINITE = ("nonfinite='skip'", {"nonfinite": "skip"})
CAPTURABLE = ("capturable", {"capturable": True})
SCHEDULERS = (
    [lambda opt: StepLR(opt, gamma=0.9, step_size=10)],
    [lambda opt: LinearLR(opt, start_factor=0.4, end_factor=0.8, total_iters=4)],
    [lambda opt: ConstantLR(opt, factor=0.4, total_iters=4), lambda opt: ExponentialLR(opt, gamma=0.9)],
    [lambda opt: ExponentialLR(opt, gamma=0.9), lambda opt: ReduceLROnPlateau(opt)],
    [lambda opt: PolynomialLR(opt, power=0.9, total_iters=4)],
)

# The allow-list: (class name, test name, reason).  Nothing else may fail.
_ONE_MEMORY = ("treats a complex tensor as one memory: its real view is one key (the delta rule's ⟨m, k̂⟩ and "
               "k̂ = g/‖g‖, the deep memory's RMS block norms span real and imaginary parts), so it cannot equal the "
               "same values split into two real tensors, two memories; test_complex (a complex tensor steps as its "
               "real view) passes")
_PER_TENSOR_PEAK = ("relative_eps floors Adam's denominator at the tensor's peak gradient RMS, a statistic of the "
                    "whole real view, so a complex tensor cannot equal its parts split into two real tensors; "
                    "test_complex (a complex tensor steps as its real view) passes")
ALLOW_LIST = [
    ("MomentumRelativeEps", "test_complex_2d", _PER_TENSOR_PEAK),
    ("DeltaMomentum", "test_complex_2d", _ONE_MEMORY),
    ("DeepMomentum", "test_complex_2d", _ONE_MEMORY),
]


def _allow_listed(name: str) -> list[DecorateInfo]:
    return [DecorateInfo(unittest.skip(reason), "TestOptimRenewed", test) for cls, test, reason in ALLOW_LIST
            if cls == name]


def _info(cls, inputs, errors=(), *, complex_ok=True, fused=False):
    return OptimizerInfo(
        cls, optim_inputs_func=inputs, optim_error_inputs_func=_errors(*errors), scheduler_inputs=SCHEDULERS,
        supported_impls=("foreach", "fused") if fused else ("foreach",),
        supports_fused_on=("cpu", "cuda") if fused else (),
        not_og_supported_flags=("foreach", "capturable", "nonfinite", "fused"),
        supports_complex=complex_ok, has_capturable_arg=True, skips=_allow_listed(cls.__name__),
    )


def _adam_inputs(decoupled_default: bool):
    return _inputs(
        ("default", {}), ("non-default lr", {"lr": 0.01}), TENSOR_LR, ("betas", {"betas": (0.8, 0.99)}),
        ("weight_decay", {"weight_decay": 0.1}),
        ("coupled weight decay" if decoupled_default else "decoupled weight decay",
         {"weight_decay": 0.1, "decoupled_weight_decay": not decoupled_default}),
        ("eps", {"eps": 1e-6}), SKIP_NONFINITE, CAPTURABLE, eps_in_fp16=True,
    )


MOMENTUM_ERROR = ({"momentum": -0.5}, ValueError, r"momentum must be in \[0.0, 1.0\)")
optim_db = [
    _info(deepopt.SGD, _inputs(
        ("default", {}), ("non-default lr", {"lr": 1e-2}), TENSOR_LR, ("weight_decay", {"weight_decay": 0.5}),
        ("momentum", {"momentum": 0.9}), ("nesterov", {"momentum": 0.9, "nesterov": True, "weight_decay": 0.1}),
        SKIP_NONFINITE, CAPTURABLE,
    ), [({"lr": -0.1}, ValueError, r"lr must be in \[0.0, inf\)")]),
    _info(deepopt.Momentum, _inputs(
        ("default", {}), ("non-default lr", {"lr": 1e-2}), TENSOR_LR, ("nesterov", {"nesterov": True}),
        ("weight_decay", {"weight_decay": 0.1}),
        ("decoupled weight decay", {"weight_decay": 0.1, "decoupled_weight_decay": True}),
        ("Adam preconditioner", {"preconditioner": "adam"}), SKIP_NONFINITE, CAPTURABLE,
    ), [MOMENTUM_ERROR, ({"preconditioner": "lbfgs"}, ValueError, "preconditioner must be one of")]),
    _info(MomentumRelativeEps, _inputs(
        ("default", {}), TENSOR_LR, ("nesterov, weight_decay", {"nesterov": True, "weight_decay": 0.1}),
        ("relative eps 0.1", {"relative_eps": 0.1}), SKIP_NONFINITE, CAPTURABLE,
    ), [({"relative_eps": -1.0}, ValueError, r"relative_eps must be in \[0.0, inf\)")]),
    _info(MomentumNewtonSchulz, _inputs(
        ("default", {}), TENSOR_LR, ("weight_decay", {"weight_decay": 0.1, "decoupled_weight_decay": True}),
        ("bf16 Newton–Schulz", {"ns_dtype": "bfloat16"}), SKIP_NONFINITE,
    ), [MOMENTUM_ERROR], complex_ok=False),
    _info(deepopt.Adam, _adam_inputs(False), [({"betas": (1.0, 0.99)}, ValueError, r"betas\[0\]")], fused=True),
    _info(deepopt.AdamW, _adam_inputs(True), [({"eps": -1.0}, ValueError, "eps")], fused=True),
    _info(deepopt.DeltaMomentum, _inputs(
        ("default", {}), ("non-default lr", {"lr": 1e-2}), TENSOR_LR, ("beta", {"beta": 1.5}),
        ("weight_decay", {"weight_decay": 0.1}), ("Adam preconditioner", {"preconditioner": "adam"}),
        ("Adam preconditioner, relative eps", {"preconditioner": "adam", "relative_eps": 1.0}),
        SKIP_NONFINITE, CAPTURABLE,
    ), [({"beta": 2.5}, ValueError, "beta must be in")]),
    _info(DeltaMomentumRows, _inputs(
        ("default", {}), TENSOR_LR, ("beta", {"beta": 1.0}), SKIP_NONFINITE,
    ), [({"keys": "columns"}, ValueError, "keys must be one of")], complex_ok=False),
    _info(deepopt.DeepMomentum, _inputs(
        ("default", {}), ("non-default lr", {"lr": 1e-2}), TENSOR_LR, ("relu features", {"hidden": 4,
                                                                                           "activation": "relu"}),
        ("l2 objective, Adam preconditioner", {"objective": "l2", "preconditioner": "adam"}),
        ("keys from the preconditioned gradient", {"preconditioner": "adam", "key_source": "preconditioned"}),
        ("1/t lr decay", {"lr_decay": 0.1}), ("horizon schedule", {"lr_horizon": 50, "lr_power": 2.0}),
        ("decoupled weight decay", {"weight_decay": 0.1, "decoupled_weight_decay": True}),
        ("no deep branch", {"hidden": 0}),
        ("momenta keys, DoG, relative eps (the shipped layout)", {"preconditioner": "adam", "keys": "momenta",
                                                                  "lr_adapt": "dog", "lr": 1.0,
                                                                  "relative_eps": 3.0}),
        SKIP_NONFINITE, CAPTURABLE,
    ), [({"hidden": -1}, ValueError, "hidden must be an int >= 0")]),
    _info(deepopt.M3, _inputs(
        ("default", {}), ("non-default lr", {"lr": 0.05}), TENSOR_LR, ("chunk 2", {"chunk": 2}),
        ("second moment", {"second_moment": True, "lr": 1e-3}), ("Algorithm 1 as printed", {"paper": True,
                                                                                            "lr": 1e-3}),
        ("no Nesterov, alpha 1", {"nesterov": False, "alpha": 1.0, "chunk": 1}),
        ("weight_decay", {"weight_decay": 0.1}), ("bf16 Newton–Schulz", {"ns_dtype": "bfloat16"}),
        SKIP_NONFINITE, CAPTURABLE,
    ), [({"chunk": 0}, ValueError, "chunk must be an int >= 1"),
        ({"paper": True, "nesterov": True}, TypeError, "paper=True")], complex_ok=False),
]
