"""The torch.optim protocol, for every deepopt optimizer."""

import copy
import io

import pytest
import torch
from conftest import CONFIGS, loss_fn, make, small_mlp, train


def params_of(model):
    return [p.detach().clone() for p in model.parameters()]


def same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


def test_param_groups_with_their_own_lr_and_weight_decay(opt_name):
    """Each group steps with its own hyperparameters: equal to two optimizers, one per group."""
    model, ref_a = small_mlp(), small_mlp()
    first, second = list(model[0].parameters()), list(model[2].parameters())
    opt = make(opt_name, [{"params": first}, {"params": second, "lr": 0.001, "weight_decay": 0.01}])
    ref_opts = [make(opt_name, ref_a[0].parameters()), make(opt_name, ref_a[2].parameters(), lr=0.001,
                                                             weight_decay=0.01)]
    for t in range(5):
        opt.zero_grad()
        loss_fn(model, t).backward()
        opt.step()
        for o in ref_opts:
            o.zero_grad()
        loss_fn(ref_a, t).backward()
        for o in ref_opts:
            o.step()
    assert same(params_of(model), params_of(ref_a))


def test_lr_scheduler(opt_name):
    """StepLR changes group['lr'] and the optimizer follows it: equal to setting lr by hand."""
    a, b = small_mlp(), small_mlp()
    oa, ob = make(opt_name, a.parameters()), make(opt_name, b.parameters())
    sched = torch.optim.lr_scheduler.StepLR(oa, step_size=2, gamma=0.5)
    base = ob.param_groups[0]["lr"]
    for t in range(6):
        oa.zero_grad()
        loss_fn(a, t).backward()
        oa.step()
        sched.step()
        ob.param_groups[0]["lr"] = base * 0.5 ** (t // 2)
        ob.zero_grad()
        loss_fn(b, t).backward()
        ob.step()
    assert oa.param_groups[0]["lr"] == pytest.approx(base / 8)  # after 6 scheduler steps
    assert same(params_of(a), params_of(b))


def test_resume_with_scheduler_and_named_groups(opt_name, tmp_path):
    """Extra group keys (a user's ``name``, a scheduler's ``initial_lr``) survive a save/resume."""
    def build(model):
        opt = make(opt_name, [{"params": model[0].parameters(), "name": "first"},
                              {"params": model[2].parameters(), "name": "second"}])
        return opt, torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.9)

    straight = small_mlp()
    opt, sched = build(straight)
    for t in range(8):
        train(straight, opt, 1, start=t)
        sched.step()

    first = small_mlp()
    opt, sched = build(first)
    for t in range(4):
        train(first, opt, 1, start=t)
        sched.step()
    torch.save({"opt": opt.state_dict(), "sched": sched.state_dict(), "model": first.state_dict()},
               tmp_path / "ckpt.pt")
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    resumed = small_mlp(seed=5)
    resumed.load_state_dict(ckpt["model"])
    opt = make(opt_name, [{"params": resumed[0].parameters(), "name": "first"},
                          {"params": resumed[2].parameters(), "name": "second"}])
    opt.load_state_dict(ckpt["opt"])
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.9)
    sched.load_state_dict(ckpt["sched"])
    for t in range(4, 8):
        train(resumed, opt, 1, start=t)
        sched.step()
    assert [g["name"] for g in opt.param_groups] == ["first", "second"]
    assert same(params_of(straight), params_of(resumed))


def test_step_with_closure(opt_name):
    a, b = small_mlp(), small_mlp()
    oa, ob = make(opt_name, a.parameters()), make(opt_name, b.parameters())
    for t in range(3):
        def closure(t=t):
            oa.zero_grad()
            loss = loss_fn(a, t)
            loss.backward()
            return loss

        loss = oa.step(closure)
        assert torch.is_tensor(loss) and loss.item() > 0
    train(b, ob, 3)
    assert same(params_of(a), params_of(b))


def test_state_dict_resume_is_bit_identical(opt_name):
    straight = small_mlp()
    train(straight, make(opt_name, straight.parameters()), 20)

    first = small_mlp()
    opt = make(opt_name, first.parameters())
    train(first, opt, 10)
    buf = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)

    resumed = small_mlp(seed=123)
    resumed.load_state_dict(ckpt["model"])
    opt2 = make(opt_name, resumed.parameters(), lr=1.0)  # hyperparameters come from the state dict
    opt2.load_state_dict(ckpt["opt"])
    train(resumed, opt2, 10, start=10)
    assert same(params_of(straight), params_of(resumed))


