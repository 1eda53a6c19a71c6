"""A HOPE training step can be captured in a CUDA graph (``deepopt.cuda_graph.GraphedStep``,
``Trainer(cuda_graph=True)``, ``deepopt hope train --cuda-graph``): on the CPU, the step reads no device data on
the host and runs on the meta device (shapes only); on CUDA, a graphed run equals an eager one."""

import pytest
import torch

import deepopt
from deepopt.bench import OpCounter
from deepopt.cuda_graph import GraphedStep
from deepopt.hope.model import LanguageModel
from deepopt.hope.train import Trainer, make_optimizer, model_config

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _model(name: str, device: str = "cpu", **overrides) -> LanguageModel:
    torch.manual_seed(0)
    return LanguageModel(model_config(name, "smoke", **overrides)).to(device)


def _batch(step: int, device: str = "cpu", context: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    x = torch.randint(0, 256, (2, context + 1), generator=g)
    return x[:, :-1].to(device), x[:, 1:].to(device)


@pytest.mark.parametrize("model", ["hope", "transformer"])
@pytest.mark.parametrize("optimizer", ["adamw", "deep_momentum", "m3"])
@pytest.mark.parametrize("amp", ["none", "bf16"])
def test_a_training_step_reads_nothing_on_the_host_but_the_logged_loss(model, optimizer, amp):
    """(torch's own optimizers read their step counters on the CPU unless ``capturable``, which needs CUDA.)"""
    net = _model(model)
    opt = make_optimizer(optimizer, net, 1e-3, 0.1, {"capturable": True})
    trainer = Trainer(net, opt, lr=1e-3, steps=10, warmup=2, amp=amp)
    trainer.step(*_batch(0))  # optimizer state is created
    with OpCounter() as counter:
        loss = trainer.step(*_batch(1))
    assert isinstance(loss, float)
    # Trainer.step reads the finished loss once for its log line; the step before it reads nothing
    assert counter.ops.get("aten._local_scalar_dense.default", 0) == 1, counter.ops
    assert not any("nonzero" in op or "item" in op for op in counter.ops), counter.ops


@pytest.mark.parametrize("model", ["hope", "transformer"])
def test_forward_backward_runs_on_shapes_alone(model):
    """On the meta device no value exists, so any data-dependent host decision would fail."""
    with torch.device("meta"):
        net = LanguageModel(model_config(model, "smoke"))
        x = torch.randint(0, 256, (2, 33))
    _, loss = net(x[:, :-1], x[:, 1:])
    loss.backward()
    torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
    assert all(p.grad is not None and p.grad.is_meta for p in net.parameters() if p.requires_grad)


def test_graphed_step_refuses_what_it_cannot_capture():
    net = _model("transformer")
    with pytest.raises(ValueError, match="capturable=True"):
        GraphedStep(lambda x, y: net(x, y)[1], torch.optim.AdamW(net.parameters(), lr=1e-3))
    with pytest.raises(ValueError, match="one CUDA device"):
        GraphedStep(lambda x, y: net(x, y)[1], deepopt.AdamW(net.parameters(), lr=1e-3, capturable=True))
    with pytest.raises(ValueError, match="warmup must be"):
        GraphedStep(lambda x, y: net(x, y)[1], deepopt.AdamW(net.parameters(), lr=1e-3), warmup=0)
    with pytest.raises(ValueError, match="one CUDA device"):
        Trainer(net, deepopt.AdamW(net.parameters(), lr=1e-3, capturable=True), lr=1e-3, steps=1, cuda_graph=True)


def test_hope_train_cuda_graph_flag_needs_cuda(tmp_path, capsys):
    from deepopt.cli import main

    if torch.cuda.is_available():
        pytest.skip("the refusal is for machines without CUDA")
    with pytest.raises(SystemExit) as exit_:
        main(["hope", "train", "--smoke", "--cuda-graph", "--out", str(tmp_path / "run"), "--no-progress"])
    assert exit_.value.code == 2
    assert "CUDA" in capsys.readouterr().err


@cuda
@pytest.mark.parametrize("model", ["hope", "transformer"])
@pytest.mark.parametrize("optimizer", ["torch_adamw", "adamw", "momentum"])
def test_graphed_training_equals_eager_training_on_cuda(model, optimizer):
    runs = []
    for graph in (False, True):
        net = _model(model, "cuda")
        options = {"capturable": True} if graph else {}
        trainer = Trainer(net, make_optimizer(optimizer, net, 1e-3, 0.1, options), lr=1e-3, steps=8, warmup=3,
                          cuda_graph=graph)
        losses = [trainer.step(*_batch(t, "cuda")) for t in range(8)]  # 3 eager, capture, 4 replays
        runs.append((losses, [p.detach().clone() for p in net.parameters()]))
    (la, pa), (lb, pb) = runs
    assert la == pytest.approx(lb, rel=1e-4, abs=1e-5)
    for a, b in zip(pa, pb):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@cuda
def test_a_replayed_step_is_one_graph_launch():
    net = _model("hope", "cuda")
    trainer = Trainer(net, make_optimizer("adamw", net, 1e-3, 0.1, {"capturable": True}), lr=1e-3, steps=8,
                      cuda_graph=True)
    for t in range(5):
        trainer.step(*_batch(t, "cuda"))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        trainer.step(*_batch(5, "cuda"))
    names = [e.name for e in prof.events()]
    assert any("cudaGraphLaunch" in n for n in names)
    # besides the replay: the lr refills (one per group) and the loss's clone, against hundreds of kernels eagerly
    assert names.count("cudaLaunchKernel") <= 8, names.count("cudaLaunchKernel")
