"""How well do closed-form scores predict a hybrid's accuracy drop? (issue 13, item 4)

For the clean Yin-Yang protocol (seeds 0, 1, 2; one full run per seed, reused), every layer and
h = 0..10: the scores of ``koopnet.lab.predict.drop_scores`` and ``flip_score`` (from the scaled
network's train and validation trajectories and, for ``flip``, the tail's Jacobian on them; no
hybrid is run) and the measured drop (original validation accuracy minus the
best validation row's accuracy at that layer and h, over rank, Tikhonov and constant). Reports
Spearman's rho of each score against the drop over all layers x h x seeds, and which (layer, h)
each score suggests for a 0.5-point tolerance (``rollout_min``: the roll-out error at the best
of the sweep's Tikhonov values, as the sweep itself chooses among them): the threshold is
calibrated on the other seeds (leave one seed out) and the suggestion is the cell with the
most linear steps under it, which is what ``koopnet suggest`` proposes. Each suggestion is set
beside the best validated setting: the cell with the most linear steps whose validated drop is
within tolerance (what the sweep would choose for it), and whether the suggestion's validation
accuracy is within 0.5 point of that one's. The built-in calibrations of ``koopnet suggest``
(seeds 0-2 together, so in-sample here) are shown too, and the thresholds they hold are
recomputed (``builtin_thresholds``). ``exact_flip_ref`` runs the tail on the roll-out: the
hybrid's own decisions, reported as an upper reference, never as a score.
``--dataset mnist`` does the same on clean MNIST from the cached runs of
benchmarks/mnist_runs.py (its reduced sweep grid; the scores fit on the first ``SCORE_TRAIN``
training trajectories, the sweep on all of them).

    OMP_NUM_THREADS=1 python benchmarks/predict_drop.py
    OMP_NUM_THREADS=1 python benchmarks/predict_drop.py --reuse  # report from the saved cells
    OMP_NUM_THREADS=1 python benchmarks/predict_drop.py --dataset mnist --data-dir ../shared/data

Writes benchmarks/results/predict_drop.{json,md} (MNIST: predict_drop_mnist.{json,md}).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import time
from pathlib import Path

import torch

from koopnet.dmd import DMD
from koopnet.io.artifacts import atomic_write_text
from koopnet.lab import predict, protocols
from koopnet.lab.predict import (
    BUILTIN_CALIBRATIONS,
    FIRST_ORDER_BOUND,
    calibrate,
    calibrated_threshold,
    drop_scores,
    first_order_flips,
    flip_score,
    rank_correlation,
    rollout_errors,
    suggest,
    sweep_fits,
)
from koopnet.lab.recipes import default_config
from koopnet.observables import TimeDelay
from koopnet.streaming import TrajectoryMoments
from koopnet.trajectories import collect_trajectories

try:  # run as a script: benchmarks/ is on the path
    import mnist_runs
except ImportError:  # imported as benchmarks.predict_drop
    from benchmarks import mnist_runs

HERE = Path(__file__).resolve().parent
SEEDS = (0, 1, 2)
TOLERANCE = 0.005
SCORES = ("unexplained", "residual", "rollout", "rollout_min", "flip", "flip_margin",
          "flip_one_fit")
#: the tolerances of the built-in calibrations (lab.predict.BUILTIN_CALIBRATIONS)
BUILTIN_TOLERANCES = (0.0025, 0.005, 0.01, 0.02, 0.05)
ONE_FIT = {"rank": None, "constant": True, "tikhonov": 1e-6}  # drop_scores' defaults
#: MNIST: the R^2 of ``unexplained`` is fitted on the first 10k of the 55k training trajectories
#: (its least squares on all of them is the slow part); every DMD fit uses all 55k (gram_fits)
SCORE_TRAIN = 10000


def flip_reference(train, val, h: int, tail, fits: list[dict], out_width: int,
                   fitter=None) -> dict:
    """Per fit: first-order flips of the one default fit, and the EXACT flips tail(s_hat) vs
    tail(s_{T-1}), least over ``fits``. The exact one runs the hybrid's tail on its roll-out, so it
    is an upper reference for what any prediction can reach, never a score."""
    tail64, exact = copy.deepcopy(tail).double(), []
    for fit in fits:
        features = train.shape[2] * (h + 1) + fit["constant"]
        if isinstance(fit["rank"], int) and fit["rank"] > features:
            continue  # as the sweep and flip_score skip a rank the lifted state cannot hold
        target, error = rollout_errors(train, val, h, out_width=out_width, fitter=fitter,
                                       **fit)
        with torch.no_grad():
            changed = tail64(target + error).argmax(1) != tail64(target).argmax(1)
        exact.append(float(changed.double().mean()))
    target, error = rollout_errors(train, val, h, out_width=out_width, fitter=fitter,
                                   **ONE_FIT)
    return {"flip_one_fit": first_order_flips(tail, target, error)["flip"],
            "exact_flip_ref": min(exact)}


def run_seed(seed: int) -> list[dict]:
    """One clean run; one cell per (layer, h) with its scores and measured drop."""
    config = default_config("yinyang", seed=seed)
    seen = {}
    real = protocols.load_protocol_data

    def keep(config):
        seen["data"] = real(config)
        return seen["data"]

    protocols.load_protocol_data = keep
    try:
        results, figures = protocols.run_experiment(config, progress=False)
    finally:
        protocols.load_protocol_data = real
    data, original = seen["data"], results["original"]["val_accuracy"]
    cells = []
    for layer, entry in figures["layers"].items():
        scaled = entry["scaled"]
        train = collect_trajectories(scaled, data.trajectories.X).states
        val = collect_trajectories(scaled, data.val.X).states
        for h in config.delays:
            rows = [r for r in results["sweep"] if r["layer"] == layer and r["n_delays"] == h]
            if not rows:
                continue
            cells.append(score_cell(config, layer, scaled, train, val, h, protocols.select(rows),
                                    original))
    return cells


def run_seed_mnist(seed: int, data_dir: str, cache: Path) -> list[dict]:
    """The same cells from one cached clean MNIST run (benchmarks/mnist_runs.py); the cells are
    cached too."""
    path = cache / f"seed{seed}_cells.json"
    if path.exists():
        return json.loads(path.read_text())
    run = mnist_runs.load(seed, data_dir, cache)
    config, data, sweep = run["config"], run["data"], run["sweep"]
    cells = []
    for layer, scaled in run["scaled"].items():
        clock = time.perf_counter()
        train = collect_trajectories(scaled, data.trajectories.X).states
        val = collect_trajectories(scaled, data.val.X).states
        fitter = gram_fits(train)
        for h in config.delays:
            if (layer, h) in sweep["cells"]:
                cells.append(score_cell(config, layer, scaled, train[:SCORE_TRAIN], val, h,
                                        sweep["cells"][layer, h],
                                        sweep["original"]["val_accuracy"], fitter))
        print(f"seed {seed}: layer {layer} scored in {time.perf_counter() - clock:.0f} s",
              flush=True)
    atomic_write_text(path, json.dumps(cells))
    return cells


def gram_fits(train: torch.Tensor):
    """MNIST: the scores' ``fitter`` (``koopnet.lab.predict.drop_scores``): each DMD as the
    sweep fits it, from the streamed Gram statistics of ALL training trajectories ``train``
    [B, T, W] (equal to the SVD route in theory), one eigendecomposition per (h, constant)
    shared by every rank and Tikhonov value: the scores' fits are then the sweep's own fits, in
    seconds instead of an SVD of the lifted pairs per fit."""
    moments = TrajectoryMoments(train.shape[1], train.shape[2])
    for start in range(0, len(train), 8192):
        moments.update(train[start:start + 8192])
    stats = {}

    def fit(states, h: int, constant: bool, tikhonov: float, rank=None):
        if (h, constant) not in stats:
            stats[h, constant] = moments.pair_statistics(h, constant=constant)
        dmd = DMD(rank=rank, tikhonov=tikhonov, exact_rollout=True)
        return TimeDelay(h, constant=constant).fit(states), dmd.fit_statistics(stats[h, constant])

    return fit


def score_cell(config, layer: int, scaled, train, val, h: int, best: dict,
               original: float, fitter=None) -> dict:
    """One (layer, h) cell: its scores (from trajectories alone) and the measured drop of the
    sweep's best validation row ``best``; ``fitter``: how the scores fit their DMDs (default:
    on ``train``'s lifted pairs)."""
    clock = time.perf_counter()
    scores = drop_scores(train, val, h, out_width=scaled.out_width, fitter=fitter)
    # the sweep picks among Tikhonov values; so can the roll-out score (still closed form):
    # drop_scores' rollout, from the roll-out errors alone
    scores["rollout_min"] = min(
        predict._relative(error, target) for target, error in (
            rollout_errors(train, val, h, tikhonov=t, out_width=scaled.out_width, fitter=fitter)
            for t in config.tikhonovs))
    score_time = time.perf_counter() - clock
    clock = time.perf_counter()
    scores |= flip_score(train, val, h, scaled.tail, fits=sweep_fits(config),
                         out_width=scaled.out_width, fitter=fitter)
    flip_time = time.perf_counter() - clock
    scores |= flip_reference(train, val, h, scaled.tail, sweep_fits(config),
                             scaled.out_width, fitter)
    return {"seed": config.seed, "layer": layer, "h": h, **scores,
            "score_time_s": score_time, "flip_time_s": flip_time,
            "val_accuracy": best["val_accuracy"], "test_accuracy": best["test_accuracy"],
            "drop": original - best["val_accuracy"]}


