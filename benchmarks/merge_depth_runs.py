"""Merge depth reproductions run as separate processes for disjoint seeds into one report.

    python benchmarks/merge_depth_runs.py OUT RUN_DIR [RUN_DIR ...]

Each RUN_DIR is the folder of ``koopnet reproduce vit-mnist|resmlp-mnist --seeds ...``; OUT
gets results.json, the figure and report.md as if all seeds had run in one process (summary
and, for the ViT, acceptance recomputed from the merged rows).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

from koopnet.io.folders import staged_folder
from koopnet.lab import residual_run, vit_run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args()
    runs = [json.loads((Path(r) / "results.json").read_text()) for r in args.runs]
    merged = residual_run.merge_depth_results(runs)
    vit = merged["experiment"] == "vit-mnist"
    merged["summary"] = residual_run.summarize(
        merged, vit_run.METHODS if vit else residual_run.METHODS)
    if vit:
        merged["acceptance"] = vit_run.acceptance(merged)
    with staged_folder(args.out, force=args.force) as stage:
        (vit_run.write_vit_run if vit else residual_run.write_depth_run)(stage, merged)
    print(json.dumps({"out": args.out, "seeds": merged["config"]["seeds"],
                      **({"acceptance": merged["acceptance"]} if vit else {})}))


if __name__ == "__main__":
    main()
