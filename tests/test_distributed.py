"""DDP and FSDP2 with 2 CPU processes (gloo) equal one process on the same global batch, for every class."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import CONFIGS, make, small_mlp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import Shard

STEPS = 10


def global_batch(step: int):
    g = torch.Generator().manual_seed(step)
    return torch.randn(32, 5, generator=g, dtype=torch.float64), torch.randn(32, 3, generator=g, dtype=torch.float64)


# every class under FSDP2, and the options that read whole tensors (Newton–Schulz, row keys, the deep read-out)
FSDP2_CASES = {name: {} for name in sorted(CONFIGS)} | {
    "momentum+ns": ("momentum", dict(nesterov=True, nonlinearity="newton_schulz")),
    "delta_momentum+rows": ("delta_momentum", dict(keys="rows")),
    "deep_momentum+l2+adam": ("deep_momentum", dict(objective="l2", preconditioner="adam")),
    "deep_momentum+preconditioned-keys+ns": ("deep_momentum", dict(preconditioner="adam", key_source="preconditioned",
                                                                    nonlinearity="newton_schulz")),
    "deep_momentum+rule": ("deep_momentum", dict(foreach=False)),
    "deep_momentum+momenta+online-w2": ("deep_momentum", dict(keys="momenta", preconditioner="adam", eta2=0.05,
                                                              total_steps=6, hidden=4)),
    "deep_momentum+momenta+dog": ("deep_momentum", dict(keys="momenta", preconditioner="adam", lr_adapt="dog",
                                                        lr=1.0, hidden=4, total_steps=6)),
    "momentum+adam+relative-eps": ("momentum", dict(preconditioner="adam", relative_eps=1.0)),
    "deep_momentum+momenta+relative-eps": ("deep_momentum", dict(keys="momenta", preconditioner="adam",
                                                                 relative_eps=3.0, hidden=4, foreach=False)),
    "m3+second-moment": ("m3", dict(second_moment=True, lr=1e-3)),
    "m3+paper": ("m3", dict(paper=True, lr=1e-3)),
    "m3+rule": ("m3", dict(foreach=False)),
}


# other FSDP2 layouts: matrices sharded along dim 1 where FSDP2 allows it (even sizes), and HSDP's 2-D mesh
# (Replicate, Shard(0)), whose Newton–Schulz inputs are gathered whole
LAYOUTS = {
    f"{name}+{label}": layout for name in ("m3", "deep_momentum") for label, layout in (
        ("dim-1", lambda: dict(shard_placement_fn=lambda p: Shard(1) if p.dim() == 2 and p.shape[1] % 2 == 0
                                  else Shard(0))),
        ("hsdp", lambda: dict(mesh=init_device_mesh("cpu", (1, 2), mesh_dim_names=("replicate", "shard")))),
    )
}


def case(key: str) -> tuple[str, dict]:
    if key in LAYOUTS:
        return key.split("+")[0], {}
    spec = FSDP2_CASES[key]
    return (key, spec) if isinstance(spec, dict) else spec


def run(model: torch.nn.Module, name: str, shard=slice(None), **options) -> list[torch.Tensor]:
    opt = make(name, model.parameters(), **options)
    for t in range(STEPS):
        x, y = global_batch(t)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x[shard]), y[shard]).backward()
        opt.step()
    return [(p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone() for p in model.parameters()]


def worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        results = {}
        shard = slice(16 * rank, 16 * (rank + 1))
        for name in sorted(CONFIGS):
            ddp = torch.nn.parallel.DistributedDataParallel(small_mlp())
            results[f"ddp/{name}"] = run(ddp, name, shard)
        for key in FSDP2_CASES:
            name, options = case(key)
            results[f"fsdp2/{key}"] = run(fully_shard(small_mlp(width=10)), name, shard, **options)
        for key, layout in LAYOUTS.items():
            name = key.split("+")[0]
            results[f"fsdp2/{key}"] = run(fully_shard(small_mlp(width=10), **layout()), name, shard)
        if rank == 0:
            torch.save(results, out)
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def distributed_results(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("dist") / "results.pt")
    mp.spawn(worker, args=(free_port(), out), nprocs=2, join=True)
    return torch.load(out, weights_only=True)


KEYS = [f"ddp/{n}" for n in sorted(CONFIGS)] + [f"fsdp2/{k}" for k in [*FSDP2_CASES, *LAYOUTS]]


@pytest.mark.parametrize("key", KEYS)
def test_two_processes_match_single_process(distributed_results, key):
    """DDP and FSDP2 (width 10: 25-element shards, so key blocks of 16 cross the shard boundary; a 3-row matrix split
    unevenly; two matrices, so each rank orthogonalises one) equal one process on the global batch."""
    kind, label = key.split("/")
    name, options = (label, {}) if kind == "ddp" else case(label)
    single = run(small_mlp(width=8 if kind == "ddp" else 10), name, **options)
    for a, b in zip(single, distributed_results[key]):
        assert (a - b).abs().max().item() <= 1e-10, key
