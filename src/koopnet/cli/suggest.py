"""``koopnet suggest``: propose a layer and h for a tolerance from closed-form scores alone.

The scores (:mod:`koopnet.lab.predict`) need one pass of trajectories of each scaled layer on the
training and validation inputs; no hybrid is built or evaluated. The proposal is the cell with
the most linear steps (smallest h) whose score is under a threshold. The default score,
``flip`` (the predicted share of decisions the hybrid changes), ranks measured drops best and
needs no calibration: its threshold is the tolerance itself
(:data:`koopnet.lab.predict.FIRST_ORDER_BOUND`). Any score can instead take its threshold from a
calibration: cells of earlier runs whose drop was measured (``--calibration FILE``, e.g.
benchmarks/results/predict_drop.json), or the built-in one of clean Yin-Yang
(``--calibration yinyang``, :data:`koopnet.lab.predict.BUILTIN_CALIBRATIONS`; the default for
the other scores). The output names the rule it used.

Inputs: scale folders (``koopnet scale``, one per layer, all of the same trained model), or a
clean-protocol ``koopnet reproduce`` folder, whose scaled networks are rebuilt from its recorded
recipe (the run keeps no weights; the sweep it recorded is then shown beside the proposal).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
from pathlib import Path

import torch

from koopnet.io.serialize import load_with_meta
from koopnet.io.sources import reload_data
from koopnet.lab.predict import (
    BUILTIN_CALIBRATIONS,
    FIRST_ORDER_BOUND,
    SCORES,
    calibrated_threshold,
    layer_cells,
)
from koopnet.lab.predict import suggest as pick_cell
from koopnet.trajectories import collect_trajectories

log = logging.getLogger(__name__)

__all__ = ["add_suggest_parser", "cmd_suggest", "load_calibration", "suggest_folders"]

#: share of a file data set (one split, no validation) held out to score the fits on
HELD_OUT_SHARE = 0.2


def _file_splits(X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A file data set has one split: its last fifth scores the fits on the rest."""
    n_val = max(1, int(len(X) * HELD_OUT_SHARE))
    if len(X) - n_val < 2:
        raise ValueError(f"the data set has {len(X)} samples; suggest needs at least 3 (the "
                         "fits are scored on a held-out fifth).")
    return X[:-n_val], X[-n_val:]


def _scale_layer_states(folder: Path, max_samples: int) -> tuple[dict, dict]:
    """(layer entry with train/val states, provenance) of one scale folder."""
    if not (folder / "scaled.json").is_file():
        raise FileNotFoundError(f"'{folder}' holds no scaled.json: pass output folders of "
                                "`koopnet scale` or one of `koopnet reproduce`.")
    scaled, meta = load_with_meta(folder, "scaled")
    report = meta["config"].get("report", {})
    if report.get("ok") is False:
        raise ValueError(f"'{folder}' records a failed scaling (agreement "
                         f"{report.get('agreement')}); re-run koopnet scale before suggesting "
                         "on it.")
    splits, record = reload_data(meta, folder / "scaled.json", "scale", "re-run koopnet scale")
    if "train" in splits and "val" in splits:
        train, val = splits["train"][0], splits["val"][0]
    else:
        train, val = _file_splits(splits["data"][0])
    entry = {"layer": scaled.layer, "out_width": scaled.out_width, "tail": scaled.tail,
             "train": collect_trajectories(scaled, train[:max_samples]).states,
             "val": collect_trajectories(scaled, val[:max_samples]).states}
    return entry, {"folder": str(folder.resolve()), "layer": scaled.layer,
                   "model": meta.get("parents", {}).get("model"),
                   "data": record.get("source")}


def _rebuilt_config(results: dict, where: Path):
    """The ExperimentConfig a reproduce run recorded, rebuilt from koopnet's recipes."""
    from koopnet.lab.recipes import ExperimentConfig, default_config

    recorded = results.get("config")
    if not isinstance(recorded, dict) or "dataset" not in recorded:
        raise ValueError(f"'{where}' records no run config; it is not a `koopnet reproduce` "
                         "results.json.")
    if recorded.get("protocol") != "clean":
        raise ValueError(f"'{where}' is a {recorded.get('protocol')}-protocol run, whose "
                         "'validation' set is its test set; suggest scores on a validation "
                         "split: use a clean-protocol run or scale folders.")
    for quick in (False, True):
        config = default_config(recorded["dataset"], "clean", seed=recorded.get("seed", 0),
                                quick=quick, data_dir=recorded.get("data_dir"),
                                observables=tuple(recorded.get("observables", ("delay",))))
        config = dataclasses.replace(config, widths=tuple(recorded.get("widths", ())))
        if _agrees(recorded, _as_json(config), _as_json(ExperimentConfig())):
            return config
    raise ValueError(f"the recipe recorded in '{where}' is not one this koopnet version has "
                     "(it changed since the run); re-run koopnet reproduce, or scale the "
                     "layers with koopnet scale and pass those folders.")


