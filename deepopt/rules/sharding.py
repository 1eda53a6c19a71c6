"""Sharded parameters (``torch.distributed.tensor.DTensor``, as FSDP2's ``fully_shard`` makes them) in the rules.

Element-wise parts of a rule run on a DTensor's shards as they are, and per-tensor reductions (``⟨m, g⟩``,
``‖g‖²``) become partial sums that DTensor all-reduces, so they need nothing here.  Two things read whole
tensors and use these helpers, so that a sharded run equals the unsharded one:

* Newton–Schulz (``transforms.orthogonalize_many``) goes through ``map_whole``: a list of matrices sharded along
  one dimension of a 1-D mesh (FSDP2's layout) is distributed as microsoft/dion distributes Muon's work — matrix
  ``i`` is assembled whole on rank ``i mod W`` by one all-to-all of the shards, orthogonalised there (same-shape
  matrices batched), and its shards are sent back by a second all-to-all.  Each rank iterates 1/W of the matrices;
  the traffic is one all-gather's volume.  Other layouts (2-D meshes, replicated DTensors) are gathered whole on
  every rank.
* DeepMomentum's key blocks cross shard boundaries (a shard's length is rarely a multiple of ``key_dim``) and its
  features are non-linear per block, so the rule ``gathered``\\ s the key and value tensors, computes the block
  statistics and read-out on them (identically on every rank), and keeps its own shard (``scattered``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

if torch.distributed.is_available():
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    def is_dtensor(t: object) -> bool:
        return isinstance(t, DTensor)
else:  # pragma: no cover - builds without torch.distributed
    def is_dtensor(t: object) -> bool:
        return False


def gathered(t: Tensor) -> Tensor:
    """The whole tensor: a DTensor's ``full_tensor()`` (an all-gather), any other tensor itself."""
    return t.full_tensor() if is_dtensor(t) else t


def scattered(whole: Tensor, like: Tensor) -> Tensor:
    """``whole`` (the same on every rank) laid out as the DTensor ``like``, each rank keeping its own part
    without communication; ``whole`` itself where ``like`` is no DTensor."""
    if not is_dtensor(like):
        return whole
    return distribute_tensor(whole, like.device_mesh, like.placements, src_data_rank=None)


def local(t: Tensor) -> Tensor:
    """A DTensor's local shard (a view: in-place ops on it change the DTensor), any other tensor itself."""
    return t.to_local() if is_dtensor(t) else t


def like(shard: Tensor, t: Tensor) -> Tensor:
    """The local ``shard`` as a DTensor laid out as ``t`` (``shard`` itself where ``t`` is no DTensor)."""
    if not is_dtensor(t):
        return shard
    return DTensor.from_local(shard, t.device_mesh, t.placements, shape=t.shape, stride=t.stride())


def map_whole(xs: list[Tensor], fn: Callable[[list[Tensor]], list[Tensor]]) -> list[Tensor]:
    """``fn`` (whole tensors → same-shape results, batched) applied to ``xs`` as if every tensor were whole;
    DTensors come back laid out as they went in (see the module's docstring for how)."""
    out = list(xs)
    buckets: dict[tuple, list[int]] = {}
    for i, x in enumerate(xs):
        key = ("plain",) if not is_dtensor(x) else (x.device_mesh, x.placements, x.dtype)
        buckets.setdefault(key, []).append(i)
    for key, idx in buckets.items():
        items = [xs[i] for i in idx]
        if key == ("plain",):
            results = fn(items)
        elif _one_sharded_dim(items[0]) is not None:
            results = _distributed(items, fn)
        else:
            results = [scattered(y, x) for x, y in zip(items, fn([gathered(x) for x in items]))]
        for i, y in zip(idx, results):
            out[i] = y
    return out


def _one_sharded_dim(x: Tensor) -> int | None:
    """The dimension a DTensor is sharded along if its mesh is 1-D with one ``Shard`` placement, else None."""
    if x.device_mesh.ndim != 1 or not isinstance(x.placements[0], Shard):
        return None
    return x.placements[0].dim % x.dim()