def _compare(pick: dict, own: list[dict]) -> dict:
    """A suggestion beside the best validated setting of its seed."""
    within = [c for c in own if c["drop"] <= TOLERANCE]
    oracle = min(within, key=lambda c: (c["h"], c["drop"])) if within else None
    gap = None if oracle is None else oracle["val_accuracy"] - pick["val_accuracy"]
    return {"layer": pick["layer"], "h": pick["h"], "drop": pick["drop"],
            "within": pick["drop"] <= TOLERANCE,
            "oracle_layer": oracle and oracle["layer"], "oracle_h": oracle and oracle["h"],
            "gap_to_oracle": gap, "near_oracle": gap is not None and gap <= TOLERANCE}


def suggestions(cells: list[dict]) -> list[dict]:
    """Per score and seed: the leave-one-seed-out suggestion and its validated drop."""
    out, seeds = [], sorted({c["seed"] for c in cells})
    for score in SCORES:
        for seed in seeds:
            own = [c for c in cells if c["seed"] == seed]
            others = [c for c in cells if c["seed"] != seed]
            threshold = calibrate(others, score, TOLERANCE)
            out.append({"score": score, "seed": seed, "threshold": threshold,
                        **_compare(suggest(own, score, threshold), own)})
    return out


def fixed_suggestions(cells: list[dict], rules: dict[str, dict]) -> list[dict]:
    """Per (score, rule) and seed: what ``koopnet suggest --score`` proposes with a threshold
    fixed in advance (a built-in calibration, or flip's first-order bound)."""
    out, seeds = [], sorted({c["seed"] for c in cells})
    for score, rule in rules.items():
        threshold, _ = calibrated_threshold(rule, score, TOLERANCE)
        for seed in seeds:
            own = [c for c in cells if c["seed"] == seed]
            out.append({"score": score, "seed": seed, "threshold": threshold,
                        **_compare(suggest(own, score, threshold), own)})
    return out


