"""Prepared GPU check (issue 12): the same selections on cuda as on the CPU.

Two runs, each once with ``device="cpu"`` and once with ``device="cuda"`` in the same process:

1. the quick clean Yin-Yang reproduction (``koopnet reproduce yinyang --quick --device D``
   through :func:`koopnet.lab.protocols.run_experiment`): the selected row (layer, h, rank,
   constant, Tikhonov) must be the same, accuracies within a few test points;
2. a residual-stream fit: a residual MLP trained on the CPU (seeded), then
   :func:`koopnet.linearize_depth` on the last 3 of 4 blocks for h = 0, 1, 2 with the model on
   each device; the h chosen by validation accuracy must be the same, and the fitted maps
   agree to float64 rounding of the float32 states.

Every random draw comes from CPU generators on both devices, so only floating-point rounding
differs. Without CUDA the script stops at once with one line. Run it where a GPU is lent:

    OMP_NUM_THREADS=1 python benchmarks/gpu_check.py [--out gpu_check.json]

and, for the device paths of the test suite, ``python -m pytest tests/test_device.py
tests/test_depth.py -k device``. Prints one JSON object; exit status 0 when everything agrees,
1 when a selection differs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from koopnet import linearize_depth
from koopnet.io.datasets import yinyang_splits
from koopnet.lab.devices import device_record
from koopnet.lab.protocols import run_experiment
from koopnet.lab.recipes import default_config
from koopnet.lab.residual import ResidualMLP, block_names
from koopnet.models import TrainConfig, accuracy, train_classifier

ROW_KEYS = ("layer", "n_delays", "rank", "rank_resolved", "constant", "tikhonov")


def reproduction(device: str) -> dict:
    """The quick clean Yin-Yang reproduction on ``device``: its selection and accuracies."""
    clock = time.perf_counter()
    results, _ = run_experiment(default_config("yinyang", seed=0, quick=True), progress=False,
                                device=device)
    selected = results["selected"]
    return {"selected": {k: selected[k] for k in ROW_KEYS},
            "val_accuracy": selected["val_accuracy"], "test_accuracy": selected["test_accuracy"],
            "original_test": results["original"]["test_accuracy"],
            "environment": results["environment"],
            "seconds": round(time.perf_counter() - clock, 2)}


def trained_resmlp() -> tuple[torch.nn.Module, dict]:
    """A small residual MLP on Yin-Yang, trained on the CPU with a fixed seed."""
    splits = yinyang_splits(n_train=2000, n_val=1000, n_test=1000)
    torch.manual_seed(0)
    model = ResidualMLP(n_in=splits.n_features, width=32, n_blocks=4, n_out=splits.n_classes)
    train_classifier(model, splits.train.X, splits.train.y,
                     TrainConfig(epochs=60, batch_size=200, lr=3e-3), seed=0)
    return model.eval(), {"train": splits.train, "val": splits.val, "test": splits.test}


def residual_fit(model: torch.nn.Module, splits: dict, device: str) -> dict:
    """linearize_depth over the last 3 blocks for h = 0..2 on ``device``; the best h on val."""
    clock = time.perf_counter()
    on_device = model.to(device)
    names = block_names(model)[1:]
    rows, maps = [], {}
    for h in (0, 1, 2):
        hybrid = linearize_depth(on_device, names, splits["train"].X, n_delays=h)
        maps[h] = hybrid.linear_map.detach().cpu()
        rows.append({"n_delays": h, "rank": hybrid.rank_,
                     **{f"{k}_accuracy": accuracy(hybrid, splits[k].X.to(device),
                                                  splits[k].y.to(device))
                        for k in ("val", "test")}})
    ranked = sorted(rows, key=lambda r: (r["val_accuracy"], -r["n_delays"]), reverse=True)
    model.to("cpu")
    # a runner-up within one validation point of the best can swap with rounding alone
    margin = len(splits["val"].y) * (ranked[0]["val_accuracy"] - ranked[1]["val_accuracy"])
    return {"rows": rows, "selected_h": ranked[0]["n_delays"], "maps": maps,
            "margin_val_points": round(margin),
            "seconds": round(time.perf_counter() - clock, 2)}


def compare() -> dict:
    report = {"devices": {"cpu": device_record("cpu"), "cuda": device_record("cuda")}}
    runs = {d: reproduction(d) for d in ("cpu", "cuda")}
    report["reproduction"] = {
        **runs, "same_selection": runs["cpu"]["selected"] == runs["cuda"]["selected"],
        "test_accuracy_difference": abs(runs["cpu"]["test_accuracy"]
                                        - runs["cuda"]["test_accuracy"])}
    model, splits = trained_resmlp()
    fits = {d: residual_fit(model, splits, d) for d in ("cpu", "cuda")}
    gap = max(float((fits["cpu"]["maps"][h] - fits["cuda"]["maps"][h]).abs().max()
                    / fits["cpu"]["maps"][h].abs().max().clamp_min(1e-30)) for h in (0, 1, 2))
    report["residual_stream"] = {
        **{d: {k: v for k, v in f.items() if k != "maps"} for d, f in fits.items()},
        "same_selection": fits["cpu"]["selected_h"] == fits["cuda"]["selected_h"],
        "max_relative_map_difference": gap}
    report["agree"] = (report["reproduction"]["same_selection"]
                       and report["residual_stream"]["same_selection"])
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="also write the report to this JSON file")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_check: CUDA is not available on this machine (torch "
              f"{torch.__version__}); run this check where a GPU is lent.", file=sys.stderr)
        return 2
    report = compare()
    text = json.dumps(report, indent=1)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")
    verdict = "AGREE" if report["agree"] else "DIFFER"
    print(f"gpu_check: selections on cuda and cpu {verdict} (reproduction: "
          f"{report['reproduction']['same_selection']}, residual stream: "
          f"{report['residual_stream']['same_selection']})", file=sys.stderr)
    return 0 if report["agree"] else 1


if __name__ == "__main__":
    sys.exit(main())
