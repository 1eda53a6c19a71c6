"""Triton kernels for ``DeltaMomentum``'s default step on CUDA: the whole parameter list in two launches.

The reference is the pure rule (``deepopt.rules.delta``) with ``keys="tensor"``, identity preconditioner and
no output nonlinearity::

    c_i = 1 − β·⟨m_i, g_i⟩/‖g_i‖²          (per tensor i; a zero gradient gives c_i = 1)
    m_i ← α·m_i + c_i·g_i;   W_i ← W_i − lr·m_i

``delta_momentum_step_`` runs it over many tensors at once, as torch's multi-tensor kernels do: a table of
device pointers and a table of (tensor, block) work items, one program per block of ``BLOCK`` elements.
Launch 1 reduces ``⟨m_i, g_i⟩`` and ``‖g_i‖²`` (fp32 partial sums, atomically added per tensor); launch 2
applies the update, reading ``m, g, W`` once and writing ``m, W`` once (the traffic of a fused Adam step).
Tests compare it with the rule on the CPU under ``TRITON_INTERPRET=1`` and on CUDA when a device is present.
"""

from __future__ import annotations

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # the multi-tensor torch path serves instead
    triton = None

BLOCK = 1024
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def available(params: list[Tensor]) -> bool:
    """Whether the kernels can take this list: Triton importable, one floating dtype, dense tensors."""
    return (triton is not None and len({(p.device, p.dtype) for p in params}) == 1
            and params[0].dtype in _DTYPES and all(p.is_contiguous() for p in params))


if triton is not None:

    @triton.jit
    def _pointer(table, index, dtype: tl.constexpr):
        return tl.load(table + index).to(tl.pointer_type(dtype))

    @triton.jit
    def _scalar(x, IS_TENSOR: tl.constexpr):
        """A float argument, or the fp32 value a 0-dim tensor argument points to (one branch is compiled)."""
        if IS_TENSOR:
            value = tl.load(x).to(tl.float32)
        else:
            value = x
        return value

    @triton.jit
    def _reduce_kernel(m_table, g_table, numels, block_tensor, block_start, dots, squares,
                       DTYPE: tl.constexpr, BLOCK: tl.constexpr):
        work = tl.program_id(0)
        t = tl.load(block_tensor + work)
        offs = tl.load(block_start + work) + tl.arange(0, BLOCK)
        mask = offs < tl.load(numels + t)
        m = tl.load(_pointer(m_table, t, DTYPE) + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(_pointer(g_table, t, DTYPE) + offs, mask=mask, other=0.0).to(tl.float32)
        tl.atomic_add(dots + t, tl.sum(m * g))
        tl.atomic_add(squares + t, tl.sum(g * g))

    @triton.jit
    def _update_kernel(p_table, m_table, g_table, numels, block_tensor, block_start, dots, squares,
                       lr, alpha, beta, LR_T: tl.constexpr, DTYPE: tl.constexpr, BLOCK: tl.constexpr):
        work = tl.program_id(0)
        t = tl.load(block_tensor + work)
        offs = tl.load(block_start + work) + tl.arange(0, BLOCK)
        mask = offs < tl.load(numels + t)
        sq = tl.load(squares + t)
        coef = 1.0 - beta * tl.load(dots + t) / tl.where(sq > 0, sq, 1.0)
        m_ptr, p_ptr = _pointer(m_table, t, DTYPE) + offs, _pointer(p_table, t, DTYPE) + offs
        m = alpha * tl.load(m_ptr, mask=mask).to(tl.float32) \
            + coef * tl.load(_pointer(g_table, t, DTYPE) + offs, mask=mask).to(tl.float32)
        tl.store(m_ptr, m.to(DTYPE), mask=mask)
        tl.store(p_ptr, (tl.load(p_ptr, mask=mask).to(tl.float32) - _scalar(lr, LR_T) * m).to(DTYPE), mask=mask)


    _TRITON_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}

_work_tables: dict[tuple, tuple[Tensor, Tensor, Tensor]] = {}