def builtin_thresholds(cells: list[dict]) -> dict:
    """Thresholds a built-in calibration holds: :func:`calibrate` over every cell (all seeds)."""
    return {score: {str(t): calibrate(cells, score, t) for t in BUILTIN_TOLERANCES}
            for score in ("residual", "flip")}


#: the Yin-Yang report's own text where the MNIST one differs
YINYANG_TEXT = {
    "title": "# Predicting the accuracy drop (clean Yin-Yang, seeds 0-2)",
    "command": "Command: `OMP_NUM_THREADS=1 python benchmarks/predict_drop.py` (",
    "fits": "sweep's 40 fits", "grid": [],
    "builtin": "(calibrated on all three seeds, so in-sample here):",
    "footer": "MNIST: `predict_drop_mnist.md` (`--dataset mnist`).",
}
MNIST_TEXT = {
    "title": "# Predicting the accuracy drop (clean MNIST, seeds {seeds})",
    "command": "Command: `OMP_NUM_THREADS=1 python benchmarks/predict_drop.py --dataset mnist "
               "--data-dir ../shared/data --seeds {seeds_args}` (one clean run per seed from "
               "`benchmarks/mnist_runs.py`, cached in /tmp/mnist_runs; ",
    "fits": "sweep's 15 fits",
    "grid": ["", "The MNIST runs are the clean protocol's (`default_config('mnist', seed=s)`: "
             "base training, the scaled network of layers 1-3, the delay-DMD sweep of h = 0..10 "
             "over the recipe's grid, ranks (None, 0.9999, 0.999, 500, 200) x Tikhonov (0, "
             "1e-6, 1e-4) with a constant, on all 55k training trajectories); the sweep scores "
             "every row on the 5k validation split and the measured drop is the best validation "
             "row at (layer, h). The scores' DMD fits are the sweep's own (the Gram statistics "
             "of all 55k training trajectories, `gram_fits`), each score is computed on the "
             "validation trajectories, and the R^2 of `unexplained` is fitted on the first 10k "
             "training trajectories. No hybrid is run for any score. Test accuracy of each "
             "cell's best validation row is in the json, never used."],
    "builtin": "(calibrated on Yin-Yang seeds 0-2: out of sample here, another data set):",
    "footer": "Thresholds above: what a calibration on these MNIST cells would hold; `koopnet "
              "suggest` ships the Yin-Yang ones.",
}


