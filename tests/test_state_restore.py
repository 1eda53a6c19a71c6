"""Optimizer phase lives in the state's device tensors: a state restored by any route (``load_state_dict``, a
``torch.save``/``weights_only`` round trip, ``deepcopy``, pickling, direct assignment ``opt.state[p] = …``)
continues exactly as the uninterrupted run.  (``ZeroRedundancyOptimizer``, DCP and ``torch.compile``:
``test_trainers.py``.)"""

import copy
import io
import pickle

import pytest
import torch
from conftest import CONFIGS, make, small_mlp, train

# every class, plus the options whose phase is not the step count alone (M3's chunk, DeepMomentum's schedule)
CASES = [(n, {}) for n in sorted(CONFIGS)] + [
    ("m3", dict(foreach=False)), ("m3", dict(nonfinite="skip")), ("m3", dict(second_moment=True, lr=1e-3)),
    ("m3", dict(paper=True, lr=1e-3, chunk=4)),
    ("deep_momentum", dict(lr_horizon=20, preconditioner="adam")), ("deep_momentum", dict(lr_decay=0.1)),
    ("deep_momentum", dict(lr=1.0, lr_adapt="dog", keys="momenta", preconditioner="adam")),
    ("momentum", dict(preconditioner="adam")), ("adam", dict(fused=False)),
]
IDS = [f"{n}-{'-'.join(f'{k}={v}' for k, v in o.items()) or 'default'}" for n, o in CASES]
ROUTES = ["load_state_dict", "weights_only", "deepcopy", "pickle", "assign"]
BEFORE, AFTER = 4, 5  # M3's chunk is 3 (CONFIGS): the interruption falls mid-chunk


def restore(route: str, name: str, options: dict, model: torch.nn.Module, opt: torch.optim.Optimizer):
    """``(model, optimizer)`` carrying on from ``(model, opt)`` by ``route``."""
    if route in ("deepcopy", "pickle"):
        return copy.deepcopy((model, opt)) if route == "deepcopy" else pickle.loads(pickle.dumps((model, opt)))
    twin = copy.deepcopy(model)
    fresh = make(name, twin.parameters(), **options)
    if route == "assign":  # as ZeroRedundancyOptimizer and hand-written loaders do: no load_state_dict
        for p, q in zip(model.parameters(), twin.parameters()):
            fresh.state[q] = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in opt.state[p].items()}
        return twin, fresh
    sd = opt.state_dict()
    if route == "weights_only":
        buf = io.BytesIO()
        torch.save(sd, buf)
        buf.seek(0)
        sd = torch.load(buf, weights_only=True)
    else:
        sd = copy.deepcopy(sd)
    fresh.load_state_dict(sd)
    return twin, fresh


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("name,options", CASES, ids=IDS)
def test_a_restored_optimizer_continues_the_uninterrupted_run(name, options, route):
    straight = small_mlp()
    train(straight, make(name, straight.parameters(), **options), BEFORE + AFTER)
    model = small_mlp()
    opt = make(name, model.parameters(), **options)
    train(model, opt, BEFORE)
    model, opt = restore(route, name, options, model, opt)
    train(model, opt, AFTER, start=BEFORE)
    for p, q in zip(straight.parameters(), model.parameters()):
        assert torch.equal(p, q), (name, route)


def test_a_state_assigned_with_its_step_on_another_device_is_moved_to_the_parameters():
    """``ZeroRedundancyOptimizer.load_state_dict`` assigns ``optim.state[p]`` and forces 0-dim tensors (the step
    counters) to the CPU; the next step puts them back on the parameter's device, so the device paths run."""
    (p,) = params = [torch.empty(6, 4, device="meta", requires_grad=True)]
    p.grad = torch.empty_like(p)
    opt = make("m3", params)
    opt.step()
    opt.state[p] = {**opt.state[p], "step": torch.ones((), dtype=torch.float32)}  # a meta value cannot move
    opt.step()
    assert opt.state[p]["step"].device.type == "meta"


def test_load_state_dict_checks_the_dict_its_pre_hooks_return():
    """A pre-hook that adapts an older dict (here: a renamed state key) runs before deepopt's checks, as torch's
    pre-hooks run before its load; entries of ``state`` that are not a parameter's are kept, as torch keeps them."""
    model = small_mlp()
    opt = make("adam", model.parameters())
    train(model, opt, 2)
    old = copy.deepcopy(opt.state_dict())
    for st in old["state"].values():
        st["second_moment"] = st.pop("exp_avg_sq")
    old["state"]["note"] = "saved by a hook"
    fresh = make("adam", small_mlp().parameters())
    with pytest.raises(ValueError, match="exp_avg_sq"):
        fresh.load_state_dict(old)

    def rename(optimizer, sd):
        for key, st in sd["state"].items():
            if isinstance(key, int):
                st["exp_avg_sq"] = st.pop("second_moment")

    fresh.register_load_state_dict_pre_hook(rename)
    fresh.load_state_dict(copy.deepcopy(old))
    assert fresh.state["note"] == "saved by a hook"
    assert all(torch.equal(fresh.state_dict()["state"][i]["exp_avg_sq"], opt.state_dict()["state"][i]["exp_avg_sq"])
               for i in range(4))
