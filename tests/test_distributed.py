"""DistributedDataParallel with 2 CPU processes (gloo) equals one process on the same global batch."""

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import CONFIGS, make, small_mlp

STEPS = 10


def global_batch(step: int):
    g = torch.Generator().manual_seed(step)
    return torch.randn(32, 5, generator=g, dtype=torch.float64), torch.randn(32, 3, generator=g, dtype=torch.float64)


def run(model: torch.nn.Module, name: str, shard=slice(None)) -> list[torch.Tensor]:
    opt = make(name, model.parameters())
    for t in range(STEPS):
        x, y = global_batch(t)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x[shard]), y[shard]).backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


def worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        results = {}
        for name in sorted(CONFIGS):
            ddp = torch.nn.parallel.DistributedDataParallel(small_mlp())
            results[name] = run(ddp, name, shard=slice(16 * rank, 16 * (rank + 1)))
        if rank == 0:
            torch.save(results, out)
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_processes_match_single_process(tmp_path):
    out = str(tmp_path / "ddp.pt")
    mp.spawn(worker, args=(free_port(), out), nprocs=2, join=True)
    ddp_results = torch.load(out, weights_only=True)
    for name in sorted(CONFIGS):
        single = run(small_mlp(), name)
        for a, b in zip(single, ddp_results[name]):
            assert (a - b).abs().max().item() <= 1e-10, name