def test_deepcopy_is_independent(opt_name):
    model = small_mlp()
    opt = make(opt_name, model.parameters())
    train(model, opt, 3)
    clone = copy.deepcopy(opt)
    before = copy.deepcopy(opt.state_dict())
    train(model, opt, 2, start=3)
    assert clone.state_dict()["param_groups"] == before["param_groups"]
    for k, st in before["state"].items():
        for key, v in st.items():
            assert torch.equal(clone.state_dict()["state"][k][key], v)


def test_step_hooks(opt_name):
    model = small_mlp()
    opt = make(opt_name, model.parameters())
    calls = []
    h1 = opt.register_step_pre_hook(lambda o, args, kwargs: calls.append("pre"))
    h2 = opt.register_step_post_hook(lambda o, args, kwargs: calls.append("post"))
    train(model, opt, 2)
    h1.remove()
    h2.remove()
    train(model, opt, 1, start=2)
    assert calls == ["pre", "post", "pre", "post"]


def test_zero_gradients_and_zero_state_do_not_move(opt_name):
    model = small_mlp()
    opt = make(opt_name, model.parameters(), weight_decay=0.0)  # decay alone would move them
    before = params_of(model)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    assert same(before, params_of(model))


def test_params_without_grad_are_skipped(opt_name):
    model = small_mlp()
    opt = make(opt_name, model.parameters())
    frozen = model[0].weight
    frozen.requires_grad_(False)
    before = frozen.detach().clone()
    train(model, opt, 3)
    assert torch.equal(before, frozen) and frozen not in opt.state
    assert model[2].weight in opt.state or opt_name == "sgd"


def test_grad_is_never_modified(opt_name):
    model = small_mlp()
    opt = make(opt_name, model.parameters(), weight_decay=0.1)
    for t in range(3):
        opt.zero_grad()
        loss_fn(model, t).backward()
        grads = [p.grad.clone() for p in model.parameters()]
        opt.step()
        assert same(grads, [p.grad for p in model.parameters()])


@pytest.mark.parametrize("scaled", [False, True])
def test_autocast_bfloat16(opt_name, scaled):
    """AMP: autocast to bf16, optionally through torch.amp.GradScaler, which unscales before our step and
    skips it on overflow."""
    model = small_mlp(dtype=torch.float32)
    opt = make(opt_name, model.parameters())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, enabled=scaled)
    x, y = torch.randn(16, 5), torch.randn(16, 3)
    losses = []
    for _ in range(20):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = torch.nn.functional.mse_loss(model(x).float(), y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    if scaled:
        before = params_of(model)
        opt.zero_grad()
        scaler.scale(torch.nn.functional.mse_loss(model(x), y) * float("inf")).backward()
        scaler.step(opt)  # inf gradients: the scaler skips the step, nothing raises
        scaler.update()
        assert same(before, params_of(model))


def test_bfloat16_parameters(opt_name):
    model = small_mlp(dtype=torch.bfloat16)
    opt = make(opt_name, model.parameters())
    x, y = torch.randn(16, 5, dtype=torch.bfloat16), torch.randn(16, 3, dtype=torch.bfloat16)
    first = None
    for _ in range(20):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        first = first if first is not None else loss.item()
    assert all(st_t.dtype in (torch.bfloat16, torch.float32, torch.float64)
               for st in opt.state.values() for st_t in st.values())
    assert loss.item() < first


COMPILE_CASES = [(name, "eager") for name in sorted(CONFIGS)] + [("adam", "inductor"), ("delta_momentum", "inductor")]


@pytest.mark.parametrize("name,backend", COMPILE_CASES)
def test_training_step_under_torch_compile(name, backend):
    """The whole step (forward, backward, optimizer) under torch.compile: dynamo tracing for every
    optimizer, the default inductor backend for two."""
    torch._dynamo.reset()
    model = small_mlp(dtype=torch.float32)
    opt = make(name, model.parameters())
    x, y = torch.randn(16, 5), torch.randn(16, 3)

    @torch.compile(backend=backend)
    def step():
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        return loss

    losses = [step().item() for _ in range(5)]
    assert losses[-1] < losses[0]
