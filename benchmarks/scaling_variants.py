"""Scaling variants on clean Yin-Yang: does a different scaling make the trajectory linearisable?

For every seed and layer, the clean protocol's base model is scaled once per variant
(koopnet.scaling.ScalingSpec: plain, step penalty, DMD one-step, DMD multi-step, residual, tied;
near-identity init, N = 10, one attempt each so every variant gets the same start) and the
protocol's delay-DMD sweep (``sweep_layer``) runs on it. Per number of linear steps the
validation-chosen row's test accuracy is the frontier; penalty weights are chosen per layer on
validation (largest validation linear depth at 0.5 point, then validation accuracy).

    OMP_NUM_THREADS=1 python benchmarks/scaling_variants.py run --seed 0 --part /tmp/sv0.jsonl
    python benchmarks/scaling_variants.py merge /tmp/sv*.jsonl

``run`` appends one JSON line per (seed, layer, variant) so a long run can be merged part way.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from koopnet.lab.protocols import load_protocol_data, select, sweep_layer, train_base
from koopnet.lab.recipes import default_config
from koopnet.models import accuracy
from koopnet.scaling import ScalingSpec, scale_layer

RESULTS = Path(__file__).parent / "results"
VARIANTS = {
    "plain": ScalingSpec(),
    "step 1e-3": ScalingSpec(step_penalty=1e-3),
    "step 1e-2": ScalingSpec(step_penalty=1e-2),
    "DMD one-step 1e-3": ScalingSpec(dmd_penalty=1e-3),
    "DMD one-step 1e-2": ScalingSpec(dmd_penalty=1e-2),
    "DMD 4-step 1e-3": ScalingSpec(dmd_penalty=1e-3, dmd_steps=4, dmd_delays=1),
    "DMD 4-step 1e-2": ScalingSpec(dmd_penalty=1e-2, dmd_steps=4, dmd_delays=1),
    "residual": ScalingSpec("residual"),
    "tied": ScalingSpec("tied"),
}
FAMILIES = {"plain": "plain", "step": "step penalty", "DMD one-step": "DMD one-step",
            "DMD 4-step": "DMD multi-step", "residual": "residual", "tied": "tied"}


def run(seed: int, layers: list[int], variants: list[str], part: Path) -> None:
    config = default_config("yinyang", seed=seed)
    data = load_protocol_data(config)
    model = train_base(config, data, False)
    original = {"val": accuracy(model, data.val.X, data.val.y),
                "test": accuracy(model, data.test.X, data.test.y)}
    for name in variants:  # every layer of a variant first, so a part-way merge is balanced
        for layer in layers:
            clock = time.perf_counter()
            scaled, report = scale_layer(model, layer, data.scaling.X, data.scaling.y,
                                         n_inserted=config.n_inserted, init="identity",
                                         config=config.scaling, seed=seed + layer, retries=0,
                                         spec=VARIANTS[name])
            rows = sweep_layer(config, scaled, data, progress=False)[0]
            frontier = {}
            for steps in sorted({r["linear_steps"] for r in rows}):
                best = select([r for r in rows if r["linear_steps"] == steps])
                frontier[steps] = {k: best[k] for k in ("val_accuracy", "test_accuracy",
                                                        "n_delays", "rank", "tikhonov",
                                                        "constant")}
            line = {"seed": seed, "layer": layer, "variant": name, "original": original,
                    "scaled_val": accuracy(scaled, data.val.X, data.val.y),
                    "scaled_test": accuracy(scaled, data.test.X, data.test.y),
                    "final_loss": report.history[-1] if report.history else None,
                    "frontier": frontier, "seconds": round(time.perf_counter() - clock, 1)}
            with part.open("a") as f:
                f.write(json.dumps(line) + "\n")
            print(name, layer, line["scaled_test"], line["seconds"], flush=True)


def depth(frontier: dict, original: dict, split: str) -> int:
    """Largest number of linear steps whose val-chosen row keeps ``split`` within 0.5 point."""
    ok = [int(s) for s, r in frontier.items()
          if r[f"{split}_accuracy"] >= original[split] - 0.005]
    return max(ok, default=0)


def _mean(values) -> float:
    return statistics.fmean(values) if values else float("nan")


def _sd(values) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def merge(parts: list[Path]) -> dict:
    lines = [json.loads(x) for p in parts for x in p.read_text().splitlines() if x.strip()]
    for line in lines:
        line["val_depth"] = depth(line["frontier"], line["original"], "val")
        line["test_depth"] = depth(line["frontier"], line["original"], "test")
    layers = sorted({x["layer"] for x in lines})
    chosen = {}  # (family, layer) -> variant chosen on validation, over the seeds
    for layer in layers:
        for prefix, family in FAMILIES.items():
            names = [n for n in VARIANTS if n == prefix or n.startswith(prefix + " ")]
            scored = []
            most = max(len({x["seed"] for x in lines if x["variant"] == n
                            and x["layer"] == layer}) for n in names)
            for n in names:  # weights compared on the same seeds only (a run may stop early)
                got = [x for x in lines if x["variant"] == n and x["layer"] == layer]
                if got and len(got) == most:
                    scored.append(((_mean([x["val_depth"] for x in got]),
                                    _mean([x["scaled_val"] for x in got])), n))
            if scored:
                chosen[(family, layer)] = max(scored)[1]
    summary = []
    for (family, layer), name in chosen.items():
        got = sorted((x for x in lines if x["variant"] == name and x["layer"] == layer),
                     key=lambda x: x["seed"])
        steps = sorted({int(s) for x in got for s in x["frontier"]})
        frontier = {s: [x["frontier"][str(s)]["test_accuracy"] for x in got
                        if str(s) in x["frontier"]] for s in steps}
        original = [x["original"]["test"] for x in got]
        mean_frontier = {s: _mean(v) for s, v in frontier.items()}
        summary.append({
            "family": family, "layer": layer, "variant": name, "seeds": [x["seed"] for x in got],
            "original_test": _mean(original),
            "scaled_val": _mean([x["scaled_val"] for x in got]),
            "scaled_test": _mean([x["scaled_test"] for x in got]),
            "scaled_test_sd": _sd([x["scaled_test"] for x in got]),
            "frontier_test_mean": mean_frontier,
            "frontier_test_sd": {s: _sd(v) for s, v in frontier.items()},
            "test_depth_per_seed": [x["test_depth"] for x in got],
            "test_depth_of_mean": max([s for s, v in mean_frontier.items()
                                       if v >= _mean(original) - 0.005], default=0)})
    return {"rows": lines, "summary": summary,
            "chosen_on_validation": {f"{f} / layer {k}": n for (f, k), n in chosen.items()},
            "command": "benchmarks/scaling_variants.py run --seed S (S = 0, 1, 2); merge",
            "torch": torch.__version__}


def render(result: dict) -> str:
    out = ["# Scaling variants on clean Yin-Yang (N = 10, near-identity init, one attempt)", "",
           "Test accuracy (%) of the validation-chosen delay-DMD row at each number of linear "
           "steps, mean over seeds; penalty weights chosen per layer on validation. "
           "'depth' = linear depth at 0.5 point (largest number of linear steps whose "
           "validation-chosen row keeps test within 0.5 point of the original), per seed and "
           "of the seed-mean frontier. A weight is chosen only among grid points run on as "
           "many seeds as the most complete one (a run stopped part way leaves the rest on "
           "fewer seeds; see the last table).", ""]
    for layer in sorted({s["layer"] for s in result["summary"]}):
        rows = [s for s in result["summary"] if s["layer"] == layer]
        steps = sorted({int(k) for s in rows for k in s["frontier_test_mean"]})
        out += [f"## Layer {layer} (original test {100 * rows[0]['original_test']:.2f}%)", "",
                "| variant | seeds | scaled val | scaled test | depth per seed | depth of mean | "
                + " | ".join(f"L={s}" for s in steps) + " |",
                "|---" * (6 + len(steps)) + "|"]
        for s in rows:
            cells = [f"{100 * s['frontier_test_mean'][k]:.1f}" if k in s["frontier_test_mean"]
                     else "" for k in steps]
            out.append(f"| {s['family']}: {s['variant']} | {len(s['seeds'])} | "
                       f"{100 * s['scaled_val']:.2f} | {100 * s['scaled_test']:.2f} "
                       f"+- {100 * s['scaled_test_sd']:.2f} | {s['test_depth_per_seed']} | "
                       f"{s['test_depth_of_mean']} | " + " | ".join(cells) + " |")
        out.append("")
    out += ["## Every grid point (mean over seeds)", "",
            "| layer | variant | seeds | scaled val | scaled test | val depth | test depth |",
            "|---|---|---|---|---|---|---|"]
    keys = sorted({(x["layer"], x["variant"]) for x in result["rows"]},
                  key=lambda k: (k[0], list(VARIANTS).index(k[1])))
    for layer, name in keys:
        got = [x for x in result["rows"] if x["layer"] == layer and x["variant"] == name]
        out.append(f"| {layer} | {name} | {len(got)} | "
                   f"{100 * _mean([x['scaled_val'] for x in got]):.2f} | "
                   f"{100 * _mean([x['scaled_test'] for x in got]):.2f} | "
                   f"{_mean([x['val_depth'] for x in got]):.1f} | "
                   f"{_mean([x['test_depth'] for x in got]):.1f} |")
    return "\n".join(out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run")
    r.add_argument("--seed", type=int, required=True)
    r.add_argument("--layers", type=int, nargs="+", default=[1, 2, 3])
    r.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    r.add_argument("--part", type=Path, required=True)
    m = sub.add_parser("merge")
    m.add_argument("parts", type=Path, nargs="+")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.command == "run":
        run(args.seed, args.layers, args.variants, args.part)
    else:
        result = merge(args.parts)
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "scaling_variants.json").write_text(json.dumps(result, indent=1) + "\n")
        (RESULTS / "scaling_variants.md").write_text(render(result))


if __name__ == "__main__":
    main()