def markdown(report: dict) -> str:
    text = MNIST_TEXT if report.get("dataset") == "mnist" else YINYANG_TEXT
    if "command_args" in report:  # Yin-Yang seeds that no built-in calibration saw
        text = {**text, "title": "# Predicting the accuracy drop (clean Yin-Yang, seeds {seeds})",
                "command": text["command"].replace(
                    "predict_drop.py`", f"predict_drop.py {report['command_args']}`"),
                "builtin": "(calibrated on seeds 0-2: in sample for those seeds, out of sample "
                           "for the others):" if report["command_args"].startswith("--pool")
                           else "(calibrated on seeds 0-2: out of sample here):"}
    lines = [text["title"].format(seeds=", ".join(map(str, report["seeds"]))), "",
             f"{text['command'].replace('{seeds_args}', ' '.join(map(str, report['seeds'])))}"
             f"cells measured at commit {report['cells_commit']}; report at "
             f"commit {report['commit']}, {report['elapsed_s']:.0f} s).", *text["grid"], "",
             "Spearman rho of each score (higher = worse) against the measured validation drop "
             f"over {report['n_cells']} cells (layers x h x seeds). `flip`: predicted share of "
             "validation decisions that change, the roll-out error carried to the logits to "
             f"first order by the tail's Jacobian, least over the {text['fits']} (rank x "
             "constant x Tikhonov); `flip_margin`: the same with near-flips counted by the "
             "share of the margin closed; `flip_one_fit`: `flip` of the single default fit. "
             "`exact_flip_ref` is NOT a score: it runs the tail on the roll-out (the hybrid's "
             "own decisions, least over the same fits), an upper reference for any prediction "
             "built on these fits.", "",
             "| score | rho (all) | rho per layer (1, 2, 3) | rho per seed, mean +- sd | "
             "time per cell |", "|---|---|---|---|---|"]
    for score in (*SCORES, "exact_flip_ref"):
        per = report["rho_per_layer"][score]
        key = "flip_time_s" if score in ("flip", "flip_margin") else "score_time_s"
        clock = "-" if score in ("flip_one_fit", "exact_flip_ref") else \
            f"{report['mean_time_s'][key]:.2f} s"
        seeds = list(report["rho_per_seed"][score].values())
        spread = f" +- {statistics.stdev(seeds):.3f}" if len(seeds) > 1 else ""
        lines.append(f"| {score} | {report['rho'][score]:.3f} | "
                     f"{', '.join(f'{v:.3f}' for v in per.values())} | "
                     f"{statistics.mean(seeds):.3f}{spread} | {clock} |")
    bar = [s for s in SCORES if report["rho"][s] >= 0.9]
    lines += ["", f"Issue 13's bar, rho >= 0.9 over all cells: met by {', '.join(bar) or 'none'}; "
              "within every layer: met by " + (", ".join(
                  s for s in bar if min(report["rho_per_layer"][s].values()) >= 0.9) or "none")
              + "."]
    lines += ["", "Suggestion for a 0.5-point tolerance (threshold calibrated on the other "
              "seeds; most linear steps under it). Best validated: the cell with the most "
              "linear steps (smallest h) whose validated drop is within tolerance; gap: its "
              "validation accuracy minus the suggestion's (near: gap <= 0.5 point).", "",
              "| score | seed | layer | h | validated drop | within | best validated layer, h "
              "| gap | near |", "|---|---|---|---|---|---|---|---|---|"]
    for s in report["suggestions"]:
        lines.append(_row(s["score"], s))
    lines += ["", "`koopnet suggest --score residual|flip` with its built-in calibrations "
              + text["builtin"], "",
              "| built-in | seed | layer | h | validated drop | within | best validated "
              "layer, h | gap | near |", "|---|---|---|---|---|---|---|---|---|"]
    for s in report["builtin_suggestions"]:
        lines.append(_row(s["score"], s))
    lines.append("")
    best = max(SCORES, key=lambda k: report["rho"][k])  # the best score on these cells
    shown = ("residual", "flip") if best in ("residual", "flip") or text is YINYANG_TEXT else \
        ("residual", "flip", best)
    if text is MNIST_TEXT:
        lines.append(f"Best score by rho over all cells: {best}.")
    for score in shown:
        near = [s for s in report["suggestions"] if s["score"] == score]
        lost = [s["h"] - s["oracle_h"] for s in near if s["oracle_h"] is not None]
        lines.append(f"{score}, leave one seed out: within tolerance on "
                     f"{sum(s['within'] for s in near)} of {len(near)} seeds, within 0.5 point "
                     f"of the best validated setting's accuracy on "
                     f"{sum(s['near_oracle'] for s in near)} of {len(near)}; h minus the best "
                     f"validated setting's h: {', '.join(map(str, lost))}.")
    bound = report.get("bound_suggestions", [])
    if bound:
        lines += ["", "`koopnet suggest` (default): the flip score under its first-order bound, "
                  "threshold = the tolerance, no calibration (nothing is fitted on any seed; the "
                  "rule was chosen after the seeds 0-2 Yin-Yang cells were known, not after "
                  "seeds 3-7 or MNIST):",
                  "", "| rule | seed | layer | h | validated drop | within | best validated "
                  "layer, h | gap | near |", "|---|---|---|---|---|---|---|---|---|",
                  *[_row("flip <= tolerance", b) for b in bound], "",
                  f"flip, first-order bound: within tolerance on {sum(b['within'] for b in bound)}"
                  f" of {len(bound)} seeds, within 0.5 point of the best validated setting's "
                  f"accuracy on {sum(b['near_oracle'] for b in bound)} of {len(bound)}; seeds "
                  "where no cell at all is within tolerance (no best validated setting): "
                  f"{[b['seed'] for b in bound if b['oracle_h'] is None] or 'none'}."]
    lines += ["", "Thresholds of the built-in calibrations (calibrate over all cells, per "
              f"tolerance): {json.dumps(report['builtin_thresholds'])}", "",
              text["footer"], ""]
    return "\n".join(lines)