def _shard_sizes(n: int, world: int) -> list[int]:
    """Rows per rank when ``n`` rows are split as ``torch.chunk`` splits them (FSDP2's and DTensor's layout)."""
    chunk = math.ceil(n / world)
    return [max(0, min(chunk, n - r * chunk)) for r in range(world)]


def _distributed(xs: list[Tensor], fn: Callable[[list[Tensor]], list[Tensor]]) -> list[Tensor]:
    """dion's distribution of a whole-matrix map over DTensors sharded along one dimension of a 1-D mesh: matrix
    ``i`` is assembled and mapped on rank ``i mod W``, then its shards go back, by two ``all_to_all_single``."""
    mesh = xs[0].device_mesh
    group, world, rank = mesh.get_group(), mesh.size(), mesh.get_local_rank()
    dims = [_one_sharded_dim(x) for x in xs]
    sizes = [_shard_sizes(x.shape[d], world) for x, d in zip(xs, dims)]
    shards = [x.to_local() for x in xs]
    if any(s.shape[d] != sz[rank] for s, d, sz in zip(shards, dims, sizes)):  # not torch.chunk's layout: gather
        return [scattered(y, x) for x, y in zip(xs, fn([gathered(x) for x in xs]))]
    owner = [i % world for i in range(len(xs))]
    mine = [i for i in range(len(xs)) if owner[i] == rank]

    def numel_of(i: int, r: int) -> int:  # elements of matrix i held by rank r
        return xs[i].numel() // xs[i].shape[dims[i]] * sizes[i][r] if xs[i].shape[dims[i]] else 0

    # 1. shards to their matrix's owner
    send = [s.reshape(-1) for r in range(world) for i, s in enumerate(shards) if owner[i] == r]
    received = _all_to_all(send, [sum(numel_of(i, rank) for i in range(len(xs)) if owner[i] == r)
                                  for r in range(world)],
                           [sum(numel_of(i, r) for i in mine) for r in range(world)], group, xs[0])
    pieces = received.split([numel_of(i, r) for r in range(world) for i in mine])
    whole = []
    for k, i in enumerate(mine):
        parts = [pieces[r * len(mine) + k].view(_shape_with(xs[i].shape, dims[i], sizes[i][r]))
                 for r in range(world)]
        whole.append(torch.cat(parts, dim=dims[i]))
    results = fn(whole) if whole else []
    # 2. each result's shards back to their ranks
    send = [y.narrow(dims[i], sum(sizes[i][:r]), sizes[i][r]).reshape(-1)
            for r in range(world) for i, y in zip(mine, results)]
    received = _all_to_all(send, [sum(numel_of(i, r) for i in mine) for r in range(world)],
                           [sum(numel_of(i, rank) for i in range(len(xs)) if owner[i] == r) for r in range(world)],
                           group, xs[0])
    back = dict(zip((i for r in range(world) for i in range(len(xs)) if owner[i] == r),
                    received.split([numel_of(i, rank) for r in range(world) for i in range(len(xs))
                                    if owner[i] == r])))
    return [like(back[i].view(shards[i].shape), x) for i, x in enumerate(xs)]


def _shape_with(shape: torch.Size, dim: int, size: int) -> list[int]:
    return [size if d == dim else s for d, s in enumerate(shape)]


def _all_to_all(send: list[Tensor], send_sizes: list[int], receive_sizes: list[int], group, like_: Tensor) -> Tensor:
    """One ``all_to_all_single`` of the concatenated ``send`` (``send_sizes[r]`` elements to rank r)."""
    local_like = like_.to_local()
    flat = torch.cat(send) if send else local_like.new_empty(0)
    out = local_like.new_empty(sum(receive_sizes))
    dist.all_to_all_single(out, flat, output_split_sizes=receive_sizes, input_split_sizes=send_sizes, group=group)
    return out