def _as_json(config) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(config)))


def _agrees(recorded, current, default) -> bool:
    """The recorded recipe equals the current one; a setting added after the run (absent from
    its record) must hold its default, which is how such settings keep old runs reproducible."""
    if not (isinstance(recorded, dict) and isinstance(current, dict)):
        return recorded == current
    default = default if isinstance(default, dict) else {}
    return set(recorded) <= set(current) and all(
        _agrees(recorded[key], value, default.get(key)) if key in recorded
        else value == default.get(key) for key, value in current.items())


def _reproduce_states(folder: Path, max_samples: int, progress: bool):
    """Layer entries of a reproduce folder (networks rebuilt), its provenance and its sweep."""
    from koopnet.lab.protocols import load_protocol_data, scale_for_protocol, train_base
    from koopnet.models import accuracy

    results = json.loads((folder / "results.json").read_text())
    config = _rebuilt_config(results, folder / "results.json")
    log.info("rebuilding the base model and %d scaled layers of '%s' (no sweep)",
             len(config.layers), folder)
    data = load_protocol_data(config)
    model = train_base(config, data, progress)
    original = accuracy(model, data.val.X, data.val.y)
    same = math.isclose(original, results.get("original", {}).get("val_accuracy", -1.0),
                        abs_tol=1e-9)
    if not same:
        log.warning("the rebuilt base model scores %.4f on validation, the run recorded %s "
                    "(another BLAS thread count trains a slightly different network); the "
                    "proposal is for the rebuilt networks and the run's sweep is not shown",
                    original, results.get("original", {}).get("val_accuracy"))
    entries, failed = [], []
    for layer in config.layers:
        scaled, report = scale_for_protocol(config, model, data, layer, progress)
        if not report.ok:  # as a failed scale folder is refused, a failed layer is not proposed
            log.warning("the scaling of layer %d failed; it is left out of the proposal", layer)
            failed.append(layer)
            continue
        entries.append({"layer": layer, "out_width": scaled.out_width, "tail": scaled.tail,
                        "train": collect_trajectories(
                            scaled, data.trajectories.X[:max_samples]).states,
                        "val": collect_trajectories(scaled, data.val.X[:max_samples]).states})
    if not entries:
        raise ValueError(f"the scaling of every layer of '{folder}' failed when rebuilt; "
                         "scale the layers with koopnet scale (another --seed or --init "
                         "identity) and pass those folders.")
    source = {"folder": str(folder.resolve()), "rebuilt": True, "same_base_model": same,
              "failed_layers": failed}
    return entries, source, (results if same else None)


def load_calibration(path) -> dict:
    """A calibration file: JSON with ``cells`` holding scores and a measured ``drop``."""
    path = Path(path)
    try:
        calibration = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"'{path}' is not JSON ({err.msg}); pass the predict_drop.json that "
                         "benchmarks/predict_drop.py writes.") from None
    if not isinstance(calibration, dict) or not isinstance(calibration.get("cells"), list):
        raise ValueError(f"'{path}' holds no list 'cells'; pass the predict_drop.json that "
                         "benchmarks/predict_drop.py writes.")
    seeds = calibration.get("seeds")
    return {"cells": calibration["cells"],
            "source": f"{path}" + (f" (seeds {seeds}, commit {calibration.get('commit')})"
                                   if seeds is not None else "")}


def _validated(results: dict | None, layer: int, h: int) -> dict | None:
    """The run's own best validation row at (layer, h): shown, never used to choose."""
    if results is None:
        return None
    rows = [r for r in results.get("sweep", []) if r["layer"] == layer and r["n_delays"] == h]
    if not rows:
        return None
    best = max(r["val_accuracy"] for r in rows)
    return {"val_accuracy": best,
            "drop_points": 100 * (results["original"]["val_accuracy"] - best)}


