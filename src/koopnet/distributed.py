"""Sharded fits on torch.distributed: split trajectories, all-reduce the statistics once.

DMD statistics are sums over snapshot pairs (``PairStatistics``) or over trajectories
(``TrajectoryMoments``), so a fit over N processes is: each rank accumulates the statistics of
its own contiguous shard, one ``all_reduce(SUM)`` adds them up, and any rank solves the same
small DxD problem. The result equals the single-process fit up to the order of floating-point
additions. Launch with ``torchrun --nproc_per_node N -m koopnet fit ...``; ``init_from_env``
reads torchrun's environment variables (gloo on CPU, nccl on GPU).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from koopnet._checks import check_int
from koopnet.dmd import PairStatistics
from koopnet.streaming import TrajectoryMoments

__all__ = ["all_reduce_statistics", "init_from_env", "is_distributed", "shard_indices"]


def is_distributed() -> bool:
    """True inside an initialised process group with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def init_from_env() -> tuple[int, int]:
    """Join the process group torchrun describes (``WORLD_SIZE`` > 1); return (rank, world_size).

    Outside torchrun (no ``WORLD_SIZE`` or 1) nothing is initialised and (0, 1) is returned. A
    group that is already initialised is reused.
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return 0, 1
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed.")
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend)
    return dist.get_rank(), dist.get_world_size()


def shard_indices(n: int, rank: int, world_size: int) -> range:
    """Contiguous, deterministic share of ``range(n)`` for ``rank``: the first ``n % world_size``
    ranks get one item more. Shards cover ``range(n)`` exactly once, in order.

    >>> [list(shard_indices(5, r, 2)) for r in range(2)]
    [[0, 1, 2], [3, 4]]
    """
    n = check_int(n, "n", low=0)
    world_size = check_int(world_size, "world_size", low=1)
    rank = check_int(rank, "rank", low=0, high=world_size - 1)
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (rank < extra))


def _device(group) -> torch.device:
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_statistics(obj, group=None):
    """Sum ``PairStatistics`` or ``TrajectoryMoments`` over all ranks with ONE all_reduce.

    The matrices and the count are packed into one float64 buffer (counts stay exact up to
    2**53), reduced with SUM and unpacked. ``PairStatistics`` comes back as a new object;
    ``TrajectoryMoments`` is updated in place and returned. Without an initialised group of more
    than one rank, ``obj`` is returned unchanged.
    """
    if isinstance(obj, PairStatistics):
        parts, count = [obj.xx, obj.yx, obj.yy], obj.n_pairs
    elif isinstance(obj, TrajectoryMoments):
        parts, count = [obj.moments], obj.n_trajectories
    else:
        raise TypeError(f"all_reduce_statistics takes PairStatistics or TrajectoryMoments; got "
                        f"{type(obj).__name__}.")
    if not is_distributed():
        return obj
    device = _device(group)
    flat = torch.cat([p.reshape(-1).to(device, torch.float64) for p in parts]
                     + [torch.tensor([float(count)], dtype=torch.float64, device=device)])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    flat = flat.cpu()
    total = round(float(flat[-1]))
    reduced, offset = [], 0
    for p in parts:
        reduced.append(flat[offset:offset + p.numel()].view(p.shape).to(p.dtype))
        offset += p.numel()
    if isinstance(obj, PairStatistics):
        return PairStatistics(*reduced, total)
    obj.moments = reduced[0]
    obj.n_trajectories = total
    return obj