def _row(label: str, s: dict) -> str:
    gap = "-" if s["gap_to_oracle"] is None else f"{100 * s['gap_to_oracle']:.2f} pt"
    return (f"| {label} | {s['seed']} | {s['layer']} | {s['h']} | {100 * s['drop']:.2f} pt | "
            f"{s['within']} | {s['oracle_layer']}, {s['oracle_h']} | {gap} | "
            f"{s['near_oracle']} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reuse", action="store_true",
                        help="recompute the report from the cells of the saved predict_drop.json "
                             "instead of re-running the three seeds")
    parser.add_argument("--dataset", choices=("yinyang", "mnist"), default="yinyang")
    parser.add_argument("--data-dir", default="../shared/data", help="MNIST's folder")
    parser.add_argument("--cache", type=Path, default=mnist_runs.CACHE,
                        help="MNIST: the cached runs of benchmarks/mnist_runs.py")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    parser.add_argument("--pool", nargs="+", default=None, metavar="NAME",
                        help="recompute the report from the cells of several saved results "
                             "(e.g. predict_drop predict_drop_seeds_3-7); needs --name")
    parser.add_argument("--name", default=None,
                        help="results file stem (default predict_drop, predict_drop_mnist; "
                             "Yin-Yang seeds other than 0 1 2: predict_drop_seeds_A-B)")
    args = parser.parse_args()
    clock = time.perf_counter()
    out = HERE / "results"
    seeds = args.seeds
    other = args.dataset == "yinyang" and tuple(seeds) != SEEDS
    name = args.name or ("predict_drop_mnist" if args.dataset == "mnist" else
                         f"predict_drop_seeds_{seeds[0]}-{seeds[-1]}" if other else
                         "predict_drop")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE,
                            capture_output=True, text=True).stdout.strip()
    if args.pool:
        if args.name is None:
            parser.error("--pool needs --name, the stem of the pooled report")
        saved = [json.loads((out / f"{stem}.json").read_text()) for stem in args.pool]
        cells = [c for report in saved for c in report["cells"]]
        cells_commit = ", ".join(report.get("cells_commit", report["commit"]) for report in saved)
        seeds = sorted({c["seed"] for c in cells})
        other = True
    elif args.reuse:
        saved = json.loads((out / f"{name}.json").read_text())
        cells, cells_commit = saved["cells"], saved.get("cells_commit", saved["commit"])
        seeds = sorted({c["seed"] for c in cells})
    else:
        cells = [c for seed in seeds for c in (
            run_seed_mnist(seed, args.data_dir, args.cache) if args.dataset == "mnist"
            else run_seed(seed))]
        cells_commit = commit
    drops = [c["drop"] for c in cells]
    layers = sorted({c["layer"] for c in cells})
    ranked = (*SCORES, "exact_flip_ref")
    report = {
        **({"dataset": "mnist", "sweep_grid": mnist_runs.SWEEP, "score_train": SCORE_TRAIN}
           if args.dataset == "mnist" else {}),
        **({"command_args": f"--pool {' '.join(args.pool)} --name {name}" if args.pool else
            f"--seeds {' '.join(map(str, seeds))}"} if other else {}),
        "commit": commit, "cells_commit": cells_commit,
        "seeds": seeds, "tolerance": TOLERANCE, "n_cells": len(cells),
        "rho": {s: rank_correlation([c[s] for c in cells], drops) for s in ranked},
        "rho_per_seed": {s: {seed: rank_correlation(
            [c[s] for c in cells if c["seed"] == seed],
            [c["drop"] for c in cells if c["seed"] == seed]) for seed in seeds} for s in ranked},
        "rho_per_layer": {s: {layer: rank_correlation(
            [c[s] for c in cells if c["layer"] == layer],
            [c["drop"] for c in cells if c["layer"] == layer]) for layer in layers}
            for s in ranked},
        "mean_time_s": {k: sum(c[k] for c in cells) / len(cells)
                        for k in ("score_time_s", "flip_time_s")},
        "suggestions": suggestions(cells),
        "builtin_suggestions": fixed_suggestions(cells, BUILTIN_CALIBRATIONS),
        "bound_suggestions": fixed_suggestions(cells, {"flip": FIRST_ORDER_BOUND}),
        "builtin_thresholds": builtin_thresholds(cells),
        "cells": cells, "elapsed_s": time.perf_counter() - clock}
    (out / f"{name}.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / f"{name}.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
