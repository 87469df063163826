"""Delay DMD against the learned observable (koopnet.learned) on the clean Yin-Yang protocol.

Usage (from the repository root):

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/learned_observables.py            # seeds 0-2
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/learned_observables.py --quick --out /tmp/s

For each seed the clean protocol runs once (``run_experiment(default_config("yinyang",
seed=s))``: base model, scaled layers 1-3 with N = 10 inserts). On each scaled layer and for
every h = 0..10, ``koopnet.lab.study.compare_layer`` fits both observables on the training
trajectories and keeps the row with the best validation accuracy over rank x Tikhonov (the
study's grid; the constant observable on for both, so the learned encoder is trained once per
(layer, h)); the test accuracy of that row is reported, mean +- sd over seeds.

Linear depth at 0.5 point (issue 11): the largest number of linear steps whose
validation-chosen row keeps the mean test accuracy within 0.5 point of the original's mean.
The encoder psi is nonlinear work: ``encoder_blocks`` = psi's multiply-adds / W^2 (one inserted
block costs W^2), and the "charged" depth subtracts ceil(encoder_blocks) from the linear steps.

Also recorded for the chosen rows: the held-out (test) relative error of every predicted
intermediate state s_{h+1}..s_{T-1} (mean over k and the last one) and the spectral radius of
the fitted operator. ``--cache DIR`` keeps the scaled layers of each seed (save_scaled) so a
rerun skips the protocol's training, and the rows of each seed (run_seed{s}.json), so seeds can
run as separate processes and a last call with every seed only merges them:

    for s in 0 1 2; do OMP_NUM_THREADS=1 .venv/bin/python benchmarks/learned_observables.py \
        --seeds $s --cache /tmp/lcache --out /tmp/lcache/out$s & done; wait
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/learned_observables.py --cache /tmp/lcache

The learned observables train psi once per (layer, h), so they run on a coarser h grid
(``--learned-delays``, default 1 4 8) than the delay DMD (0..10).
Results: benchmarks/results/learned_observables.{json,md} (``--quick``: *_quick.*).

The issue's nonlinear-work budget (at most 2 inserted blocks between s_0 and the layer's output,
latent dims at most 4x the width) at 9 charged linear steps, with 10x the default training:

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/learned_observables.py --seeds 0 1 2 \
        --observables "learned, 1-block encoder" --learned-delays 0 --latent-ratio 2 \
        --learned-steps 3000 --name learned_budget_h0      # h = 0, psi of 2 blocks
    ... --learned-delays 1 --learned-steps 3000 --name learned_budget_h1  # h = 1, psi of 1
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from koopnet.io.artifacts import atomic_write_text
from koopnet.io.serialize import load_scaled, save_scaled
from koopnet.lab import predict
from koopnet.lab.protocols import load_protocol_data, run_experiment
from koopnet.lab.recipes import default_config
from koopnet.lab.study import StudyConfig, compare_layer
from koopnet.trajectories import collect_trajectories

OBSERVABLES = ("delay", "learned", "learned, 1-block encoder")
TOLERANCE = 0.005


def scaled_layers(seed: int, quick: bool, cache: Path | None):
    """(original accuracies, {layer: ScaledMLP}) of the clean protocol for ``seed``."""
    folder = None if cache is None else cache / f"seed{seed}{'_quick' if quick else ''}"
    if folder is not None and (folder / "original.json").is_file():
        original = json.loads((folder / "original.json").read_text())
        layers = {int(p.stem[5:]): load_scaled(folder, p.stem)
                  for p in sorted(folder.glob("layer*.json"))}
        return original, layers
    results, figures = run_experiment(default_config("yinyang", seed=seed, quick=quick),
                                      progress=False)
    layers = {k: info["scaled"] for k, info in figures["layers"].items()}
    if folder is not None:
        for k, scaled in layers.items():
            save_scaled(scaled, folder, f"layer{k}")
        (folder / "original.json").write_text(json.dumps(results["original"]))
    return results["original"], layers


def state_errors(observable, dmd, states: torch.Tensor, widths, h: int) -> dict:
    """Held-out relative error of each predicted state s_{h+1}..s_{T-1} from s_0..s_h."""
    errors = predict.state_errors(observable, dmd, states, h, widths[h + 1], widths[-1])
    radius = float(dmd.eigenvalues_.abs().max())
    return {"rel_error_mean": statistics.fmean(errors), "rel_error_last": errors[-1],
            "rel_errors": errors, "spectral_radius": radius}


def run_seed(seed: int, study: StudyConfig, delays: dict, quick: bool,
             cache: Path | None, latent_ratio: float | None = None, tag: str = "") -> dict:
    """Rows of one seed; with ``cache`` they are kept in run_seed{s}{tag}.json and reused.
    ``latent_ratio``: psi's latent dims as a multiple of each layer's width (None: the
    study's ``learned_latent``)."""
    saved = None if cache is None else \
        cache / f"run_seed{seed}{'_quick' if quick else ''}{tag}.json"
    if saved is not None and saved.is_file():
        return json.loads(saved.read_text())
    config = default_config("yinyang", seed=seed, quick=quick)
    data = load_protocol_data(config)
    original, layers = scaled_layers(seed, quick, cache)
    labels = {"val": data.val.y, "test": data.test.y}
    rows = []
    for layer, scaled in layers.items():
        train = collect_trajectories(scaled, data.trajectories.X).states
        test = collect_trajectories(scaled, data.test.X)
        states = {"val": collect_trajectories(scaled, data.val.X).states, "test": test.states}
        clock = time.perf_counter()
        found, fits = [], {}
        if latent_ratio is not None:
            study = dataclasses.replace(study, learned_latent=round(latent_ratio * scaled.width))
        for name in delays:
            more, more_fits = compare_layer(scaled, train, states, labels, delays[name], study,
                                            seed, config.exact_rollout, observables=(name,))
            found, fits = found + more, {**fits, **more_fits}
        seconds = time.perf_counter() - clock
        for row in found:
            observable, dmd = fits[(row["observable"], row["n_delays"])]
            macs = observable.nonlinear_macs() if row["observable"].startswith("learned") else 0
            blocks = macs / scaled.width**2
            rows.append({**row, "width": scaled.width, "encoder_macs": macs,
                         "encoder_blocks": blocks,
                         # the study's rows already charge psi: linear_steps = roll-out steps
                         # - ceil(encoder_blocks); this table shows both
                         "linear_steps": test.states.shape[1] - 1 - row["n_delays"],
                         "charged_linear_steps": row["linear_steps"],
                         **state_errors(observable, dmd, test.states, test.widths,
                                        row["n_delays"])})
        print(f"seed {seed} layer {layer}: {seconds:.0f}s", flush=True)
    run = {"seed": seed, "original": original, "rows": rows}
    if saved is not None:
        saved.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(saved, json.dumps(run))
    return run


def _mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def ran(rows: list[dict]) -> list[str]:
    """The observables of OBSERVABLES that have rows, in that order."""
    return [name for name in OBSERVABLES if any(r["observable"] == name for r in rows)]


def summarise(runs: list[dict]) -> dict:
    original, _ = _mean_sd([r["original"]["test_accuracy"] for r in runs])
    rows = [row for run in runs for row in run["rows"]]
    cells, depth = [], {}
    for name in ran(rows):
        for layer in sorted({r["layer"] for r in rows}):
            by_h: dict[int, list[dict]] = {}
            for r in rows:
                if r["observable"] == name and r["layer"] == layer:
                    by_h.setdefault(r["n_delays"], []).append(r)
            best = {"linear_steps": 0, "charged_linear_steps": 0}
            for h, group in sorted(by_h.items()):
                mean, sd = _mean_sd([r["test_accuracy"] for r in group])
                cell = {"observable": name, "layer": layer, "n_delays": h,
                        "linear_steps": group[0]["linear_steps"],
                        "charged_linear_steps": group[0]["charged_linear_steps"],
                        "encoder_blocks": group[0]["encoder_blocks"],
                        "test_mean": mean, "test_sd": sd, "n_seeds": len(group),
                        "rel_error_mean": statistics.fmean(r["rel_error_mean"] for r in group),
                        "rel_error_last": statistics.fmean(r["rel_error_last"] for r in group),
                        "spectral_radius_max": max(r["spectral_radius"] for r in group)}
                cells.append(cell)
                if mean >= original - TOLERANCE:
                    for key in best:
                        best[key] = max(best[key], cell[key])
            depth[f"{name}/layer{layer}"] = best
    return {"original_test_mean": original, "cells": cells, "linear_depth_at_0.5": depth}


def render(summary: dict, runs: list[dict], meta: dict) -> str:
    names = ran([row for run in runs for row in run["rows"]])
    lines = ["# Learned observables vs delay DMD (clean Yin-Yang)", "",
             f"Command: `{meta['command']}` (commit {meta['commit']}, {meta['seconds']:.0f} s, "
             f"seeds {meta['seeds']}). Test accuracy of the validation-chosen row, mean +- sd "
             "over seeds; original network "
             f"{100 * summary['original_test_mean']:.2f}% (mean).", "",
             "Cells: test accuracy % (mean +- sd) / relative error of the last predicted "
             "state s_{T-1} on test (mean over seeds) / encoder cost in inserted blocks "
             "(MACs of psi / W^2).", "",
             "| layer | h | linear steps | " + " | ".join(names) + " |",
             "|---|---|---|" + "---|" * len(names)]
    cells = {(c["observable"], c["layer"], c["n_delays"]): c for c in summary["cells"]}
    for layer, h in sorted({(c["layer"], c["n_delays"]) for c in summary["cells"]}):
        found = [cells.get((name, layer, h)) for name in names]
        steps = next(c["linear_steps"] for c in found if c is not None)
        parts = ["-" if c is None else f"{100 * c['test_mean']:.2f} +- "
                 f"{100 * c['test_sd']:.2f} / {c['rel_error_last']:.3g} / "
                 f"{c['encoder_blocks']:.0f}" for c in found]
        lines.append(f"| {layer} | {h} | {steps} | " + " | ".join(parts) + " |")
    lines += ["", "Linear depth at 0.5 point (largest linear steps whose mean test accuracy "
              "stays within 0.5 point of the original; 'charged' subtracts the encoder's "
              "cost in inserted blocks, ceil(MACs of psi / W^2)):", "",
              "| observable | layer | linear depth | charged |", "|---|---|---|---|"]
    for key, value in summary["linear_depth_at_0.5"].items():
        name, layer = key.split("/")
        lines.append(f"| {name} | {layer[5:]} | {value['linear_steps']} | "
                     f"{value['charged_linear_steps']} |")
    study = meta["study"]
    lines += ["", f"Grid: h = {meta['delays']}; constant observable on for all; rank in "
              f"{study['ranks']} x Tikhonov in {study['tikhonovs']} chosen on validation; "
              f"learned psi: {study['learned_steps']} Adam steps, latent dims = "
              f"{meta.get('latent_ratio') or 1} x the layer width, "
              "seed = the protocol seed. Per-seed rows are computed by separate processes "
              "(run_seed{s}[_NAME].json in --cache) and merged by the call above; each row "
              "lists all relative errors s_{h+1}..s_{T-1} and the spectral radius in the JSON."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--quick", action="store_true", help="smoke run (short recipes)")
    parser.add_argument("--cache", type=Path, default=None)
    parser.add_argument("--learned-delays", type=int, nargs="+", default=[1, 4, 8],
                        help="h values of the learned observables (the delay DMD runs 0..10)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--observables", nargs="+", choices=OBSERVABLES, default=OBSERVABLES)
    parser.add_argument("--learned-steps", type=int, default=None,
                        help="Adam steps of psi (default: the study's)")
    parser.add_argument("--latent-ratio", type=float, default=None,
                        help="psi's latent dims per neuron of the layer (default 1; at most 4)")
    parser.add_argument("--name", default="learned_observables", help="results file stem")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    study = StudyConfig(constants=(True,))
    if args.learned_steps is not None:
        study = dataclasses.replace(study, learned_steps=args.learned_steps)
    learned = tuple(args.learned_delays)
    delays = {"delay": tuple(range(11)), **{name: learned for name in OBSERVABLES[1:]}}
    if args.quick:
        study = dataclasses.replace(study, learned_steps=30, ranks=(None, 0.999),
                                    tikhonovs=(0.0, 1e-4))
        delays = {name: (1, 5, 10) for name in OBSERVABLES}
    delays = {name: delays[name] for name in args.observables}
    tag = "" if args.name == "learned_observables" else f"_{args.name}"
    clock = time.perf_counter()
    runs = [run_seed(s, study, delays, args.quick, args.cache, args.latent_ratio, tag)
            for s in args.seeds]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    given = sys.argv[1:] if argv is None else list(argv)
    meta = {"command": "OMP_NUM_THREADS=1 .venv/bin/python " + shlex.join(
                ["benchmarks/learned_observables.py", *given]),
            "commit": commit, "seconds": time.perf_counter() - clock, "seeds": args.seeds,
            "study": {k: list(v) if isinstance(v, tuple) else v
                      for k, v in dataclasses.asdict(study).items()},
            "delays": {k: list(v) for k, v in delays.items()}, "torch": torch.__version__,
            "latent_ratio": args.latent_ratio}
    summary = summarise(runs)
    stem = args.name + ("_quick" if args.quick else "")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps(
        {"meta": meta, "summary": summary, "runs": runs}, indent=1) + "\n")
    (args.out / f"{stem}.md").write_text(render(summary, runs, meta))
    print(render(summary, runs, meta))


if __name__ == "__main__":
    main()
