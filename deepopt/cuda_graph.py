"""A whole training step (forward, backward, gradient clipping, optimizer step) captured in one CUDA graph.

``GraphedStep`` follows PyTorch's whole-network capture recipe: the first ``warmup`` calls run eagerly on a
side stream (they are real training steps, and they create the optimizer state and autograd's buffers), the
next call captures the step into a ``torch.cuda.CUDAGraph``, and every call from then on copies its inputs
into the graph's static input tensors and replays it: one launch from the host per step instead of one per
kernel.  The learning rate lives on the device (``param_groups[i]["lr"]`` becomes a 0-dim tensor that
``lr=`` refills before the replay, a launch without a host read), so schedules work without re-capturing.

What a captured step may not do is what a graph cannot replay: read device data on the host (``.item()``,
``float(loss)``, data-dependent Python control flow), change input shapes, or allocate outside the graph's
pool.  deepopt's optimizers and HOPE's step do none of these (``tests/test_cuda_graph.py`` checks the host
reads on the CPU and, when a GPU is present, that a graphed run equals an eager one).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn


def training_step(loss_fn: Callable[..., Tensor], optimizer: torch.optim.Optimizer, params: Iterable[nn.Parameter],
                  grad_clip: float, *inputs: Tensor) -> Tensor:
    """One update on gradients zeroed by the caller: ``loss_fn(*inputs).backward()``, the global gradient norm of
    ``params`` clipped to ``grad_clip`` (0: no clipping), ``optimizer.step()``; returns the detached loss.  The body
    that an eager step and a captured graph (``GraphedStep``) share."""
    loss = loss_fn(*inputs)
    loss.backward()
    if grad_clip > 0:
        nn.utils.clip_grad_norm_(params, grad_clip)
    optimizer.step()
    return loss.detach()


class GraphedStep:
    """``loss_fn(*inputs).backward(); clip_grad_norm_(params, grad_clip); optimizer.step()`` as one CUDA graph.

    ``optimizer`` must be able to run under capture: torch's with ``capturable=True``, any deepopt optimizer.
    ``__call__(*inputs, lr=None)`` returns the step's loss as a device tensor (no host read); inputs must keep
    the shapes, dtypes and device of the first call.
    """

    def __init__(self, loss_fn: Callable[..., Tensor], optimizer: torch.optim.Optimizer,
                 params: Iterable[nn.Parameter] | None = None, grad_clip: float = 0.0, warmup: int = 3) -> None:
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 1:
            raise ValueError(f"warmup must be an int >= 1 (eager steps before the capture), got {warmup!r}")
        if not grad_clip >= 0:
            raise ValueError(f"grad_clip must be >= 0 (0: no clipping), got {grad_clip}")
        if any(group.get("capturable") is False for group in optimizer.param_groups):
            raise ValueError(f"{type(optimizer).__name__} must be built with capturable=True to run in a CUDA graph")
        self.params = list(params) if params is not None else [
            p for g in optimizer.param_groups for p in g["params"]]
        devices = {p.device for p in self.params}
        if len(devices) != 1 or next(iter(devices)).type != "cuda":
            raise ValueError(f"a CUDA graph needs every parameter on one CUDA device, got {sorted(map(str, devices))}")
        self.device = next(iter(devices))
        self.loss_fn, self.optimizer, self.grad_clip, self.warmup = loss_fn, optimizer, grad_clip, warmup
        self.calls = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static_inputs: tuple[Tensor, ...] = ()
        self.static_loss: Tensor | None = None

    def _step(self, *inputs: Tensor) -> Tensor:
        return training_step(self.loss_fn, self.optimizer, self.params, self.grad_clip, *inputs)

    def set_lr(self, lr: float | None = None) -> None:
        """Refill every group's device lr with ``lr`` (``None``: keep the value), making it a device tensor
        first where it is not one (before the capture, e.g. after ``optimizer.load_state_dict``)."""
        for group in self.optimizer.param_groups:
            value = group["lr"] if lr is None else lr
            if isinstance(group["lr"], Tensor) and group["lr"].device == self.device and group["lr"].dim() == 0:
                if lr is not None:
                    group["lr"].fill_(lr)
            elif self.graph is None:
                group["lr"] = torch.tensor(float(value), dtype=torch.float32, device=self.device)
            else:
                raise ValueError("param_groups' lr was replaced after the capture; the graph reads the old tensor")

    def __call__(self, *inputs: Tensor, lr: float | None = None) -> Tensor:
        self.set_lr(lr)
        if self.graph is None and self.calls < self.warmup:  # eager steps on a side stream
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                self.optimizer.zero_grad(set_to_none=True)
                loss = self._step(*inputs)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            self.calls += 1
            return loss
        if self.graph is None:  # capture: the graph owns static inputs, gradients and loss
            self.static_inputs = tuple(x.clone() for x in inputs)
            self.optimizer.zero_grad(set_to_none=True)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.static_loss = self._step(*self.static_inputs)
        else:
            if len(inputs) != len(self.static_inputs) or any(
                    x.shape != s.shape or x.dtype != s.dtype for x, s in zip(inputs, self.static_inputs)):
                want, got = [tuple(s.shape) for s in self.static_inputs], [tuple(x.shape) for x in inputs]
                raise ValueError(f"a graphed step needs inputs of the captured shapes and dtypes {want}, got {got}")
            for s, x in zip(self.static_inputs, inputs):
                s.copy_(x, non_blocking=True)
        self.graph.replay()
        self.calls += 1
        return self.static_loss.clone()
