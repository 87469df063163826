"""Test data cannot move a selection: the FULL clean Yin-Yang reproduction, three times.

``tests/test_guards.py`` checks this on the quick settings; this script runs the default
``koopnet reproduce yinyang`` protocol (every layer, every h, rank, Tikhonov value and constant)
once as it is, once with the test labels permuted and once with the test inputs replaced by
noise, and compares the selected rows, their settings and every row's validation score.

    OMP_NUM_THREADS=1 python benchmarks/scrambled_check.py

Writes benchmarks/results/scrambled_check.{json,md}.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import time
from pathlib import Path

import torch

from koopnet.io.datasets import Split
from koopnet.lab import protocols
from koopnet.lab.recipes import default_config

HERE = Path(__file__).resolve().parent


def scrambled(data, how: str):
    gen = torch.Generator().manual_seed(1234)  # never the global RNG the run draws from
    test = data.test
    if how == "labels":
        test = Split(test.X, test.y[torch.randperm(len(test), generator=gen)])
    elif how == "inputs":
        noise = torch.randn(test.X.shape, generator=gen, dtype=test.X.dtype)
        test = Split(noise * test.X.std() + test.X.mean(), test.y)
    return dataclasses.replace(data, test=test)


def run(how: str) -> dict:
    real = protocols.load_protocol_data
    protocols.load_protocol_data = lambda config: scrambled(real(config), how)
    try:
        results, _ = protocols.run_experiment(default_config("yinyang"), progress=False)
    finally:
        protocols.load_protocol_data = real
    return results


def without_test(row: dict) -> dict:
    return {k: v for k, v in row.items() if not k.startswith("test")}


def main() -> None:
    clock = time.perf_counter()
    runs = {how: run(how) for how in ("none", "labels", "inputs")}
    base = runs["none"]
    report = {"commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE,
                                       capture_output=True, text=True).stdout.strip(),
              "rows": len(base["sweep"]), "checks": {}}
    for how in ("labels", "inputs"):
        other = runs[how]
        report["checks"][how] = {
            "selected_identical": without_test(other["selected"]) == without_test(
                base["selected"]),
            "selected_per_layer_identical": [without_test(r) for r in other["selected_per_layer"]]
            == [without_test(r) for r in base["selected_per_layer"]],
            "every_val_score_identical": [r["val_accuracy"] for r in other["sweep"]]
            == [r["val_accuracy"] for r in base["sweep"]],
            "test_scores_moved": [r["test_accuracy"] for r in other["sweep"]]
            != [r["test_accuracy"] for r in base["sweep"]],
            "selected_test_accuracy": other["selected"]["test_accuracy"]}
    report["selected"] = without_test(base["selected"])
    report["selected"]["test_accuracy"] = base["selected"]["test_accuracy"]
    report["seconds"] = round(time.perf_counter() - clock, 1)
    out = HERE / "results"
    (out / "scrambled_check.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    lines = ["# Scrambled test split, full clean Yin-Yang reproduction", "",
             f"Commit {report['commit']}, {report['rows']} sweep rows, {report['seconds']} s. "
             f"Selected: layer {base['selected']['layer']}, h={base['selected']['n_delays']}, "
             f"test {100 * base['selected']['test_accuracy']:.2f}%.", "",
             "| test split | selected identical | per layer identical | every val score "
             "identical | test scores moved | selected row's test % |", "|---|---|---|---|---|---|"]
    for how, c in report["checks"].items():
        lines.append(f"| {how} scrambled | {c['selected_identical']} | "
                     f"{c['selected_per_layer_identical']} | {c['every_val_score_identical']} | "
                     f"{c['test_scores_moved']} | {100 * c['selected_test_accuracy']:.2f} |")
    (out / "scrambled_check.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    ok = all(c["selected_identical"] and c["selected_per_layer_identical"]
             and c["every_val_score_identical"] and c["test_scores_moved"]
             for c in report["checks"].values())
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
