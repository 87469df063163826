"""Seed spread of the paper's Yin-Yang headline setting (hidden layer 1, M = 5000, h = 10).

The paper reports one run: 91.2% (paper-method section 9). Every seed retrains the base model
and the He-initialised inserts, and that alone moves the hybrid's accuracy by several points,
so one koopnet run cannot confirm or refute 91.2%; the spread over seeds can.

    .venv/bin/python benchmarks/yinyang_paper_seeds.py --seeds 0 1 2 3 4 5 6 7

Writes benchmarks/results/yinyang_paper_seeds.{json,md}. The DMD itself is not the source of
the spread: on seed 0's trajectories PyKoopman's EDMD + simulate gives the same accuracy as
koopnet (96.70%, both; see the README of this folder).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from tqdm import tqdm

from koopnet.artifacts import atomic_write_text, write_json
from koopnet.experiments import (
    default_config,
    environment,
    load_protocol_data,
    sweep_layer,
    train_base,
)
from koopnet.models import accuracy
from koopnet.scaling import scale_layer

HERE = Path(__file__).resolve().parent
PAPER_ACCURACY = 0.912


def pykoopman_accuracy(scaled, data, n_delays: int, n_trajectories: int) -> float:
    """The paper's own pipeline (PyKoopman, full-rank EDMD, per-sample simulate) on the same
    trajectories, scored through the same tail of the network."""
    import torch
    from bench_dmd import pykoopman_predictions

    from koopnet.trajectories import collect_trajectories

    train = collect_trajectories(scaled, data.trajectories.X[:n_trajectories]).states
    test = collect_trajectories(scaled, data.test.X).states
    predicted = pykoopman_predictions(train.numpy(), test.numpy(), n_delays, 1.0)
    predicted = torch.from_numpy(predicted[:, : scaled.out_width]).float()
    with torch.no_grad():
        return float((scaled.tail(predicted).argmax(1) == data.test.y).float().mean())


def run_seed(seed: int, layer: int, n_delays: int, n_trajectories: int,
             peer_check: bool = False) -> dict:
    config = default_config("yinyang", "paper", seed=seed)
    config.delays, config.trajectory_counts = [n_delays], [n_trajectories]
    data = load_protocol_data(config)
    model = train_base(config, data, progress=False)
    scaled, report = scale_layer(model, layer, data.scaling.X, data.scaling.y,
                                 n_inserted=config.n_inserted, init=config.init,
                                 config=config.scaling, seed=config.seed + layer,
                                 retries=config.scaling_retries, fallback_identity=False)
    (row,), _ = sweep_layer(config, scaled, data, progress=False)
    if peer_check:
        row["pykoopman_test"] = pykoopman_accuracy(scaled, data, n_delays, n_trajectories)
    return {"seed": seed, "original_test": accuracy(model, data.test.X, data.test.y),
            "scaled_test": accuracy(scaled, data.test.X, data.test.y),
            "scaling_ok": report.ok, "scaling_attempts": len(report.attempts),
            "hybrid_test": row["test_accuracy"], "hybrid_held_out": row["held_out_accuracy"],
            "rank_resolved": row["rank_resolved"],
            **({"pykoopman_test": row["pykoopman_test"]} if peer_check else {})}


def summarise(rows: list[dict], key: str) -> dict:
    values = [r[key] for r in rows]
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1
            else 0.0, "min": min(values), "max": max(values)}


def render(results: dict) -> str:
    s = results["setting"]
    lines = [
        "# Yin-Yang, paper protocol: seed spread of the headline setting", "",
        f"Command: `python benchmarks/yinyang_paper_seeds.py --seeds "
        f"{' '.join(str(r['seed']) for r in results['rows'])}`  ",
        f"Setting: hidden layer {s['layer']}, M = {s['n_trajectories']} trajectories, "
        f"h = {s['n_delays']}, full-rank EDMD on the concatenated series, He-normal inserts "
        f"(paper-method sections 4, 6, 9). Accuracies on the paper's 4k test set (the first 4000 "
        f"points of the seed-123 pool); held-out = an independent 4k set (seed 7).  ",
        f"Wall time: {results['wall_s']:.0f} s", "",
        "| seed | original | scaled | scaling attempts | hybrid (paper test) | hybrid (held-out) |",
        "|---|---|---|---|---|---|",
    ]
    for r in results["rows"]:
        lines.append(f"| {r['seed']} | {100 * r['original_test']:.2f} | "
                     f"{100 * r['scaled_test']:.2f} | {r['scaling_attempts']} | "
                     f"{100 * r['hybrid_test']:.2f} | {100 * r['hybrid_held_out']:.2f} |")
    h = results["summary"]["hybrid_test"]
    ok = [r["hybrid_test"] for r in results["rows"] if r["scaling_ok"]]
    where = "inside" if results["paper_within_range"] else "outside"
    lines += ["", f"Hybrid, paper test set: mean {100 * h['mean']:.2f}%, sd {100 * h['sd']:.2f}, "
              f"range {100 * h['min']:.2f}-{100 * h['max']:.2f}%. The paper's single run: "
              f"{100 * PAPER_ACCURACY:.1f}% ({where} the range).", ""]
    if ok:
        lines += [f"Seeds whose scaling met the 0.5-point tolerance ({len(ok)}): mean "
                  f"{100 * statistics.fmean(ok):.2f}%, median {100 * statistics.median(ok):.2f}%.",
                  ""]
    lines += [f"Seed {r['seed']}'s trajectories through PyKoopman (TimeDelay + EDMD full rank + "
              f"simulate): {100 * r['pykoopman_test']:.2f}% vs koopnet "
              f"{100 * r['hybrid_test']:.2f}%."
              for r in results["rows"] if "pykoopman_test" in r]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(8)))
    parser.add_argument("--layer", type=int, default=1)
    parser.add_argument("--n-delays", type=int, default=10)
    parser.add_argument("--trajectories", type=int, default=5000)
    parser.add_argument("--out", default=str(HERE / "results"))
    parser.add_argument("--peer-check", action="store_true",
                        help="also run PyKoopman on the first seed's trajectories")
    args = parser.parse_args()
    clock = time.perf_counter()
    rows = [run_seed(seed, args.layer, args.n_delays, args.trajectories,
                     peer_check=args.peer_check and i == 0)
            for i, seed in enumerate(tqdm(args.seeds, desc="seeds"))]
    hybrid = summarise(rows, "hybrid_test")
    results = {
        "setting": {"layer": args.layer, "n_delays": args.n_delays,
                    "n_trajectories": args.trajectories, "protocol": "paper"},
        "paper_accuracy": PAPER_ACCURACY, "rows": rows,
        "summary": {key: summarise(rows, key) for key in
                    ("original_test", "scaled_test", "hybrid_test", "hybrid_held_out")},
        "paper_within_range": hybrid["min"] <= PAPER_ACCURACY <= hybrid["max"],
        "wall_s": time.perf_counter() - clock, "environment": environment(),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "yinyang_paper_seeds.json", results)
    atomic_write_text(out / "yinyang_paper_seeds.md", render(results))
    print(render(results))


if __name__ == "__main__":
    main()
