"""``koopnet depth-fit`` and ``koopnet depth-evaluate``: depth hybrids of a user's own network.

The network is named by a factory (``--model-factory package.module:function``, called with
``--factory-kwargs`` JSON) and a safetensors state dict (``--weights``); see
:mod:`koopnet.io.depth`. ``depth-fit`` runs :func:`koopnet.linearize_depth` on ``--data`` and
writes ``depth_hybrid.safetensors/json`` through :func:`koopnet.io.artifacts.staged_folder`;
``depth-evaluate`` rebuilds the network and the hybrid from that folder and scores both.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time
from pathlib import Path

import torch

from koopnet._checks import check_int
from koopnet._version import __version__
from koopnet.cli.fit import parse_rank, spec_from_args
from koopnet.cli.options import add_common, add_device
from koopnet.cli.stages import _check_inputs_outside, _stage_folder
from koopnet.depth import linearize_depth
from koopnet.io.artifacts import check_output_dir, staged_folder, write_json
from koopnet.io.depth import KIND, build_model, load_depth_files, read_inputs, save_depth_hybrid
from koopnet.lab.protocols import environment
from koopnet.models import model_dtype
from koopnet.spec import OBSERVABLE_KINDS

log = logging.getLogger(__name__)

__all__ = ["add_depth_parsers", "cmd_depth_evaluate", "cmd_depth_fit"]

_FACTORY_HELP = ("import path of a callable that returns the nn.Module, e.g. mypkg.models:"
                 "make_vit or koopnet.lab.residual:ResidualMLP. Its module is imported (from "
                 "PYTHONPATH or the current folder) and run: name only code you trust. The "
                 "weights themselves are never unpickled.")


def _blocks(text: str) -> list[str]:
    """``--blocks blocks.0,blocks.1`` -> ['blocks.0', 'blocks.1']."""
    names = [part.strip() for part in text.split(",")]
    if not all(names):
        raise argparse.ArgumentTypeError(f"--blocks {text!r} has an empty name; pass "
                                         "comma-separated module names such as "
                                         "blocks.0,blocks.1.")
    return names


def _kwargs(text: str) -> dict:
    """``--factory-kwargs '{"depth": 6}'`` -> {'depth': 6}."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"--factory-kwargs {text!r} is not valid JSON ({err});"
                                         ' pass an object such as \'{"depth": 6}\'.') from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"--factory-kwargs {text!r} must be a JSON object "
                                         'such as \'{"depth": 6}\'.')
    return value


def _with_cwd_importable() -> None:
    """Let ``--model-factory mymodels:make`` find ``./mymodels.py`` as ``python -m`` would;
    appended last, so an installed package of the same name wins."""
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.append(os.getcwd())


def _one_json_line(body, args: argparse.Namespace) -> int:
    """Run ``body(args)`` with the user's prints sent to stderr; stdout gets one JSON line."""
    with contextlib.redirect_stdout(sys.stderr):
        line = body(args)
    print(json.dumps(line))
    return 0


def cmd_depth_fit(args: argparse.Namespace) -> int:
    """Fit a depth hybrid of the named network on ``--data`` -> ``OUT/depth_hybrid.*``."""
    return _one_json_line(_depth_fit, args)


def _depth_fit(args: argparse.Namespace) -> dict:
    check_output_dir(args.out, force=args.force)  # a bad --out fails before any work
    _check_inputs_outside(args.out, args.weights, args.data)
    spec = spec_from_args(args).replace(exact_rollout=True)  # --observable's rules as in fit
    _with_cwd_importable()
    model = build_model(args.model_factory, args.weights, args.factory_kwargs)
    X, _, record = read_inputs(args.data)
    log.info("fitting a depth hybrid over %d blocks on %d samples of shape %s", len(args.blocks),
             len(X), list(X.shape[1:]))
    clock = time.perf_counter()
    hybrid = linearize_depth(model.to(args.device), args.blocks, X, spec=spec,
                             per_position=args.per_position, batch_size=args.batch_size)
    hybrid, seconds = hybrid.cpu(), round(time.perf_counter() - clock, 3)  # saved on the CPU
    metadata = {"stage": "depth-fit", "fit": spec.as_dict(), "data": record,
                "device": str(args.device), "seconds": seconds}
    with staged_folder(args.out, force=args.force) as stage:
        save_depth_hybrid(hybrid, stage, factory=args.model_factory, weights=args.weights,
                          factory_kwargs=args.factory_kwargs, metadata=metadata,
                          parents=record["sha256"])
    dmd = hybrid.dmd_
    log.info("rank %d of %d lifted features, %d pairs, %.2fs -> %s", dmd.rank_,
             dmd.n_features_in_, dmd.n_pairs_, seconds, args.out)
    return {"out": str(args.out), "blocks": len(hybrid.blocks), "n_delays": hybrid.n_delays,
            "linear_steps": hybrid.linear_steps, "rank_": dmd.rank_,
            "n_features": dmd.n_features_in_, "n_pairs": dmd.n_pairs_, "seconds": seconds}


