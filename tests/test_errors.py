"""Bad input gets a clear error naming the argument, and never corrupts state."""

import copy
import math

import pytest
import torch
from conftest import loss_fn, make, small_mlp, train

import deepopt

BAD_HPARAMS = [
    ("sgd", dict(lr=-0.1), ValueError, "lr"),
    ("sgd", dict(lr=math.nan), ValueError, "lr"),
    ("adam", dict(betas=(1.0, 0.999)), ValueError, "betas"),
    ("adam", dict(betas=(0.9, -0.1)), ValueError, "betas"),
    ("adam", dict(betas=0.9), TypeError, "betas"),
    ("adam", dict(eps=-1e-8), ValueError, "eps"),
    ("adamw", dict(weight_decay=-0.1), ValueError, "weight_decay"),
    ("momentum", dict(momentum=1.5), ValueError, "momentum"),
    ("momentum", dict(nesterov=True, momentum=0.0), ValueError, "nesterov"),
    ("momentum", dict(nonlinearity="newton"), ValueError, "nonlinearity"),
    ("momentum", dict(lr="0.1"), TypeError, "lr"),
    ("momentum", dict(relative_eps=3.0), ValueError, "relative_eps.*preconditioner='adam'"),
    ("deep_momentum", dict(relative_eps=1.0, preconditioner="identity"), ValueError, "relative_eps"),
    ("delta_momentum", dict(beta=2.5, momentum=0.9), ValueError, "beta"),
    ("delta_momentum", dict(keys="cols"), ValueError, "keys"),
    ("delta_momentum", dict(preconditioner="shampoo"), ValueError, "preconditioner"),
    ("deep_momentum", dict(activation="swish"), ValueError, "activation"),
    ("deep_momentum", dict(objective="cosine"), ValueError, "objective"),
    ("deep_momentum", dict(hidden=-1), ValueError, "hidden"),
    ("deep_momentum", dict(key_dim=2.5), TypeError, "key_dim"),
    ("deep_momentum", dict(memory_init=(torch.zeros(3, 3), torch.zeros(3, 3))), ValueError, "memory_init"),
    ("deep_momentum", dict(nonfinite="ignore"), ValueError, "nonfinite"),
    ("deep_momentum", dict(momentum=1.0), ValueError, "momentum"),
    ("deep_momentum", dict(objective="l2", eta=2.5), ValueError, "eta"),
    ("deep_momentum", dict(nesterov=True), TypeError, "nesterov"),
]


@pytest.mark.parametrize("name,kwargs,exc,word", BAD_HPARAMS)
def test_bad_hyperparameters_are_named(name, kwargs, exc, word):
    with pytest.raises(exc, match=word):
        make(name, small_mlp().parameters(), **kwargs)


def test_bad_param_group_is_rejected_and_not_added(opt_name):
    model = small_mlp()
    opt = make(opt_name, model[0].parameters())
    with pytest.raises(ValueError, match="lr"):
        opt.add_param_group({"params": model[2].parameters(), "lr": -1.0})
    assert len(opt.param_groups) == 1
    foreign = "eta" if opt_name != "deep_momentum" else "betas"  # another optimizer's hyperparameter
    with pytest.raises(TypeError, match=foreign):
        opt.add_param_group({"params": model[2].parameters(), foreign: 0.5})
    assert len(opt.param_groups) == 1


def test_sparse_gradients_are_rejected(opt_name):
    emb = torch.nn.Embedding(10, 4, sparse=True).double()
    opt = make(opt_name, emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    before = emb.weight.detach().clone()
    with pytest.raises(TypeError, match="sparse"):
        opt.step()
    assert torch.equal(before, emb.weight)


def _poison(model):
    loss_fn(model, 99).backward()
    model[2].bias.grad[0] = math.nan


def test_nonfinite_gradient_raises_before_any_change(opt_name):
    model = small_mlp()
    opt = make(opt_name, model.parameters(), nonfinite="raise")
    train(model, opt, 3)
    params = [p.detach().clone() for p in model.parameters()]
    state = copy.deepcopy(opt.state_dict())
    opt.zero_grad()
    _poison(model)
    with pytest.raises(deepopt.NonFiniteGradientError, match="nonfinite='skip'"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters()))
    assert _equal_state(state, opt.state_dict())


