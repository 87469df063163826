"""Seed spread of the paper's MNIST base recipe (784-256-128-64-32-10 ReLU, 60k training images).

The paper reports one run at 97.20% (paper-method section 3). This trains the same recipe
(AdamW lr 1e-2, weight decay 0.1, batch 4096, 30 epochs, plateau scheduler; He-normal init,
bias 0.01) from several seeds, exactly as ``koopnet reproduce mnist --protocol paper`` trains its
base model, and reports the test accuracy of each.

    .venv/bin/python benchmarks/mnist_base_seeds.py --data-dir ../shared/data --seeds 0 1 2 3 4

Writes benchmarks/results/mnist_base_seeds.{json,md} (``--quick``, a smoke run of the protocol's
quick recipe: *_quick.*).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from pathlib import Path

from tqdm import tqdm

from koopnet.io.artifacts import atomic_write_text, write_json
from koopnet.lab.protocols import environment, load_protocol_data, train_base
from koopnet.lab.recipes import default_config
from koopnet.models import accuracy

HERE = Path(__file__).resolve().parent
PAPER_ACCURACY = 0.972


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", help="folder with MNIST/raw (default: $KOOPNET_DATA)")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(5)))
    parser.add_argument("--out", default=str(HERE / "results"))
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: the protocol's quick recipe (5k training images, 8 "
                             "epochs), written to *_quick.*")
    args = parser.parse_args()
    clock = time.perf_counter()
    config = default_config("mnist", "paper", quick=args.quick, data_dir=args.data_dir)
    data = load_protocol_data(config)
    rows = []
    for seed in tqdm(args.seeds, desc="seeds"):
        model = train_base(dataclasses.replace(config, seed=seed), data, progress=False)
        rows.append({"seed": seed, "test_accuracy": accuracy(model, data.test.X, data.test.y),
                     "train_accuracy": accuracy(model, data.base.X, data.base.y)})
    values = [r["test_accuracy"] for r in rows]
    summary = {"mean": statistics.fmean(values), "min": min(values), "max": max(values),
               "sd": statistics.stdev(values) if len(values) > 1 else 0.0}
    recipe = "paper (koopnet.lab.recipes.MNIST_RECIPE)" + (", --quick" if args.quick else "")
    results = {"recipe": recipe, "base": dataclasses.asdict(config.base),
               "paper_accuracy": PAPER_ACCURACY,
               "rows": rows, "summary": summary, "wall_s": time.perf_counter() - clock,
               "environment": environment()}
    lines = ["# MNIST base model, paper recipe: seed spread", "",
             f"Command: `python benchmarks/mnist_base_seeds.py --seeds "
             f"{' '.join(map(str, args.seeds))}{' --quick' if args.quick else ''}`; "
             f"{len(data.base.X)} training / {len(data.test.X)} test images; "
             f"wall {results['wall_s']:.0f} s.", "",
             "| seed | train accuracy | test accuracy |", "|---|---|---|"]
    lines += [f"| {r['seed']} | {100 * r['train_accuracy']:.2f} | {100 * r['test_accuracy']:.2f} |"
              for r in rows]
    lines += ["", f"Test: mean {100 * summary['mean']:.2f}%, sd {100 * summary['sd']:.2f}, range "
              f"{100 * summary['min']:.2f}-{100 * summary['max']:.2f}%; the paper's single run "
              f"{100 * PAPER_ACCURACY:.2f}%.", ""]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "mnist_base_seeds" + ("_quick" if args.quick else "")  # never overwrites
    write_json(out / f"{stem}.json", results)
    atomic_write_text(out / f"{stem}.md", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
