"""One clean MNIST run per seed, cached, shared by predict_drop.py and forgetting.py (issue 13).

The run is the clean protocol's (``run_experiment(default_config("mnist", seed=s))``), done in
stages so each stage is saved under ``--cache`` (default /tmp/mnist_runs) and run once per seed:
the base network and the three scaled networks (``protocols.train_base``,
``protocols.scale_for_protocol``), then the delay-DMD sweep of every layer and h over the
recipe's grid (changed only by ``SWEEP``, empty here), every row scored on validation. Per
(layer, h) the best validation row (``protocols.select``) is kept with its hybrid and scored on
test once (the protocol scores every row on test too, which decides nothing); the selected
hybrid (best validation row over all layers and h) is what forgetting edits. The splits are not
stored: ``load_protocol_data`` draws them from the seed.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/mnist_runs.py --seeds 0 1 2 \\
        --data-dir ../shared/data
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import statistics
import time
from pathlib import Path

import torch

from koopnet.io.artifacts import atomic_write_bytes
from koopnet.lab import protocols
from koopnet.lab.recipes import default_config
from koopnet.trajectories import collect_trajectories

CACHE = Path("/tmp/mnist_runs")
#: changes to the recipe's sweep grid (stated in every MNIST result file; empty: the recipe's)
SWEEP: dict = {}


def save_atomic(obj, path: Path) -> None:
    """torch.save that leaves the cache file whole or absent (a rerun resumes from it)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def config_for(seed: int, data_dir: str | None):
    """The clean MNIST config of ``seed`` with the reduced sweep grid."""
    return dataclasses.replace(default_config("mnist", seed=seed, data_dir=data_dir), **SWEEP)


def networks(config, data, cache: Path) -> dict:
    """Base network and scaled network of every layer (trained once, then loaded)."""
    path = cache / f"seed{config.seed}_nets.pt"
    if path.exists():
        return torch.load(path, weights_only=False)
    timings, clock = {}, time.perf_counter()
    model = protocols.train_base(config, data, progress=False)
    timings["base_training"] = time.perf_counter() - clock
    scaled = {}
    for layer in config.layers:
        clock = time.perf_counter()
        scaled[layer], _ = protocols.scale_for_protocol(config, model, data, layer)
        timings[f"scaling_layer{layer}"] = time.perf_counter() - clock
    nets = {"model": model.eval(), "scaled": scaled, "timings_s": timings}
    cache.mkdir(parents=True, exist_ok=True)
    save_atomic(nets, path)
    print(f"seed {config.seed}: networks {timings}", flush=True)
    return nets


def _accuracy(net, X, y) -> float:
    with torch.no_grad():
        return float((net(X).argmax(1) == y).double().mean())


def sweep(config, data, nets: dict, cache: Path) -> dict:
    """Every (layer, h) cell's best validation row (with test of that row) and the selected
    hybrid; rows of the whole sweep kept for the record."""
    path = cache / f"seed{config.seed}_sweep.pt"
    if path.exists():
        return torch.load(path, weights_only=False)
    rows, best, timings = [], {}, {}
    for layer, scaled in nets["scaled"].items():
        clock = time.perf_counter()
        train = collect_trajectories(scaled, data.trajectories.X)
        val = {"val": collect_trajectories(scaled, data.val.X).states}
        labels = {"val": data.val.y}
        for spec, _, hybrid, m in protocols.delay_fits(config, scaled, train, False):
            row = protocols.result_row(hybrid, spec, protocols.score_states(hybrid, val, labels),
                                       trajectories=m)
            rows.append(row)
            key = (layer, spec.n_delays)
            if key not in best or protocols.select([best[key][0], row]) is row:
                best[key] = (row, hybrid)
        timings[f"sweep_layer{layer}"] = time.perf_counter() - clock
        print(f"seed {config.seed}: layer {layer} swept in {timings[f'sweep_layer{layer}']:.0f} s",
              flush=True)
    cells = {}
    for key, (row, hybrid) in best.items():
        cells[key] = {**row, "test_accuracy": _accuracy(hybrid, data.test.X, data.test.y)}
    selected = protocols.select([r for r, _ in best.values()])
    key = (selected["layer"], selected["n_delays"])
    model = nets["model"]
    out = {"original": {"val_accuracy": _accuracy(model, data.val.X, data.val.y),
                        "test_accuracy": _accuracy(model, data.test.X, data.test.y)},
           "rows": rows, "cells": cells, "selected": cells[key], "hybrid": best[key][1],
           "timings_s": timings}
    save_atomic(out, path)
    return out


def load(seed: int, data_dir: str | None, cache: Path = CACHE) -> dict:
    """Config, data, networks and sweep of one seed (computed on the first call)."""
    config = config_for(seed, data_dir)
    data = protocols.load_protocol_data(config)
    nets = networks(config, data, cache)
    return {"config": config, "data": data, **nets, "sweep": sweep(config, data, nets, cache)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--cache", type=Path, default=CACHE)
    parser.add_argument("--networks-only", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    runs = {}
    for seed in args.seeds:
        config = config_for(seed, args.data_dir)
        data = protocols.load_protocol_data(config)
        nets = networks(config, data, args.cache)
        if not args.networks_only:
            runs[seed] = sweep(config, data, nets, args.cache)
    if runs:
        write_summary(runs, args.seeds)


def write_summary(runs: dict, seeds: list[int]) -> None:
    """benchmarks/results/mnist_clean_seeds.{json,md}: the original network and the selected
    hybrid (best validation row over layers and h) of each seed, test scored once."""
    rows = [{"seed": seed, "original_val": run["original"]["val_accuracy"],
             "original_test": run["original"]["test_accuracy"],
             **{f"selected_{k}": run["selected"][k] for k in
                ("layer", "n_delays", "linear_steps", "val_accuracy", "test_accuracy")}}
            for seed, run in runs.items()]

    def ms(key: str) -> str:
        values = [100 * r[key] for r in rows]
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.fmean(values):.2f} +- {sd:.2f}"

    lines = ["# Clean MNIST protocol over seeds", "",
             "Command: `OMP_NUM_THREADS=1 .venv/bin/python benchmarks/mnist_runs.py --seeds "
             f"{' '.join(map(str, seeds))} --data-dir ../shared/data` (the clean protocol's "
             "networks and delay-DMD sweep per seed; the hybrid is the best validation row over "
             "layers 1-3 and h = 0..10; test scored once).", "",
             "| seed | original val % | original test % | selected layer, h (linear steps) | "
             "hybrid val % | hybrid test % |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['seed']} | {100 * r['original_val']:.2f} | "
                     f"{100 * r['original_test']:.2f} | {r['selected_layer']}, "
                     f"{r['selected_n_delays']} ({r['selected_linear_steps']}) | "
                     f"{100 * r['selected_val_accuracy']:.2f} | "
                     f"{100 * r['selected_test_accuracy']:.2f} |")
    lines += ["", f"Original test {ms('original_test')}%; selected hybrid test "
              f"{ms('selected_test_accuracy')}% (mean +- sd over seeds).", ""]
    out = Path(__file__).parent / "results" / "mnist_clean_seeds"
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")
    out.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