@pytest.mark.parametrize("policy", ["raise", "skip"])
def test_huge_finite_gradients_are_not_mistaken_for_nonfinite(policy):
    """The screen takes each gradient's max-norm, which cannot overflow as a sum of squares would."""
    w = torch.zeros(4, requires_grad=True)
    opt = deepopt.SGD([w], lr=1e-40, nonfinite=policy)
    w.grad = torch.full((4,), 3e38)
    opt.step()
    assert torch.isfinite(w).all() and (w < 0).all()


def test_default_policy_propagates_like_torch(opt_name):
    """``nonfinite="propagate"`` (the default) screens nothing, as torch.optim does: NaN reaches the weights."""
    model = small_mlp()
    opt = make(opt_name, model.parameters())
    _poison(model)
    opt.step()
    assert torch.isnan(model[2].bias).any()


def test_nonfinite_gradient_skip_policy(opt_name):
    model, ref = small_mlp(), small_mlp()
    opt, ref_opt = make(opt_name, model.parameters(), nonfinite="skip"), make(opt_name, ref.parameters(),
                                                                              nonfinite="skip")
    train(model, opt, 3)
    train(ref, ref_opt, 3)
    opt.zero_grad()
    _poison(model)
    opt.step()  # skipped
    train(model, opt, 2, start=3)
    train(ref, ref_opt, 2, start=3)
    assert all(torch.equal(a, b) for a, b in zip(ref.parameters(), model.parameters()))
    assert all(torch.isfinite(t).all() for st in opt.state.values() for t in st.values())


def _equal_state(a, b):
    if a["param_groups"] != b["param_groups"] or a["state"].keys() != b["state"].keys():
        return False
    return all(torch.equal(a["state"][k][n], b["state"][k][n]) for k in a["state"] for n in a["state"][k])


OTHER = {"sgd": "momentum", "momentum": "delta_momentum", "adam": "deep_momentum", "adamw": "adam",
         "delta_momentum": "momentum", "deep_momentum": "delta_momentum", "m3": "momentum"}


def test_loading_another_optimizers_state_dict_raises_and_changes_nothing(opt_name):
    model = small_mlp()
    opt = make(opt_name, model.parameters())
    train(model, opt, 3)
    other_model = small_mlp()
    other = make(OTHER[opt_name], other_model.parameters())
    train(other_model, other, 3)
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError):
        opt.load_state_dict(other.state_dict())
    assert _equal_state(before, opt.state_dict())


@pytest.mark.parametrize("name", ["momentum", "adam", "adamw", "delta_momentum", "deep_momentum"])
def test_loading_state_of_a_different_model_raises_and_changes_nothing(name):
    """State shaped like another model's parameters (SGD keeps no state, so the next test covers it)."""
    model = small_mlp()
    opt = make(name, model.parameters())
    train(model, opt, 3)
    wider = small_mlp(width=9)
    opt_wide = make(name, wider.parameters())
    train(wider, opt_wide, 3)
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match="shape"):
        opt.load_state_dict(opt_wide.state_dict())
    assert _equal_state(before, opt.state_dict())


def test_loading_corrupted_state_raises_and_changes_nothing(opt_name):
    model = small_mlp()
    opt = make(opt_name, model.parameters())
    train(model, opt, 3)
    before = copy.deepcopy(opt.state_dict())
    sd = copy.deepcopy(before)
    entry = next((st for st in sd["state"].values() if st), None)
    if entry is None:  # SGD keeps no state: corrupt a hyperparameter instead
        sd["param_groups"][0]["lr"] = -1.0
    else:
        key = next(k for k, v in entry.items() if v.dim() > 0)
        entry[key] = torch.zeros(entry[key].shape[0] + 1, *entry[key].shape[1:], dtype=entry[key].dtype)
    with pytest.raises(ValueError):
        opt.load_state_dict(sd)
    assert _equal_state(before, opt.state_dict())
