"""The ViT reproduction for other spans, with the learned lifting there too (one seed).

``koopnet reproduce vit-mnist`` fits the flattened learned lifting for spans 2 and 3 only (each
costs minutes of training per seed). This runs the same seed, recipe and grid for the spans
given, with the lifting at each of them, and writes results.json, the figure and report.md to
OUT (the per-position profile only). Run one process per seed, then merge:

    OMP_NUM_THREADS=1 python benchmarks/vit_lifting_spans.py --data-dir D --seed S \
        --spans 4 --out RUN_S
    python benchmarks/merge_depth_runs.py OUT RUN_0 RUN_1 RUN_2
"""

from __future__ import annotations

import argparse
import dataclasses

import matplotlib

matplotlib.use("Agg")

import torch

from koopnet.io.folders import staged_folder
from koopnet.lab.vit_run import run_vit, vit_config, write_vit_run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--spans", type=int, nargs="+", default=[4])
    p.add_argument("--out", required=True)
    a = p.parse_args()
    torch.set_num_threads(1)
    spans = tuple(a.spans)
    config = dataclasses.replace(vit_config(seeds=(a.seed,), data_dir=a.data_dir), spans=spans,
                                 lifting_spans=spans, profile_flat=False)
    results = run_vit(config)
    with staged_folder(a.out) as stage:
        write_vit_run(stage, results)


if __name__ == "__main__":
    main()
