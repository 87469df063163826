"""Sharded fits on torch.distributed: split trajectories, all-reduce the statistics once.

DMD statistics are sums over snapshot pairs (``PairStatistics``) or over trajectories
(``TrajectoryMoments``), so a fit over N processes is: each rank accumulates the statistics of
its own contiguous shard, one ``all_reduce(SUM)`` adds them up, and any rank solves the same
small DxD problem. The result equals the single-process fit up to the order of floating-point
additions. Launch with ``torchrun --nproc_per_node N -m koopnet fit ...``; ``init_from_env``
reads torchrun's environment variables (gloo on CPU, nccl on GPU).

The shards can be of trajectory files or of the data itself: ``sharded_statistics`` asks a
callback for the trajectories of its rank's samples (a model run on that shard of the inputs),
which is how ``linearize_depth`` and the staged ``koopnet fit SCALE_DIR`` scale out. ``agree``
turns a failure on one rank into an error on every rank instead of a hang in the all-reduce.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
from collections.abc import Callable, Iterator
from typing import TypeVar

import torch
import torch.distributed as dist

from koopnet._checks import check_int
from koopnet.dmd import PairStatistics
from koopnet.streaming import TrajectoryMoments, series_statistics

__all__ = ["agree", "all_reduce_statistics", "init_from_env", "is_distributed", "is_main",
           "local_shard", "process_group", "shard_indices", "sharded_statistics"]

Result = TypeVar("Result")


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


@contextlib.contextmanager
def process_group() -> Iterator[tuple[int, int]]:
    """``init_from_env`` for the length of a ``with`` block: a group this call creates is
    destroyed on the way out (even on an error), one that already existed is left alone.
    Yields (rank, world_size); (0, 1) outside torchrun."""
    owns = not (dist.is_available() and dist.is_initialized())
    try:
        yield init_from_env()
    finally:
        if owns and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


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


def local_shard(n: int, group=None) -> range:
    """This rank's contiguous share of ``range(n)`` (all of it outside a process group).

    Every rank must hold at least one sample, so a rank never joins the all-reduce with
    statistics of unknown shape; all ranks see the same ``n`` and refuse alike.
    """
    if not is_distributed():
        return range(n)
    world = dist.get_world_size(group)
    if n < world:
        raise ValueError(f"{n} samples cannot be shared by {world} processes; pass at least "
                         f"{world} samples or launch fewer processes (--nproc_per_node).")
    return shard_indices(n, dist.get_rank(group), world)


def is_main(group=None) -> bool:
    """True on rank 0, or outside a process group: the one process that writes files."""
    return not is_distributed() or dist.get_rank(group) == 0


def agree(fn: Callable[[], Result], group=None) -> Result:
    """Run ``fn`` on every rank; if it fails on any rank, raise on every rank.

    A rank whose local work fails before a collective would leave the others waiting in it
    until the backend's timeout; one small all-reduce of failure flags lets every rank stop at
    once instead: the failing ranks raise their own error, the others name them.
    """
    if not is_distributed():
        return fn()
    error = None
    try:
        result = fn()
    except Exception as err:  # re-raised below, after every rank has heard of it
        error = err
    flags = torch.zeros(dist.get_world_size(group), dtype=torch.float64, device=_device(group))
    flags[dist.get_rank(group)] = float(error is not None)
    dist.all_reduce(flags, op=dist.ReduceOp.SUM, group=group)
    if error is not None:
        raise error
    failed = [rank for rank, flag in enumerate(flags.tolist()) if flag]
    if failed:
        raise RuntimeError(f"rank(s) {failed} failed before the statistics were all-reduced; "
                           "their own error is in their output.")
    return result


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


def _local_statistics(states_of: Callable[[int, int], torch.Tensor], shard: range,
                      n_delays: int, constant: bool, pairing: str,
                      batch_size: int) -> TrajectoryMoments | PairStatistics:
    """Statistics of this rank's shard; ``concatenated`` carries in the rows just before it."""
    starts = range(shard.start, shard.stop, batch_size)
    batches = (states_of(start, min(start + batch_size, shard.stop)) for start in starts)
    first = next(batches)  # [b, T, W]
    _, n_states, width = first.shape
    batches = itertools.chain([first], batches)
    if pairing == "trajectory":
        moments = TrajectoryMoments(n_states, width)
        for batch in batches:
            moments.update(batch)
        return moments
    carry = None
    if shard.start:  # the previous h+1 rows of the series live in the samples before this shard
        before = math.ceil((n_delays + 1) / n_states)
        carry = states_of(max(0, shard.start - before), shard.start).reshape(-1, width)
    local = series_statistics(batches, n_delays, constant=constant, carry=carry)
    if local is None:  # too few rows for a pair: this rank adds zeros to the sum
        D = width * (n_delays + 1) + int(constant)
        local = PairStatistics(*(torch.zeros(D, D, dtype=torch.float64) for _ in range(3)), 0)
    return local


def sharded_statistics(states_of: Callable[[int, int], torch.Tensor], n: int, n_delays: int, *,
                       constant: bool = False, pairing: str = "trajectory",
                       batch_size: int = 4096, group=None) -> PairStatistics:
    """The snapshot-pair statistics of all ``n`` samples, each rank computing only its shard.

    ``states_of(start, stop)`` returns the trajectories of samples start..stop-1 [b, T, W];
    each rank calls it on its contiguous shard (``local_shard``), one ``all_reduce`` sums the
    statistics and every rank returns the same ``PairStatistics``. ``pairing="trajectory"``
    sums ``TrajectoryMoments``; ``"concatenated"`` (windows cross samples) also feeds each
    shard the h+1 series rows before it, so the pairs across a shard boundary are counted once,
    as in the single series. Outside a process group this is the one-process streamed fit.
    """
    shard = local_shard(n, group)
    local = agree(lambda: _local_statistics(states_of, shard, n_delays, constant, pairing,
                                            batch_size), group)
    reduced = all_reduce_statistics(local, group)
    if isinstance(reduced, TrajectoryMoments):
        return reduced.pair_statistics(n_delays, constant=constant)
    return reduced
