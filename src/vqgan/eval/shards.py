"""An evaluation split over torchrun processes: process r of W takes items r, r + W, r + 2W, ...; sums are
reduced onto every process and per-item results gathered onto process 0 in the set's order, so the numbers
are those one process gives. Without torch.distributed each helper is the single-process identity."""
from __future__ import annotations

import torch
import torch.distributed as dist

from ..parallel import is_distributed as distributed


def rank_and_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if distributed() else (0, 1)


def share(n: int) -> range:
    """The indices of a set of `n` items that this process takes."""
    rank, world = rank_and_world()
    return range(rank, n, world)


def collective_device() -> torch.device:
    """Where the default process group reduces tensors: NCCL (torchrun on GPUs) has no CPU tensors, so the
    current GPU there; the CPU under gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce(t: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """`t` reduced over every process, in place, whatever device it lives on (a no-op in one process)."""
    if distributed():
        moved = t.to(collective_device())
        dist.all_reduce(moved, op=op)
        t.copy_(moved)
    return t


def gather_to_main(obj) -> list | None:
    """Every process's `obj` (picklable) on process 0, by rank; None on the others; [obj] in one process."""
    if not distributed():
        return [obj]
    parts = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, parts, dst=0)
    return parts
