"""``koopnet fit``: the staged fit of a scale folder, or a streamed (and sharded) DMD fit of a
trajectory file (see :mod:`koopnet.io.trajectories`).

Run as ``koopnet fit ...`` or under torchrun as
``torchrun --nproc_per_node 2 -m koopnet fit --trajectories t.safetensors ...``.
"""

from __future__ import annotations

import argparse
import logging
import math

from koopnet.io.artifacts import check_output_dir, file_sha256, prepare_output_dir, save_artifact
from koopnet.io.trajectories import dmd_tensors, fit_file
from koopnet.spec import OBSERVABLE_KINDS, PAIRINGS, FitSpec

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
    parser.add_argument("--pairing", choices=PAIRINGS, default=None,
                        help="snapshot pairs inside each trajectory (default), or the paper's "
                             "concatenated series")
    parser.add_argument("--protocol", choices=PAIRINGS, default=None,
                        help=argparse.SUPPRESS)  # 0.1 name of --pairing, deprecated
    parser.add_argument("--observable", choices=OBSERVABLE_KINDS, default="delay",
                        help="delay coordinates (default), or delay coordinates plus a learned "
                             "encoder psi trained on the trajectories (SCALE_DIR only)")
    parser.add_argument("--latent-dims", type=int, default=None, metavar="R",
                        help="--observable learned: psi's output size (default: the layer "
                             "width; at most 4x it)")
    parser.add_argument("--learned-steps", type=int, default=None, metavar="N",
                        help="--observable learned: psi's training steps (default 300)")
    parser.add_argument("--learned-seed", type=int, default=None, metavar="S",
                        help="--observable learned: psi's initialisation and batch seed "
                             "(default 0)")
    parser.add_argument("--batch-size", type=int, default=4096,
                        help="trajectories per streamed batch (memory is O(batch + D^2))")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder")
    parser.add_argument("--force", action="store_true", help="write into a non-empty folder")
    return parser


def spec_from_args(args: argparse.Namespace) -> FitSpec:
    """The FitSpec of ``koopnet fit``'s options (``--protocol`` is --pairing's old name)."""
    pairing = args.pairing
    if args.protocol is not None:
        log.warning("--protocol is deprecated and will be removed in koopnet 0.3; use "
                    "--pairing %s", args.protocol)
        if pairing is not None and pairing != args.protocol:
            raise ValueError(f"--pairing {pairing} and --protocol {args.protocol} disagree; "
                             "pass --pairing only.")
        pairing = args.protocol
    options = {"latent_dims": args.latent_dims, "n_steps": args.learned_steps,
               "seed": args.learned_seed}
    if args.observable != "learned":
        given = [flag for flag, value in zip(("--latent-dims", "--learned-steps",
                                              "--learned-seed"), options.values(), strict=True)
                 if value is not None]
        if given:
            raise ValueError(f"{' and '.join(given)} apply to --observable learned only; add "
                             "--observable learned or leave them out.")
    elif getattr(args, "trajectories", None) is not None:
        raise ValueError("--observable learned needs a scale folder (koopnet fit SCALE_DIR "
                         "--observable learned): psi is trained on whole trajectories, which "
                         "the streamed --trajectories fit never holds at once.")
    learned = {k: v for k, v in options.items() if v is not None}
    return FitSpec(args.n_delays, args.rank, args.tikhonov, args.constant,
                   pairing or "trajectory", observable_kind=args.observable, **learned)


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
    spec = spec_from_args(args)
    check_output_dir(args.out, force=args.force)  # on every rank, before the collective
    dmd, info = fit_file(args.trajectories, spec, batch_size=args.batch_size,
                         tensor=args.tensor)
    if dmd is None:
        return 0
    folder = prepare_output_dir(args.out, force=args.force)
    config = {**spec.as_dict(), "rank_": dmd.rank_,
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
