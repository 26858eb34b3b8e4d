"""The process group as the pixel loss sees it: world size, rank and a sum over ranks (no-ops on one process)."""
import torch
import torch.distributed as dist


def _active() -> bool:
    return dist.is_available() and dist.is_initialized()


def world() -> int:
    """Number of ranks (1 without an initialised process group)."""
    return dist.get_world_size() if _active() else 1


def rank() -> int:
    """This process's rank (0 without an initialised process group)."""
    return dist.get_rank() if _active() else 0


def is_rank0() -> bool:
    return rank() == 0


def sum_over_ranks(x: torch.Tensor) -> torch.Tensor:
    """``x`` summed over ranks, in place (a collective when distributed: call it on every rank)."""
    if world() > 1:
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x
