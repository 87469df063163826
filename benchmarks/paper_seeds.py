"""Seed spread of the paper's headline hybrid settings (paper protocol, one setting per data set).

- ``--dataset yinyang``: hidden layer 1, M = 5000, h = 10, full rank. The paper's one saved run:
  91.2% on its 4k test set (paper-method section 9).
- ``--dataset mnist``: hidden layer 3, M = 500, h = 10, rank 500, raw-pixel trajectories. The
  paper's one run: 95.8% on the 10k test set.

Every seed retrains the base model and the He-initialised inserts, and that alone moves the
hybrid's accuracy by points, so one koopnet run cannot confirm or refute one paper run; the spread
over seeds can. Each seed runs exactly what ``koopnet reproduce DATASET --protocol paper --seed S``
runs for that cell.

    .venv/bin/python benchmarks/paper_seeds.py --dataset yinyang --seeds 0 1 2 3 4 5 6 7
    .venv/bin/python benchmarks/paper_seeds.py --dataset mnist --data-dir ../shared/data

Writes benchmarks/results/{dataset}_paper_seeds.{json,md} (``--quick``, a smoke run with the
protocol's shortened recipes: {dataset}_paper_seeds_quick.*). ``--peer-check`` also runs the
paper's PyKoopman pipeline on the first seed's trajectories (bench_dmd.py's peer environment).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from pathlib import Path

from tqdm import tqdm

from koopnet.io.artifacts import atomic_write_text, write_json
from koopnet.lab.protocols import (
    environment,
    load_protocol_data,
    scale_for_protocol,
    sweep_layer,
    train_base,
)
from koopnet.lab.recipes import default_config
from koopnet.models import accuracy

HERE = Path(__file__).resolve().parent
SETTINGS = {
    "yinyang": {"layer": 1, "n_delays": 10, "trajectories": 5000, "paper": 0.912,
                "test": "the paper's 4k test set (the first 4000 points of the seed-123 pool); "
                        "held-out = an independent 4k set (seed 7)"},
    "mnist": {"layer": 3, "n_delays": 10, "trajectories": 500, "paper": 0.958,
              "test": "the 10k MNIST test set"},
}


def pykoopman_accuracy(scaled, data, n_delays: int, n_trajectories: int, rank) -> float:
    """The paper's own pipeline (PyKoopman EDMD, per-sample simulate) on the same trajectories,
    scored through the same tail of the network."""
    import torch
    from bench_dmd import pykoopman_predictions

    from koopnet.trajectories import collect_trajectories

    train = collect_trajectories(scaled, data.trajectories.X[:n_trajectories]).states
    test = collect_trajectories(scaled, data.test.X).states
    predicted = pykoopman_predictions(train.numpy(), test.numpy(), n_delays, rank)
    predicted = torch.from_numpy(predicted[:, : scaled.out_width]).float()
    with torch.no_grad():
        return float((scaled.tail(predicted).argmax(1) == data.test.y).float().mean())


def run_seed(args: argparse.Namespace, seed: int, peer_check: bool = False) -> dict:
    config = default_config(args.dataset, "paper", seed=seed, quick=args.quick,
                            data_dir=args.data_dir)
    # ExperimentConfig is frozen: the one cell of this benchmark is a replaced copy
    config = dataclasses.replace(config, delays=(args.n_delays,),
                                 trajectory_counts=(args.trajectories,))
    data = load_protocol_data(config)
    model = train_base(config, data, progress=False)
    scaled, report = scale_for_protocol(config, model, data, args.layer)
    (row,), _ = sweep_layer(config, scaled, data, progress=False)
    out = {"seed": seed, "original_test": accuracy(model, data.test.X, data.test.y),
           "scaled_test": accuracy(scaled, data.test.X, data.test.y),
           "scaling_ok": report.ok, "scaling_attempts": len(report.attempts),
           "hybrid_test": row["test_accuracy"], "rank_resolved": row["rank_resolved"]}
    if "held_out_accuracy" in row:
        out["hybrid_held_out"] = row["held_out_accuracy"]
    if peer_check:
        rank = 1.0 if config.ranks[0] is None else config.ranks[0]  # PyDMD: 1.0 = full rank
        out["pykoopman_test"] = pykoopman_accuracy(scaled, data, args.n_delays,
                                                   args.trajectories, rank)
    return out


def summarise(rows: list[dict], key: str) -> dict:
    values = [r[key] for r in rows]
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1
            else 0.0, "min": min(values), "max": max(values)}


def render(results: dict) -> str:
    s = results["setting"]
    held = all("hybrid_held_out" in r for r in results["rows"])
    peer = " --peer-check" if any("pykoopman_test" in r for r in results["rows"]) else ""
    peer += " --quick" if s.get("quick") else ""
    rank = "full" if s["rank"] is None else s["rank"]
    lines = [
        f"# {s['dataset']}, paper protocol: seed spread of the headline setting", "",
        f"Command: `python benchmarks/paper_seeds.py --dataset {s['dataset']} --seeds "
        f"{' '.join(str(r['seed']) for r in results['rows'])}{peer}`  ",
        f"Setting: hidden layer {s['layer']}, M = {s['n_trajectories']} trajectories, "
        f"h = {s['n_delays']}, rank {rank}, EDMD on the concatenated series, He-normal "
        f"inserts (paper-method sections 4, 6, 9). Accuracies on {SETTINGS[s['dataset']]['test']}."
        "  ", f"Wall time: {results['wall_s']:.0f} s", "",
        "| seed | original | scaled | scaling attempts | hybrid |"
        + (" hybrid (held-out) |" if held else ""),
        "|---|---|---|---|---|" + ("---|" if held else ""),
    ]
    for r in results["rows"]:
        lines.append(f"| {r['seed']} | {100 * r['original_test']:.2f} | "
                     f"{100 * r['scaled_test']:.2f} | {r['scaling_attempts']} | "
                     f"{100 * r['hybrid_test']:.2f} |"
                     + (f" {100 * r['hybrid_held_out']:.2f} |" if held else ""))
    h, paper = results["summary"]["hybrid_test"], results["paper_accuracy"]
    ok = [r["hybrid_test"] for r in results["rows"] if r["scaling_ok"]]
    where = "inside" if h["min"] <= paper <= h["max"] else "outside"
    original = results["summary"]["original_test"]
    lines += ["", f"Hybrid: mean {100 * h['mean']:.2f}%, sd {100 * h['sd']:.2f}, range "
              f"{100 * h['min']:.2f}-{100 * h['max']:.2f}%. The paper's single run: "
              f"{100 * paper:.1f}% ({where} the range). Original network: mean "
              f"{100 * original['mean']:.2f}%.", ""]
    if ok:
        lines += [f"Seeds whose scaling met the 0.5-point tolerance ({len(ok)}): mean "
                  f"{100 * statistics.fmean(ok):.2f}%, median {100 * statistics.median(ok):.2f}%.",
                  ""]
    lines += [f"Seed {r['seed']}'s trajectories through PyKoopman (TimeDelay + EDMD + "
              f"simulate): {100 * r['pykoopman_test']:.2f}% vs koopnet "
              f"{100 * r['hybrid_test']:.2f}%."
              for r in results["rows"] if "pykoopman_test" in r]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=sorted(SETTINGS), default="yinyang")
    parser.add_argument("--data-dir", help="folder with MNIST/raw (default: $KOOPNET_DATA)")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(5)))
    parser.add_argument("--layer", type=int, help="default: the paper's headline layer")
    parser.add_argument("--n-delays", type=int, help="default: 10")
    parser.add_argument("--trajectories", type=int, help="default: the paper's M")
    parser.add_argument("--out", default=str(HERE / "results"))
    parser.add_argument("--peer-check", action="store_true",
                        help="also run PyKoopman on the first seed's trajectories")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: the protocol's quick recipes (a twentieth of the "
                             "epochs); numbers are not comparable with the paper's")
    args = parser.parse_args()
    setting = SETTINGS[args.dataset]
    args.layer = args.layer or setting["layer"]
    args.n_delays = args.n_delays or setting["n_delays"]
    args.trajectories = args.trajectories or setting["trajectories"]
    clock = time.perf_counter()
    rows = [run_seed(args, seed, peer_check=args.peer_check and i == 0)
            for i, seed in enumerate(tqdm(args.seeds, desc="seeds"))]
    keys = ["original_test", "scaled_test", "hybrid_test"]
    keys += ["hybrid_held_out"] if all("hybrid_held_out" in r for r in rows) else []
    results = {
        "setting": {"dataset": args.dataset, "layer": args.layer, "n_delays": args.n_delays,
                    "n_trajectories": args.trajectories, "protocol": "paper",
                    "rank": default_config(args.dataset, "paper").ranks[0],
                    "quick": args.quick},
        "paper_accuracy": setting["paper"], "rows": rows,
        "summary": {key: summarise(rows, key) for key in keys},
        "wall_s": time.perf_counter() - clock, "environment": environment(),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{args.dataset}_paper_seeds" + ("_quick" if args.quick else "")  # never overwrites
    write_json(out / f"{stem}.json", results)
    atomic_write_text(out / f"{stem}.md", render(results))
    print(render(results))


if __name__ == "__main__":
    main()