def _work(numels: tuple[int, ...], device: torch.device, span: int = BLOCK) -> tuple[Tensor, Tensor, Tensor]:
    """(numels, work item → tensor, work item → start offset) for work items of ``span`` coordinates, built once
    per list of sizes, device and span."""
    key = (numels, device, span)
    if key not in _work_tables:
        tensor_of, start_of = [], []
        for i, n in enumerate(numels):
            for start in range(0, n, span):
                tensor_of.append(i)
                start_of.append(start)
        _work_tables[key] = tuple(torch.tensor(v, dtype=torch.int64).to(device)
                                  for v in (list(numels), tensor_of, start_of))
    return _work_tables[key]


_pointer_tables: dict[tuple, tuple[Tensor, Tensor]] = {}  # key -> (device table, its host source)
_captured_tables: dict[tuple, tuple[Tensor, Tensor]] = {}  # tables copied inside a CUDA-graph capture: never evicted
_spare_pinned: dict[int, list[Tensor]] = {}  # length -> pinned host buffers made outside a capture, for one
_MAX_POINTER_TABLES = 16


def _pointers(tensors: list[Tensor]) -> Tensor:
    """The tensors' data pointers as an int64 device tensor, cached by address: in a steady training loop
    (and under CUDA-graph capture after warm-up) no copy is made; a new table is copied from pinned memory
    without blocking.  The pinned source is kept with the table: a copy recorded inside a graph capture reads it
    again at every replay, so a table made during a capture is also never evicted.  Inside a capture no memory is
    pinned (torch versions differ on whether that may happen there): the table's host source is a spare pinned
    buffer that each table built outside a capture leaves for a list of its length (the warm-up steps before a
    capture build them; gradients allocated by the capture then have new addresses)."""
    device = tensors[0].device
    key = (device, *(t.data_ptr() for t in tensors))
    entry = _pointer_tables.get(key) or _captured_tables.get(key)
    if entry is None:
        values = torch.tensor(key[1:], dtype=torch.int64)
        if device.type != "cuda":
            entry = (values, values)
        elif torch.cuda.is_current_stream_capturing():
            spares = _spare_pinned.get(len(tensors))
            host = spares.pop().copy_(values) if spares else values.pin_memory()
            entry = _captured_tables[key] = (host.to(device, non_blocking=True), host)
            return entry[0]
        else:
            host = values.pin_memory()
            entry = (host.to(device, non_blocking=True), host)
            spares = _spare_pinned.setdefault(len(tensors), [])
            if len(spares) < 4:
                spares.append(torch.empty_like(values).pin_memory())
        if len(_pointer_tables) >= _MAX_POINTER_TABLES:
            _pointer_tables.pop(next(iter(_pointer_tables)))
        _pointer_tables[key] = entry
    return entry[0]


def _device_scalar(x: float | Tensor, name: str, device: torch.device) -> tuple[float | Tensor, bool]:
    """A Python float, or a 0-dim tensor moved (without a host read) to ``device`` in fp32; flag: a tensor."""
    if isinstance(x, Tensor):
        if x.numel() != 1:
            raise ValueError(f"{name} must be a number or a one-element tensor, got shape {tuple(x.shape)}")
        return x.to(device=device, dtype=torch.float32).reshape(()), True
    return float(x), False


def delta_momentum_step_(params: list[Tensor], grads: list[Tensor], bufs: list[Tensor], lr: float | Tensor,
                         alpha: float, beta: float) -> None:
    """The delta rule's default step over the lists, in place (see the module docstring); a tensor ``lr`` (a
    capturable group's, a scheduler's) is read by the kernel."""
    grads = [g.contiguous() for g in grads]
    numels, block_tensor, block_start = _work(tuple(p.numel() for p in params), params[0].device)
    dots = torch.zeros(len(params), dtype=torch.float32, device=params[0].device)
    squares = torch.zeros_like(dots)
    p_table, m_table, g_table = _pointers(params), _pointers(bufs), _pointers(grads)
    dtype = _TRITON_DTYPES[params[0].dtype]
    lr, lr_t = _device_scalar(lr, "lr", params[0].device)
    grid = (block_tensor.numel(),)
    _reduce_kernel[grid](m_table, g_table, numels, block_tensor, block_start, dots, squares, DTYPE=dtype, BLOCK=BLOCK)
    _update_kernel[grid](p_table, m_table, g_table, numels, block_tensor, block_start, dots, squares,
                         lr, float(alpha), float(beta), LR_T=lr_t, DTYPE=dtype, BLOCK=BLOCK)
