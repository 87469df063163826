"""A modern base recipe for the clean protocol's MNIST MLP (issue 11, item 5).

The architecture stays the paper's 784-256-128-64-32-10 ReLU MLP; only the optimiser recipe
changes. Every candidate is trained on the clean protocol's seed-0 training split (exactly as
``reproduce mnist`` loads and trains it: ``load_protocol_data`` and ``train_base``) and scored
on its validation split; the best validation accuracy is chosen, and only then is the chosen
recipe trained with seeds 0, 1, 2 (each seed's own split) and scored on test, once.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/mnist_clean_recipe.py \\
        --data-dir /work/shared/data --workers 2

writes benchmarks/results/mnist_clean_recipe.{json,md}.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import statistics
import tempfile
import time
from multiprocessing import get_context
from pathlib import Path

import torch

from koopnet.lab.protocols import load_protocol_data, train_base
from koopnet.lab.recipes import default_config
from koopnet.models import TrainConfig, accuracy

RESULTS = Path(__file__).parent / "results"

_BASE = TrainConfig(epochs=20, batch_size=128, lr=1e-3, weight_decay=1e-2, schedule="cosine")
_r = dataclasses.replace
#: The search (kept small: about 15 minutes on 2 loaded cores): AdamW with a per-batch schedule
#: over 20 epochs; the paper's recipe (MNIST_RECIPE) is the reference it replaces.
CANDIDATES: dict[str, TrainConfig] = {
    "cos lr1e-3 b128 wd1e-2": _BASE,
    "cos lr2e-3 b128 wd1e-2": _r(_BASE, lr=2e-3),
    "cos lr1e-3 b128 wd5e-2": _r(_BASE, weight_decay=5e-2),
    "cos lr1e-3 b128 wd1e-2 ls0.1": _r(_BASE, label_smoothing=0.1),
    "cos lr2e-3 b256 wd5e-2": _r(_BASE, lr=2e-3, batch_size=256, weight_decay=5e-2),
    "onecycle lr2e-3 b256 wd5e-2": _r(_BASE, lr=2e-3, batch_size=256, weight_decay=5e-2,
                                      schedule="onecycle"),
}


def _train(args) -> dict:
    name, recipe, seed, data_dir, score_test, save = args
    torch.set_num_threads(1)
    config = _r(default_config("mnist", seed=seed, data_dir=data_dir), base=recipe)
    data = load_protocol_data(config)
    start = time.perf_counter()
    model = train_base(config, data, progress=False)
    row = {"name": name, "seed": seed, "recipe": dataclasses.asdict(recipe),
           "train_accuracy": accuracy(model, data.base.X, data.base.y),
           "val_accuracy": accuracy(model, data.val.X, data.val.y),
           "seconds": round(time.perf_counter() - start, 1)}
    if save is not None:
        torch.save(model, save)  # scored on test later only if this candidate is chosen
    if score_test:
        row["test_accuracy"] = accuracy(model, data.test.X, data.test.y)
    print(f"{name} seed {seed}: val {100 * row['val_accuracy']:.2f}%"
          + (f" test {100 * row['test_accuracy']:.2f}%" if score_test else "")
          + f" ({row['seconds']} s)", flush=True)
    return row


def _pct(xs: list[float]) -> str:
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{100 * statistics.mean(xs):.2f} +- {100 * sd:.2f}"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args(argv)
    pool = get_context("spawn").Pool(args.workers)
    scratch = Path(tempfile.mkdtemp(prefix="mnist_clean_recipe_"))
    names = list(CANDIDATES)
    # 1. selection on the seed-0 validation split only (test is not computed)
    search = pool.map(_train, [(n, CANDIDATES[n], 0, args.data_dir, False,
                                scratch / f"{i}.pt") for i, n in enumerate(names)], chunksize=1)
    chosen = max(search, key=lambda row: row["val_accuracy"])["name"]
    # 2. the chosen recipe's test accuracy, once, over seeds; seed 0 is the search's own model
    # (training is deterministic given the seed), so it is scored, not retrained
    final = pool.map(_train, [(chosen, CANDIDATES[chosen], s, args.data_dir, True, None)
                              for s in args.seeds if s != 0], chunksize=1)
    pool.close()
    if 0 in args.seeds:
        row = dict(next(r for r in search if r["name"] == chosen))
        data = load_protocol_data(default_config("mnist", seed=0, data_dir=args.data_dir))
        model = torch.load(scratch / f"{names.index(chosen)}.pt", weights_only=False)
        row["test_accuracy"] = accuracy(model, data.test.X, data.test.y)
        final.insert(0, row)
    shutil.rmtree(scratch)
    result = {"selection": "highest validation accuracy, clean protocol seed-0 split (5000 "
                           "validation images); test scored only for the chosen recipe",
              "search": search, "chosen": chosen, "chosen_recipe": final[0]["recipe"],
              "final": final,
              "test_mean": statistics.mean(r["test_accuracy"] for r in final),
              "val_mean": statistics.mean(r["val_accuracy"] for r in final)}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "mnist_clean_recipe.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["# Clean MNIST base recipe (784-256-128-64-32-10 ReLU MLP)", "",
             "Command: `OMP_NUM_THREADS=1 .venv/bin/python benchmarks/mnist_clean_recipe.py "
             f"--data-dir DIR --workers {args.workers}`", "",
             "Selection on the clean protocol's seed-0 validation split (5000 images); test was "
             "not computed for any candidate during the search. Every candidate is AdamW, 20 "
             "epochs, betas (0.9, 0.999), a per-batch schedule (`cos`: cosine to 0; `onecycle`: "
             "torch OneCycleLR, 10% warm-up); every field is in the json.", "",
             "| candidate | train acc % | val acc % | seconds |", "|---|---|---|---|"]
    for row in sorted(search, key=lambda r: -r["val_accuracy"]):
        mark = " **(chosen)**" if row["name"] == chosen else ""
        lines.append(f"| {row['name']}{mark} | {100 * row['train_accuracy']:.2f} | "
                     f"{100 * row['val_accuracy']:.2f} | {row['seconds']} |")
    lines += ["", f"Chosen: `{chosen}`, over seeds {args.seeds} (each seed's own split):", "",
              "| seed | val acc % | test acc % |", "|---|---|---|"]
    for row in final:
        lines.append(f"| {row['seed']} | {100 * row['val_accuracy']:.2f} | "
                     f"{100 * row['test_accuracy']:.2f} |")
    lines += ["", f"Mean +- sd: val {_pct([r['val_accuracy'] for r in final])}%, "
                  f"test {_pct([r['test_accuracy'] for r in final])}%.", ""]
    (RESULTS / "mnist_clean_recipe.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
