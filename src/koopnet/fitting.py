"""``koopnet fit``: a streamed (and optionally sharded) DMD fit from a trajectory file.

The trajectories are read from a safetensors file (tensor ``states`` [B, T, W]; no pickle) in
slices of ``--batch-size`` trajectories, so only one batch is in memory at a time. Each batch
updates float64 statistics whose size does not depend on B:

- ``--protocol trajectory`` (default): ``TrajectoryMoments`` [T*W+1, T*W+1]; pairs stay inside
  each trajectory. One pass serves every ``n_delays <= T-2``, every rank and every Tikhonov
  value (they are all sub-blocks of, or computed from, the same moments).
- ``--protocol concatenated`` (the paper's PyKoopman protocol): all trajectories end to end as
  one series, windows crossing sample boundaries. Streamed as ``PairStatistics`` of the lifted
  pairs with the last h+1 states carried from batch to batch; one pass serves one ``n_delays``
  (every rank and Tikhonov value).

Under torchrun every rank reads only its contiguous shard of trajectories, the statistics are
all-reduced once and rank 0 solves the DxD problem and writes ``DIR/dmd.safetensors`` +
``DIR/dmd.json``. The operator equals the single-process one up to summation order.

Run as ``python -m koopnet fit ...`` (through ``koopnet.cli``) or directly as
``torchrun --nproc_per_node 2 -m koopnet.fitting --trajectories t.safetensors ...``.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from koopnet._checks import as_tensor, check_int
from koopnet.artifacts import file_sha256, prepare_output_dir, save_artifact
from koopnet.distributed import all_reduce_statistics, init_from_env, shard_indices
from koopnet.dmd import DMD, PairStatistics
from koopnet.observables import TimeDelay
from koopnet.streaming import TrajectoryMoments

__all__ = [
    "add_fit_arguments",
    "dmd_tensors",
    "fit_command",
    "fit_file",
    "parse_rank",
    "series_statistics",
    "trajectory_moments",
]

log = logging.getLogger(__name__)


def parse_rank(text: str | None):
    """``--rank`` values: 'none'/'full' -> None, '0' -> 0 (optimal threshold), '350' -> 350,
    '0.99' -> 0.99 (energy fraction).

    >>> [parse_rank(t) for t in ("none", "0", "350", "0.99")]
    [None, 0, 350, 0.99]
    """
    if text is None or str(text).strip().lower() in ("none", "full", ""):
        return None
    text = str(text).strip()
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--rank {text!r} is not none, an int or a float in (0, 1).") from None


class TrajectoryFile:
    """Lazy reader of ``states`` [B, T, W] in a safetensors file: slices load only their rows."""

    def __init__(self, path: str | os.PathLike, tensor: str = "states") -> None:
        self.path, self.tensor = Path(path), tensor
        if not self.path.is_file():
            raise FileNotFoundError(f"trajectory file '{self.path}' does not exist.")
        self._handle = safe_open(str(self.path), framework="pt")
        if tensor not in self._handle.keys():
            raise KeyError(f"'{self.path}' has no tensor '{tensor}'; it holds "
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


def series_statistics(batches, n_delays: int, *, constant: bool = False,
                      carry: torch.Tensor | None = None) -> PairStatistics | None:
    """Streamed Gram statistics of the paper's concatenated series (windows cross samples).

    ``batches`` yields [b, T, W] trajectories in order; ``carry`` [c, W] holds the series rows
    just before the first batch (at most h+1 are used; pass them when this is a later shard).
    Equals ``PairStatistics.from_pairs(*snapshot_pairs(TimeDelay(h).fit_transform(series)))``
    of the whole series. Returns None when the rows seen give no pair.
    """
    h = check_int(n_delays, "n_delays", low=0)
    lift = TimeDelay(h, constant=constant)
    stats = None
    carry = None if carry is None or len(carry) == 0 else carry[-(h + 1):]
    for batch in batches:
        batch = as_tensor(batch, "states", ndim=3)
        rows = batch.reshape(-1, batch.shape[2]).to(torch.float64)
        n_carry = 0 if carry is None else len(carry)
        ext = rows if carry is None else torch.cat([carry, rows])  # [c + b*T, W]
        carry = ext[-(h + 1):]
        if len(ext) < h + 2:
            continue
        lifted = lift.fit_transform(ext[None])[0]  # [m - h, D]; row j is ext index h + j
        skip = max(h + 1, n_carry) - (h + 1)  # pairs whose target is already counted
        X, Y = lifted[:-1][skip:], lifted[1:][skip:]
        if len(X):
            part = PairStatistics.from_pairs(X, Y)
            stats = part if stats is None else stats + part
    return stats


def fit_file(path: str | os.PathLike, n_delays: int, *, rank=None, tikhonov: float = 0.0,
             constant: bool = False, batch_size: int = 4096, protocol: str = "trajectory",
             tensor: str = "states") -> tuple[DMD | None, dict]:
    """Stream (and, under torchrun, shard) a trajectory file into one DMD fit.

    Returns (dmd, info) on rank 0 and (None, info) on the other ranks.
    """
    started = time.perf_counter()
    batch_size = check_int(batch_size, "batch_size", low=1)
    h = check_int(n_delays, "n_delays", low=0)
    if protocol not in ("trajectory", "concatenated"):
        raise ValueError(f"protocol={protocol!r} must be 'trajectory' or 'concatenated'.")
    reader = TrajectoryFile(path, tensor)
    n_traj, n_states, width = reader.shape
    if protocol == "trajectory" and h > n_states - 2:
        raise ValueError(f"n_delays={h} needs trajectories of at least {h + 2} states; got "
                         f"T={n_states}. Lower n_delays or use --protocol concatenated.")
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
    dmd = DMD(rank, tikhonov=tikhonov).fit_statistics(stats)
    info.update(n_pairs=stats.n_pairs, seconds=time.perf_counter() - started)
    return dmd, info


def dmd_tensors(dmd: DMD) -> dict[str, torch.Tensor]:
    """The tensors of a ``dmd`` artifact."""
    return {"basis": dmd.basis_, "operator": dmd.operator_,
            "singular_values": dmd.singular_values_,
            "eigenvalues_real": dmd.eigenvalues_.real.contiguous(),
            "eigenvalues_imag": dmd.eigenvalues_.imag.contiguous()}


def add_fit_arguments(parser: argparse.ArgumentParser, *,
                      stage: bool = False) -> argparse.ArgumentParser:
    """Options of ``koopnet fit``; ``stage`` adds the positional SCALE_DIR of the staged CLI
    (then exactly one of SCALE_DIR and --trajectories is needed)."""
    if stage:
        parser.add_argument("scale_dir", nargs="?", metavar="SCALE_DIR",
                            help="output folder of `koopnet scale`: collect its trajectories "
                                 "on the recorded data, fit, and write dmd.* and hybrid.*")
    parser.add_argument("--trajectories", required=not stage, metavar="PATH",
                        help="safetensors file with a tensor 'states' [B, T, W]")
    parser.add_argument("--tensor", default="states", help="tensor name (default: states)")
    parser.add_argument("--n-delays", type=int, required=True, metavar="H",
                        help="time delays h: lifted dimension W*(h+1)")
    parser.add_argument("--rank", type=parse_rank, default=None,
                        help="none = full numerical rank, int >= 1 = that many modes, float in "
                             "(0,1) = energy fraction, 0 = optimal hard threshold")
    parser.add_argument("--tikhonov", type=float, default=0.0,
                        help="relative Tikhonov damping (lambda = value * S_max^2)")
    parser.add_argument("--constant", action="store_true",
                        help="append the constant observable 1 (affine operator)")
    parser.add_argument("--protocol", choices=("trajectory", "concatenated"),
                        default="trajectory",
                        help="pairs inside each trajectory, or the paper's concatenated series")
    parser.add_argument("--batch-size", type=int, default=4096,
                        help="trajectories per streamed batch (memory is O(batch + D^2))")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder")
    parser.add_argument("--force", action="store_true", help="write into a non-empty folder")
    return parser


def _check_out(out: str, force: bool) -> None:
    """The checks of ``prepare_output_dir`` without side effects, run on every rank first so
    that no rank waits in the all-reduce for one that already failed."""
    folder = Path(out)
    if folder.exists() and not folder.is_dir():
        raise FileExistsError(f"output folder '{folder}' is a file; pick another path.")
    if folder.is_dir() and any(folder.iterdir()) and not force:
        raise FileExistsError(f"output folder '{folder}' already exists and is not empty; "
                              "pass --force to write into it")


def fit_command(args: argparse.Namespace) -> int:
    """Body of ``koopnet fit``; returns the exit code. Leaves no process group behind."""
    import torch.distributed as dist

    owns_group = not (dist.is_available() and dist.is_initialized())
    try:
        return _fit_command(args)
    finally:
        if owns_group and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def _fit_command(args: argparse.Namespace) -> int:
    _check_out(args.out, args.force)
    dmd, info = fit_file(args.trajectories, args.n_delays, rank=args.rank,
                         tikhonov=args.tikhonov, constant=args.constant,
                         batch_size=args.batch_size, protocol=args.protocol, tensor=args.tensor)
    if dmd is None:
        return 0
    folder = prepare_output_dir(args.out, force=args.force)
    config = {"n_delays": args.n_delays, "rank": args.rank, "tikhonov": args.tikhonov,
              "constant": args.constant, "protocol": args.protocol, "fitted_rank": dmd.rank_,
              "n_features": dmd.n_features_in_, "trajectories": str(args.trajectories),
              "batch_size": args.batch_size, **info}
    config = {k: (v if not isinstance(v, float) or math.isfinite(v) else None)
              for k, v in config.items()}
    parents = {"trajectories": file_sha256(args.trajectories)}
    path = save_artifact(folder, "dmd", dmd_tensors(dmd), config, kind="dmd", parents=parents)
    log.info("fitted rank %d on %d pairs (D=%d) in %.2fs -> %s", dmd.rank_, info["n_pairs"],
             dmd.n_features_in_, info["seconds"], path)
    print(f"dmd: rank {dmd.rank_}, D={dmd.n_features_in_}, {info['n_pairs']} pairs, "
          f"{info['world_size']} process(es), {info['seconds']:.2f}s -> {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = add_fit_arguments(argparse.ArgumentParser(
        prog="koopnet fit", description="Streamed, sharded DMD fit from a trajectory file."))
    return fit_command(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
