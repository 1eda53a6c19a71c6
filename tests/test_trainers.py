"""The training set-ups people use, for every class (issue 21's held-out matrix, its torch-native cells):
``torch.distributed.checkpoint`` resume (one process, and FSDP2 at world size 2), ``ZeroRedundancyOptimizer``
resume (gloo, world size 2), ``torch.compile`` of a training step, SWA (``torch.optim.swa_utils``), bf16 autocast
with ``GradScaler`` (and bf16 parameters), and five LR schedulers with resume.  Every resume is compared with
the uninterrupted run.  (Hugging Face Trainer and Lightning: ``benchmarks/trainer_matrix.py``; hooks and state-dict
round trips: ``test_torch_optim_renewed.py``, ``test_state_restore.py``.)"""

import copy
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from conftest import CONFIGS, batch, loss_fn, make, small_mlp, train
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.fsdp import fully_shard
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.optim import lr_scheduler as sched
from torch.optim.swa_utils import SWALR, AveragedModel

import deepopt

NAMES = sorted(CONFIGS)
BEFORE, AFTER = 4, 5  # M3's chunk is 3: the interruption falls mid-chunk


def params_of(model: torch.nn.Module) -> list[torch.Tensor]:
    return [(p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone() for p in model.parameters()]


def assert_same(a: list[torch.Tensor], b: list[torch.Tensor], tol: float = 0.0, label: str = "") -> None:
    for x, y in zip(a, b):
        assert (x - y).abs().max().item() <= tol, label


# ------------------------------------------------------------------------------------------ one process
@pytest.mark.parametrize("name", NAMES)
def test_dcp_resume_equals_the_uninterrupted_run(name, tmp_path):
    """``get_state_dict`` → ``dcp.save`` … ``dcp.load`` → ``set_state_dict`` into a fresh model and optimizer
    (whose state DCP first initialises with a zero-lr step, as it does for every optimizer)."""
    straight = small_mlp()
    train(straight, make(name, straight.parameters()), BEFORE + AFTER)
    model = small_mlp()
    opt = make(name, model.parameters())
    train(model, opt, BEFORE)
    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp_path))
    fresh = small_mlp(seed=1)
    fresh_opt = make(name, fresh.parameters())
    model_sd, optim_sd = get_state_dict(fresh, fresh_opt)
    loaded = {"model": model_sd, "optim": optim_sd}
    dcp.load(loaded, checkpoint_id=str(tmp_path))
    set_state_dict(fresh, fresh_opt, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"])
    train(fresh, fresh_opt, AFTER, start=BEFORE)
    assert_same(params_of(straight), params_of(fresh), label=name)


def compiled_run(name: str, backend: str, steps: int = 8, **options) -> tuple[list[torch.Tensor], list[int]]:
    """``steps`` training steps (forward, backward, ``opt.step()``) compiled whole by ``torch.compile(backend=…)``:
    the final weights, and the number of frames dynamo has compiled after each step."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = small_mlp()
    opt = make(name, model.parameters(), **options)

    @torch.compile(backend=backend)
    def step(x, y):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        return loss

    frames = []
    for t in range(steps):
        step(*batch(t))
        frames.append(counters["frames"]["total"])
    return params_of(model), frames


COMPILE_CASES = [(n, {}) for n in NAMES] + [("m3", dict(second_moment=True, lr=1e-3)), ("m3", dict(paper=True)),
                                            ("deep_momentum", dict(lr_horizon=20, preconditioner="adam"))]


@pytest.mark.parametrize("name,options", COMPILE_CASES, ids=[f"{n}-{sorted(o)}" for n, o in COMPILE_CASES])
def test_compiled_training_step_equals_eager(name, options):
    """A whole training step under ``torch.compile`` (AOT autograd, the tracing inductor uses; inductor itself:
    ``benchmarks/trainer_matrix.py``) equals eager, and compiles no new frame once the state exists: dynamo guards
    on the Python values it reads, so a Python-side step count would make every step a new graph (then, past the
    recompile limit, a silent fall back to eager)."""
    eager = small_mlp()
    train(eager, make(name, eager.parameters(), **options), 8)
    compiled, frames = compiled_run(name, "aot_eager", **options)
    assert frames[2] == frames[-1], frames
    assert_same(params_of(eager), compiled, 1e-12, name)


@pytest.mark.parametrize("name", NAMES)
def test_swa_averages_the_trajectory_under_swalr(name):
    """``AveragedModel`` + ``SWALR`` (which anneals every group's lr to ``swa_lr``): the optimizer follows the
    annealed lr (as a hand-set lr does) and the averaged model is the mean of the iterates."""
    model, twin = small_mlp(), small_mlp()
    opt, twin_opt = make(name, model.parameters()), make(name, twin.parameters())
    swa_model = AveragedModel(model)
    swa_sched = SWALR(opt, swa_lr=0.005, anneal_epochs=3, anneal_strategy="cos")
    snapshots = []
    for t in range(6):
        for g, h in zip(twin_opt.param_groups, opt.param_groups):
            g["lr"] = h["lr"]
        train(model, opt, 1, start=t)
        train(twin, twin_opt, 1, start=t)
        swa_model.update_parameters(model)
        snapshots.append(params_of(model))
        swa_sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.005)
    assert_same(params_of(model), params_of(twin), label=name)
    mean = [torch.stack(ps).mean(0) for ps in zip(*snapshots)]
    assert_same(mean, params_of(swa_model.module), 1e-12, name)


@pytest.mark.parametrize("name", NAMES)
def test_bf16_autocast_with_grad_scaler_skips_nonfinite_steps(name):
    """fp32 parameters, bf16 autocast, ``torch.amp.GradScaler``: an overflowing step is skipped (parameters and
    state untouched, the scale backs off) and the rest equals training without the scaler on the same batches
    (the scale is a power of two: scaling and unscaling the gradients is exact)."""
    def run(scaled: bool):
        model = small_mlp(dtype=torch.float32)
        opt = make(name, model.parameters())
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1000)
        for t in range(6):
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = loss_fn(model, t)
            if not scaled:
                if t != 3:
                    loss.backward()
                    opt.step()
                continue
            scaler.scale(loss).backward()
            if t == 3:  # an overflow, as fp16/bf16 training meets one
                next(model.parameters()).grad[0, 0] = float("inf")
                before = (params_of(model), copy.deepcopy(opt.state_dict()["state"]))
            scaler.step(opt)
            scaler.update()
            if t == 3:
                assert_same(before[0], params_of(model), label="the overflowing step moved a parameter")
                assert str(before[1]) == str(opt.state_dict()["state"]), "the overflowing step changed the state"
                assert scaler.get_scale() == 2.0**9
        return params_of(model)

    assert_same(run(True), run(False), label=name)


@pytest.mark.parametrize("name", NAMES)
def test_bf16_parameters_train_with_fp32_step_counters(name):
    model = small_mlp(dtype=torch.bfloat16)
    opt = make(name, model.parameters())
    first = loss_fn(model, 0).item()
    for _ in range(20):  # one batch, repeatedly: the loss must fall
        opt.zero_grad()
        loss_fn(model, 0).backward()
        opt.step()
    assert loss_fn(model, 0).item() < first
    for state in opt.state.values():
        if "step" in state:
            assert state["step"].dtype == torch.float32
        assert all(v.dtype in (torch.bfloat16, torch.float32) for v in state.values() if isinstance(v, torch.Tensor))


SCHEDULERS = {
    "StepLR": lambda opt: sched.StepLR(opt, step_size=3, gamma=0.5),
    "CosineAnnealingLR": lambda opt: sched.CosineAnnealingLR(opt, T_max=9),
    "OneCycleLR": lambda opt: sched.OneCycleLR(opt, max_lr=2 * opt.param_groups[0]["lr"], total_steps=9,
                                                cycle_momentum="momentum" in opt.defaults or "betas" in opt.defaults),
    "warm-up+cosine LambdaLR": lambda opt: sched.LambdaLR(
        opt, lambda t: (t + 1) / 3 if t < 3 else 0.5 * (1 + torch.cos(torch.tensor((t - 3) / 6 * torch.pi)).item())),
    "ReduceLROnPlateau": lambda opt: sched.ReduceLROnPlateau(opt, factor=0.5, patience=0, threshold=10.0),
}
MOMENTUM_KEYS = ("lr", "momentum", "betas")


def run_scheduled(name: str, scheduler: str, steps: int, start: int = 0, model=None, opt=None, sch=None,
                  record=None):
    model = model or small_mlp()
    opt = opt or make(name, model.parameters())
    sch = sch or SCHEDULERS[scheduler](opt)
    for t in range(start, start + steps):
        if record is not None:
            record.append({k: opt.param_groups[0][k] for k in MOMENTUM_KEYS if k in opt.param_groups[0]})
        opt.zero_grad()
        loss = loss_fn(model, t)
        loss.backward()
        opt.step()
        sch.step(loss.item()) if scheduler == "ReduceLROnPlateau" else sch.step()
    return model, opt, sch


@pytest.mark.parametrize("scheduler", sorted(SCHEDULERS))
@pytest.mark.parametrize("name", NAMES)
def test_schedulers_drive_the_group_hyperparameters_and_resume(name, scheduler):
    """A scheduler acts through ``group["lr"]`` (and ``momentum``/``betas`` for OneCycleLR) only: the same
    values set by hand give the same run; optimizer + scheduler state dicts saved mid-run resume it exactly."""
    record = []
    straight, _, _ = run_scheduled(name, scheduler, 9, record=record)
    assert len({r["lr"] for r in record}) > 1, "the schedule never changed the lr"
    by_hand = small_mlp()
    opt = make(name, by_hand.parameters())
    for t, values in enumerate(record):
        opt.param_groups[0].update(values)
        train(by_hand, opt, 1, start=t)
    assert_same(params_of(straight), params_of(by_hand), label=f"{name} by hand")
    model, opt, sch = run_scheduled(name, scheduler, BEFORE)
    saved = copy.deepcopy({"opt": opt.state_dict(), "sched": sch.state_dict()})
    fresh = copy.deepcopy(model)
    fresh_opt = make(name, fresh.parameters())
    fresh_sch = SCHEDULERS[scheduler](fresh_opt)
    fresh_opt.load_state_dict(saved["opt"])
    fresh_sch.load_state_dict(saved["sched"])
    resumed, _, _ = run_scheduled(name, scheduler, 9 - BEFORE, BEFORE, fresh, fresh_opt, fresh_sch)
    assert_same(params_of(straight), params_of(resumed), label=f"{name} resumed")


# ------------------------------------------------------------------------------------------ two processes
def zero_batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = batch(step, n=32)
    return x[16 * rank:16 * (rank + 1)], y[16 * rank:16 * (rank + 1)]


def distributed_steps(model, opt, steps: int, start: int, rank: int) -> None:
    for t in range(start, start + steps):
        x, y = zero_batch(t, rank)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def zero_run(name: str, rank: int, resume_dir: str | None):
    """DDP + ``ZeroRedundancyOptimizer`` over ``name``: straight through, or interrupted after ``BEFORE`` steps,
    consolidated on rank 0, saved, and loaded into a fresh wrapper on both ranks."""
    def build():
        model = torch.nn.parallel.DistributedDataParallel(small_mlp(width=10))
        return model, ZeroRedundancyOptimizer(model.parameters(), optimizer_class=deepopt.OPTIMIZERS[name],
                                              **CONFIGS[name])

    model, opt = build()
    if resume_dir is None:
        distributed_steps(model, opt, BEFORE + AFTER, 0, rank)
        return params_of(model)
    distributed_steps(model, opt, BEFORE, 0, rank)
    opt.consolidate_state_dict(to=0)
    path = os.path.join(resume_dir, f"zero-{name}.pt")
    if rank == 0:
        torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, path)
    dist.barrier()
    saved = torch.load(path, weights_only=True)
    model, opt = build()
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["optim"])
    distributed_steps(model, opt, AFTER, BEFORE, rank)
    return params_of(model)


def fsdp2_dcp_run(name: str, rank: int, resume_dir: str | None):
    """FSDP2 + DCP: straight through, or saved after ``BEFORE`` steps and loaded into a fresh sharded model."""
    model = fully_shard(small_mlp(width=10))
    opt = make(name, model.parameters())
    if resume_dir is None:
        distributed_steps(model, opt, BEFORE + AFTER, 0, rank)
        return params_of(model)
    distributed_steps(model, opt, BEFORE, 0, rank)
    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=os.path.join(resume_dir, f"dcp-{name}"))
    model = fully_shard(small_mlp(seed=1, width=10))
    opt = make(name, model.parameters())
    model_sd, optim_sd = get_state_dict(model, opt)
    loaded = {"model": model_sd, "optim": optim_sd}
    dcp.load(loaded, checkpoint_id=os.path.join(resume_dir, f"dcp-{name}"))
    set_state_dict(model, opt, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"])
    distributed_steps(model, opt, AFTER, BEFORE, rank)
    return params_of(model)


def worker(rank: int, port: int, out: str, tmp: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        results = {}
        for name in NAMES:
            for kind, fn in (("zero", zero_run), ("fsdp2-dcp", fsdp2_dcp_run)):
                results[f"{kind}/{name}/straight"] = fn(name, rank, None)
                results[f"{kind}/{name}/resumed"] = fn(name, rank, tmp)
        if rank == 0:
            torch.save(results, out)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def distributed_resumes(tmp_path_factory):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path_factory.mktemp("trainers") / "results.pt")
    mp.spawn(worker, args=(port, out, str(tmp_path_factory.mktemp("checkpoints"))), nprocs=2, join=True)
    return torch.load(out, weights_only=True)


@pytest.mark.parametrize("kind", ["zero", "fsdp2-dcp"])
@pytest.mark.parametrize("name", NAMES)
def test_distributed_resume_equals_the_uninterrupted_run(distributed_resumes, name, kind):
    """ZeroRedundancyOptimizer (its ``load_state_dict`` assigns ``optim.state[p]`` directly and moves step
    counters to the CPU) and FSDP2 with DCP, at world size 2: resumed equals straight through."""
    assert_same(distributed_resumes[f"{kind}/{name}/straight"], distributed_resumes[f"{kind}/{name}/resumed"],
                label=f"{kind} {name}")
