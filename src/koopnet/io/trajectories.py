"""Trajectory files: ``states`` [B, T, W] in safetensors, read lazily, fitted in a stream.

The trajectories are read in slices of ``batch_size`` trajectories, so only one batch is in
memory at a time. Each batch updates float64 statistics whose size does not depend on B:

- ``pairing="trajectory"``: ``TrajectoryMoments`` [T*W+1, T*W+1]; pairs stay inside each
  trajectory. One pass serves every ``n_delays <= T-2``, rank and Tikhonov value.
- ``pairing="concatenated"`` (the paper's PyKoopman protocol): all trajectories end to end as
  one series, windows crossing sample boundaries; streamed as ``PairStatistics`` of the lifted
  pairs with the last h+1 states carried from batch to batch (one pass per ``n_delays``).

Under torchrun every rank reads only its contiguous shard of trajectories, the statistics are
all-reduced once and rank 0 solves the DxD problem. The operator equals the single-process one
up to summation order.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from koopnet._checks import check_delays, check_int
from koopnet.distributed import all_reduce_statistics, init_from_env, shard_indices
from koopnet.dmd import DMD, PairStatistics
from koopnet.io.artifacts import ArtifactError
from koopnet.spec import FitSpec
from koopnet.streaming import TrajectoryMoments, series_statistics

__all__ = ["TrajectoryFile", "dmd_tensors", "fit_file", "trajectory_moments"]


class TrajectoryFile:
    """Lazy reader of ``states`` [B, T, W] in a safetensors file: slices load only their rows."""

    def __init__(self, path: str | os.PathLike, tensor: str = "states") -> None:
        self.path, self.tensor = Path(path), tensor
        if not self.path.is_file():
            raise FileNotFoundError(f"trajectory file '{self.path}' does not exist.")
        try:
            self._handle = safe_open(str(self.path), framework="pt")
        except SafetensorError as err:
            raise ArtifactError(f"'{self.path}' is not a valid safetensors file ({err}); write "
                                "the trajectories with safetensors.torch.save_file.") from err
        if tensor not in self._handle.keys():
            raise ValueError(f"'{self.path}' has no tensor '{tensor}'; it holds "
                           f"{sorted(self._handle.keys())}.")
        self._slice = self._handle.get_slice(tensor)
        shape = tuple(self._slice.get_shape())
        if len(shape) != 3:
            raise ValueError(f"tensor '{tensor}' in '{self.path}' must be [B, T, W]; got {shape}.")
        self.shape = shape

    def read(self, start: int, stop: int) -> torch.Tensor:
        """Trajectories start..stop-1. Shape: [stop-start, T, W]."""
        return self._slice[start:stop]

    def series(self, start: int, stop: int) -> torch.Tensor:
        """Rows start..stop-1 of the concatenated series (B*T rows). Shape: [stop-start, W]."""
        T = self.shape[1]
        first, last = start // T, -(-stop // T)
        rows = self.read(first, last).reshape(-1, self.shape[2])
        return rows[start - first * T: stop - first * T]


def _batches(reader: TrajectoryFile, shard: range, batch_size: int) -> Iterator[torch.Tensor]:
    for start in range(shard.start, shard.stop, batch_size):
        yield reader.read(start, min(start + batch_size, shard.stop))


def trajectory_moments(batches, n_states: int, width: int) -> TrajectoryMoments:
    """Accumulate ``TrajectoryMoments`` over an iterable of [b, T, W] batches."""
    moments = TrajectoryMoments(n_states, width)
    for batch in batches:
        moments.update(batch)
    return moments


def fit_file(path: str | os.PathLike, spec: FitSpec, *, batch_size: int = 4096,
             tensor: str = "states") -> tuple[DMD | None, dict]:
    """Stream (and, under torchrun, shard) a trajectory file into one DMD fit of ``spec``.

    Returns (dmd, info) on rank 0 and (None, info) on the other ranks. Delay coordinates only:
    a learned observable trains on whole trajectories, which a stream never holds at once.
    """
    started = time.perf_counter()
    if not isinstance(spec, FitSpec):
        raise TypeError(f"spec must be a koopnet.FitSpec; got {type(spec).__name__}.")
    if spec.observable_kind != "delay":
        raise ValueError(f"fit_file fits delay coordinates only; FitSpec(observable_kind="
                         f"{spec.observable_kind!r}) trains on whole trajectories, which a "
                         "streamed fit never holds at once: use koopnet.fit_hybrid on a scaled "
                         "model, or observable_kind='delay'.")
    batch_size = check_int(batch_size, "batch_size", low=1)
    h, constant, protocol = spec.n_delays, spec.constant, spec.pairing
    reader = TrajectoryFile(path, tensor)
    n_traj, n_states, width = reader.shape
    if protocol == "trajectory":
        check_delays(h, n_states, fix="use --pairing concatenated")
    proc, world = init_from_env()
    shard = shard_indices(n_traj, proc, world)
    batches = _batches(reader, shard, batch_size)
    if protocol == "trajectory":
        moments = all_reduce_statistics(trajectory_moments(batches, n_states, width))
        stats = moments.pair_statistics(h, constant=constant) if proc == 0 else None
    else:
        first = shard.start * n_states
        carry = reader.series(max(0, first - h - 1), first) if first else None
        local = series_statistics(batches, h, constant=constant, carry=carry)
        if local is None:  # an empty shard still joins the collective with zeros
            D = width * (h + 1) + int(constant)
            zeros = torch.zeros(D, D, dtype=torch.float64)
            local = PairStatistics(zeros, zeros.clone(), zeros.clone(), 0)
        stats = all_reduce_statistics(local)
    info = {"world_size": world, "n_trajectories": n_traj, "n_states": n_states,
            "width": width, "shard": [shard.start, shard.stop]}
    if proc != 0:
        return None, info
    if stats.n_pairs == 0:
        raise ValueError(f"'{path}' gives no snapshot pairs for n_delays={h}: the series has "
                         f"{n_traj * n_states} states; it needs at least {h + 2}.")
    dmd = spec.dmd().fit_statistics(stats)
    info.update(n_pairs=stats.n_pairs, seconds=time.perf_counter() - started)
    return dmd, info


def dmd_tensors(dmd: DMD) -> dict[str, torch.Tensor]:
    """The tensors of a ``dmd`` artifact."""
    return {"basis": dmd.basis_, "operator": dmd.operator_,
            "singular_values": dmd.singular_values_,
            "eigenvalues_real": dmd.eigenvalues_.real.contiguous(),
            "eigenvalues_imag": dmd.eigenvalues_.imag.contiguous()}