def suggest_folders(folders, *, tolerance: float = 0.5, calibration: dict | str | None = None,
                    score: str = "flip", max_samples: int = 5000,
                    progress: bool = False) -> dict:
    """The proposal of ``koopnet suggest`` for ``folders``; ``tolerance`` in accuracy points.

    ``calibration``: a loaded calibration file (:func:`load_calibration`), "yinyang" (the
    built-in one of the score) or None (the score's default rule, see the module docstring).
    """
    if score not in SCORES:
        raise ValueError(f"--score {score!r} must be one of {', '.join(SCORES)}.")
    if not math.isfinite(tolerance) or tolerance < 0:
        raise ValueError(f"--tolerance {tolerance} must be a number of accuracy points >= 0 "
                         "(e.g. 0.5).")
    if max_samples < 1:
        raise ValueError(f"--max-samples {max_samples} must be >= 1.")
    if calibration is None:
        calibration = FIRST_ORDER_BOUND if score == "flip" else "yinyang"
    if calibration == "yinyang":
        calibration = BUILTIN_CALIBRATIONS.get(score, BUILTIN_CALIBRATIONS["residual"])
    threshold, record = calibrated_threshold(calibration, score, tolerance / 100)
    entries, sources, results = _load_entries([Path(f) for f in folders], max_samples,
                                              progress)
    cells = []
    for entry in entries:
        cells += layer_cells(entry["train"], entry["val"], entry["layer"],
                             out_width=entry["out_width"],  # flip needs the tail's Jacobian
                             tail=entry["tail"] if score == "flip" else None)
    pick = pick_cell(cells, score, threshold)
    within = pick[score] <= threshold
    if not within:
        log.warning("no (layer, h) scores under the threshold %.4g; proposing the lowest-"
                    "scoring one, whose drop may exceed %.2f point", threshold, tolerance)
    out = {"layer": pick["layer"], "h": pick["h"], "linear_steps": pick["linear_steps"],
           "score": score, "value": pick[score], "threshold": threshold,
           "under_threshold": within, "tolerance_points": tolerance, "calibration": record}
    validated = _validated(results, pick["layer"], pick["h"])
    if validated is not None:
        out["run_validated"] = validated
    out["sources"] = sources
    out["cells"] = [{k: c[k] for k in ("layer", "h", *SCORES) if k in c} for c in cells]
    return _json_safe(out)


def _json_safe(value):
    """JSON has no infinities: an infinite score or threshold is written as null."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _load_entries(folders: list[Path], max_samples: int, progress: bool):
    """Layer entries of the folders: one reproduce folder, or scale folders of one model."""
    for folder in folders:
        if not folder.is_dir():
            raise FileNotFoundError(f"'{folder}' is not a folder; pass output folders of "
                                    "`koopnet scale` or one of `koopnet reproduce`.")
    runs = [f for f in folders if (f / "results.json").is_file()
            and not (f / "scaled.json").is_file()]
    if runs:
        if len(folders) > 1:
            raise ValueError("pass one koopnet reproduce folder alone, or scale folders; not "
                             "a mix or several runs.")
        entries, source, results = _reproduce_states(folders[0], max_samples, progress)
        return entries, [source], results
    loaded = [_scale_layer_states(f, max_samples) for f in folders]
    layers = [source["layer"] for _, source in loaded]
    if len(set(layers)) != len(layers):
        raise ValueError(f"two scale folders scale the same layer (layers {layers}); pass one "
                         "folder per layer.")
    if len({(s["model"], s["data"]) for _, s in loaded}) > 1:
        raise ValueError("the scale folders come from different models or data sets; pass "
                         "folders scaled from the same `koopnet train` run (or --model).")
    return [entry for entry, _ in loaded], [source for _, source in loaded], None


def cmd_suggest(args: argparse.Namespace) -> int:
    calibration = (args.calibration if args.calibration in (None, "yinyang")
                   else load_calibration(args.calibration))
    out = suggest_folders(args.folders, tolerance=args.tolerance, calibration=calibration,
                          score=args.score, max_samples=args.max_samples,
                          progress=not args.quiet)
    log.info("proposal: layer %d, h = %d (%d linear steps), %s %s (threshold %s, %s)",
             out["layer"], out["h"], out["linear_steps"], out["score"], out["value"],
             out["threshold"], out["calibration"]["source"])
    print(json.dumps(out))
    return 0


def add_suggest_parser(sub) -> argparse.ArgumentParser:
    """``koopnet suggest FOLDER [FOLDER ...] [--tolerance P] [--calibration FILE]``."""
    parser = sub.add_parser("suggest", help="propose the layer and h for a tolerance from "
                                            "closed-form scores (no hybrid evaluated)")
    parser.add_argument("folders", nargs="+", metavar="FOLDER",
                        help="output folders of `koopnet scale` (one per layer, same model), or "
                             "one clean `koopnet reproduce` folder (its networks are rebuilt)")
    parser.add_argument("--tolerance", type=float, default=0.5,
                        help="accuracy drop allowed, in points (default 0.5)")
    parser.add_argument("--calibration", metavar="FILE|yinyang",
                        help="JSON with cells of scores and measured drops, or 'yinyang' for "
                             "the built-in clean Yin-Yang calibration (default: none for flip, "
                             "whose threshold is the tolerance; yinyang for the other scores)")
    parser.add_argument("--score", default="flip", choices=SCORES,
                        help="which closed-form score to threshold (default flip: the "
                             "predicted share of changed decisions, which ranks drops best; "
                             "residual: the one-step DMD residual, faster)")
    parser.add_argument("--max-samples", type=int, default=5000,
                        help="trajectories per split that are scored (default 5000)")
    parser.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS)
    parser.set_defaults(func=cmd_suggest)
    return parser