def _outputs(model: torch.nn.Module, X: torch.Tensor, batch_size: int,
             device: torch.device) -> torch.Tensor:
    """The model's outputs on X in eval mode, batched, on the CPU. Shape: [n, ...]."""
    model.eval()
    with torch.no_grad():
        try:
            probe = model(X[:2].to(device))
        except Exception as err:  # the user's forward pass: name the data's shape, in one line
            first = (str(err).strip().splitlines() or [""])[0].rstrip(".")
            raise ValueError(f"data of shape {list(X.shape)} does not fit the model: on 2 "
                             f"samples it raised {type(err).__name__}: {first}. Pass inputs "
                             "[n, ...] shaped as the model takes them, samples first.") from err
        if not isinstance(probe, torch.Tensor):
            raise TypeError(f"the model returns a {type(probe).__name__}, not a tensor; "
                            "depth-evaluate scores networks that return one tensor (logits "
                            "[n, classes]): make the factory return a module that does.")
        return torch.cat([model(X[i:i + batch_size].to(device)).cpu()
                          for i in range(0, len(X), batch_size)])


def _metrics(original: torch.Tensor, hybrid: torch.Tensor, y: torch.Tensor | None) -> dict:
    """Accuracy (labels) or agreement with the original's argmax, and the relative output
    error ||hybrid - original|| / ||original|| (the map's fidelity, whatever the task)."""
    error = float((hybrid - original).double().norm() / original.double().norm().clamp_min(1e-300))
    if original.ndim != 2:
        if y is not None:
            raise ValueError(f"the model returns outputs of shape {list(original.shape)}, not "
                             "[n, classes]; accuracy needs class scores, so leave --labels out.")
        return {"n": len(original), "metric": "relative_output_error", "relative_error": error}
    reference, metric = (y, "accuracy") if y is not None else (
        original.argmax(1), "agreement_with_original")
    return {"n": len(original), "metric": metric,
            "original": float((original.argmax(1) == reference).double().mean()),
            "hybrid": float((hybrid.argmax(1) == reference).double().mean()),
            "relative_error": error}


def cmd_depth_evaluate(args: argparse.Namespace) -> int:
    """Score the original network and its depth hybrid on ``--data`` -> results.json."""
    return _one_json_line(_depth_evaluate, args)


def _depth_evaluate(args: argparse.Namespace) -> dict:
    folder = _stage_folder(args.fit_dir, KIND, "depth-evaluate", "depth-fit")
    if args.out is not None:
        check_output_dir(args.out, force=args.force)
        _check_inputs_outside(args.out, folder, args.data, args.labels, args.weights)
    batch_size = check_int(args.batch_size, "--batch-size", low=1)
    _with_cwd_importable()
    clock = time.perf_counter()
    hybrid, model, meta = load_depth_files(folder, weights=args.weights)
    X, y, record = read_inputs(args.data, args.labels)
    if X.is_floating_point():
        X = X.to(model_dtype(model))  # inputs read as saved; the weights decide the precision
    original = _outputs(model.to(args.device), X, batch_size, args.device)
    replaced = _outputs(hybrid.to(args.device), X, batch_size, args.device)
    config = meta["config"]
    results = {
        "stage": "depth-evaluate", "schema": 1, "koopnet_version": __version__,
        "data": record, "blocks": config["blocks"], "n_delays": hybrid.n_delays,
        "linear_steps": hybrid.linear_steps, "per_position": hybrid.per_position,
        "fit": {**config.get("fit", {}), "rank_": hybrid.rank_},
        "metrics": _metrics(original, replaced, y),
        "sources": {"depth_fit": str(folder.resolve()), "factory": config["factory"]},
        "parents": {"depth_hybrid": meta["sha256"], **meta["parents"]},
        "timings_s": {"evaluate": round(time.perf_counter() - clock, 3)},
        "environment": environment(args.device),
    }
    if args.out is None:  # beside the hybrid it scores; a new depth-fit replaces both
        path = folder / "results.json"
        write_json(path, results)
    else:
        with staged_folder(args.out, force=args.force) as stage:
            write_json(stage / "results.json", results)
        path = Path(args.out) / "results.json"
    return {"out": str(path.parent), "metrics": results["metrics"]}


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-factory", required=True, metavar="MODULE:CALLABLE",
                        help=_FACTORY_HELP)
    parser.add_argument("--factory-kwargs", type=_kwargs, default={}, metavar="JSON",
                        help='keyword arguments of the factory, e.g. \'{"depth": 6}\'')
    parser.add_argument("--weights", required=True,
                        help="safetensors file of the network's state_dict()")


