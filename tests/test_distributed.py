"""DDP and FSDP2 with 2 CPU processes (gloo) equal one process on the same global batch."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import CONFIGS, make, small_mlp
from torch.distributed.fsdp import fully_shard

STEPS = 10


def global_batch(step: int):
    g = torch.Generator().manual_seed(step)
    return torch.randn(32, 5, generator=g, dtype=torch.float64), torch.randn(32, 3, generator=g, dtype=torch.float64)


REFUSE_DTENSORS = ("deep_momentum", "m3")  # whole-tensor memories / Newton–Schulz need unsharded tensors
FSDP2_NAMES = [n for n in sorted(CONFIGS) if n not in REFUSE_DTENSORS]


def run(model: torch.nn.Module, name: str, shard=slice(None)) -> list[torch.Tensor]:
    opt = make(name, model.parameters())
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
        for name in FSDP2_NAMES:
            results[f"fsdp2/{name}"] = run(fully_shard(small_mlp()), name, shard)
        for name in REFUSE_DTENSORS:
            try:
                make(name, fully_shard(small_mlp()).parameters())
            except TypeError as err:
                results[f"{name}_refuses_dtensor"] = "DTensor" in str(err)
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


@pytest.mark.parametrize("key", [f"ddp/{n}" for n in sorted(CONFIGS)] + [f"fsdp2/{n}" for n in FSDP2_NAMES])
def test_two_processes_match_single_process(distributed_results, key):
    single = run(small_mlp(), key.split("/")[1])
    for a, b in zip(single, distributed_results[key]):
        assert (a - b).abs().max().item() <= 1e-10, key


@pytest.mark.parametrize("name", REFUSE_DTENSORS)
def test_refuses_sharded_parameters_clearly(distributed_results, name):
    assert distributed_results.get(f"{name}_refuses_dtensor") is True