def add_depth_parsers(sub) -> None:
    """Register ``koopnet depth-fit`` and ``koopnet depth-evaluate``."""
    fit = sub.add_parser("depth-fit", help="replace a residual stack's last blocks of your own "
                                           "network by a DMD map along depth -> depth_hybrid.*")
    _add_model_options(fit)
    fit.add_argument("--blocks", type=_blocks, required=True,
                     help="comma-separated names of consecutive same-shape blocks, e.g. "
                          "blocks.0,blocks.1,blocks.2 (see model.named_modules())")
    fit.add_argument("--data", required=True, help="inputs: X.npy or a .safetensors file with "
                                                   "X, shaped [n, ...] as the model takes them")
    fit.add_argument("--n-delays", type=int, default=1, metavar="H",
                     help="delays h = blocks that still run (default 1)")
    fit.add_argument("--rank", type=parse_rank, default=None,
                     help="none = full numerical rank, int = that many modes, float in (0,1) = "
                          "energy fraction, 0 = optimal hard threshold")
    fit.add_argument("--tikhonov", type=float, default=0.0, help="relative Tikhonov damping")
    fit.add_argument("--constant", action="store_true", help="append the constant observable 1")
    fit.add_argument("--observable", choices=OBSERVABLE_KINDS, default="delay",
                     help="delay coordinates (default), or delay coordinates plus a learned "
                          "encoder psi trained on all the depth states (held in memory)")
    fit.add_argument("--latent-dims", type=int, default=None, metavar="R",
                     help="--observable learned: psi's output size (default: the state width; "
                          "at most 4x it)")
    fit.add_argument("--learned-steps", type=int, default=None, metavar="N",
                     help="--observable learned: psi's training steps (default 300)")
    fit.add_argument("--learned-seed", type=int, default=None, metavar="S",
                     help="--observable learned: psi's initialisation and batch seed (default 0)")
    fit.add_argument("--per-position", action="store_true",
                     help="one operator over each position's features (tokens, pixels)")
    fit.add_argument("--batch-size", type=int, default=1024, help="samples per forward pass")
    add_common(fit, seed=False, data_dir=False)
    # depth trajectories are paired within each sample; spec_from_args reads these two
    fit.set_defaults(func=cmd_depth_fit, pairing="trajectory", protocol=None)

    evaluate = sub.add_parser("depth-evaluate", help="accuracy of your network and its depth "
                                                     "hybrid -> results.json")
    evaluate.add_argument("fit_dir", help="output folder of `koopnet depth-fit`")
    evaluate.add_argument("--data", required=True, help="X.npy or a .safetensors file with X "
                                                        "(and y)")
    evaluate.add_argument("--labels", help="y.npy class indices (without labels: agreement "
                                           "with the original network)")
    evaluate.add_argument("--weights", help="the weights file, if it moved (its sha256 must be "
                                            "the recorded one)")
    evaluate.add_argument("--batch-size", type=int, default=1024, help="samples per pass")
    evaluate.add_argument("--out", help="folder for results.json (default: FIT_DIR)")
    evaluate.add_argument("--force", action="store_true", help="write into a non-empty --out")
    evaluate.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS)
    add_device(evaluate)
    evaluate.set_defaults(func=cmd_depth_evaluate)
