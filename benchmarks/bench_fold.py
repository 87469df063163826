"""Throughput and multiply-adds of the original MLP, the scaled network, the hybrid and its fold.

Usage (from the repository root):

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_fold.py --quick   # a few cells, seconds
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_fold.py           # layers 1..3 x h

Networks: a Yin-Yang-size 2-8-6-4-3-2 ReLU MLP trained briefly on Yin-Yang, and an MNIST-size
784-256-128-64-32-10 ReLU MLP with random weights (speed does not depend on the weights). At
each hidden layer N = 10 He-normal inserts are placed untrained (a speed benchmark: only the
shapes matter), delay DMD (rank 0.999) is fitted on the trajectories of random inputs, and for
each h the four networks run the same batch, one BLAS thread, interleaved, median over
repeats.

Multiply-adds per sample count every nn.Linear as in * out (activations, biases, casts and
concatenation ignored). The hybrid's and the folded hybrid's are split into nonlinear (head,
prefix blocks, tail) and linear (the map: the hybrid's [w', D], the fold's [w', (h+1) w] or its
two factors). Acceptance (issue 11 item 3): wherever the folded hybrid needs fewer multiply-adds
than the scaled network, it also runs faster.

Results: benchmarks/results/bench_fold.json and .md (``config.quick`` says which run). The
machine may be shared: contention distorts absolute timings, so compare ratios inside one run.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from koopnet.dmd import DMD
from koopnet.fold import multiply_adds
from koopnet.hybrid import KoopmanHybrid
from koopnet.io.datasets import make_yinyang
from koopnet.models import TrainConfig, build_mlp, train_classifier
from koopnet.observables import TimeDelay
from koopnet.scaling import scale_layer
from koopnet.trajectories import collect_trajectories

RESULTS = Path(__file__).resolve().parent / "results"
NO_TRAINING = TrainConfig(epochs=1, batch_size=512, lr=1e-12)  # inserts stay at their init
NETWORKS = {"yinyang": (2, 8, 6, 4, 3, 2), "mnist": (784, 256, 128, 64, 32, 10)}
N_INSERTED = 10
FULL = {"layers": (1, 2, 3), "delays": (0, 1, 5, 10), "repeats": 15}
QUICK = {"cells": {"yinyang": {2: (0, 10)}, "mnist": {1: (0, 5, 10)}}, "repeats": 11}


def base_network(name: str, seed: int, quick: bool) -> tuple[nn.Sequential, torch.Tensor]:
    """The float32 MLP and the random inputs its DMD is fitted on."""
    torch.manual_seed(seed)
    model = build_mlp(list(NETWORKS[name]))
    if name == "yinyang":
        X, y = make_yinyang(2000, seed=seed)
        config = TrainConfig(epochs=50 if quick else 300, batch_size=500, lr=1e-2)
        train_classifier(model, X, y, config, seed=seed)
        return model.eval(), X
    return model.eval(), torch.rand(1000, NETWORKS[name][0])


def time_networks(nets: dict[str, nn.Module], x: torch.Tensor,
                  repeats: int) -> dict[str, list[float]]:
    """Seconds per batch of each network, per repeat; the networks take turns within each
    repeat (in a rotating order) so that drift and contention hit all alike.

    Each measurement repeats the call often enough to last about 20 ms.
    """
    calls = {}
    with torch.inference_mode():
        for name, net in nets.items():
            net(x)  # warm-up
            start = time.perf_counter()
            net(x)
            calls[name] = max(1, math.ceil(0.02 / max(time.perf_counter() - start, 1e-6)))
        times: dict[str, list[float]] = {name: [] for name in nets}
        order = list(nets)
        for repeat in range(repeats):
            for name in order[repeat % len(order):] + order[:repeat % len(order)]:
                start = time.perf_counter()
                for _ in range(calls[name]):
                    nets[name](x)
                times[name].append((time.perf_counter() - start) / calls[name])
    return times


def map_summary(folded: nn.Sequential) -> dict:
    layers = [m for m in folded.map.modules() if isinstance(m, nn.Linear)]
    return {"factored": len(layers) == 2,
            "rank": layers[0].out_features if len(layers) == 2 else None}


def cell(name: str, model: nn.Sequential, X: torch.Tensor, layer: int, delays, batch: int,
         repeats: int, seed: int) -> list[dict]:
    scaled, _ = scale_layer(model, layer, X, n_inserted=N_INSERTED, config=NO_TRAINING,
                            init="he", seed=seed, retries=0)
    scaled.eval()
    states = collect_trajectories(scaled, X).states
    original = scaled.original().eval()
    x = X[torch.randint(len(X), (batch,), generator=torch.Generator().manual_seed(seed))]
    if name == "mnist":
        x = torch.rand(batch, X.shape[1], generator=torch.Generator().manual_seed(seed))
    rows = []
    for h in delays:
        observable = TimeDelay(h).fit(states)
        dmd = DMD(rank=0.999).fit(observable.transform(states))
        hybrid = KoopmanHybrid.from_dmd(scaled, observable, dmd).eval()
        folded = hybrid.fold()
        with torch.inference_mode():
            error = float((folded(x) - hybrid(x)).abs().max() / hybrid(x).abs().max())
        times = time_networks({"original": original, "scaled": scaled, "hybrid": hybrid,
                               "folded": folded}, x, repeats)
        seconds = {name: statistics.median(t) for name, t in times.items()}
        # paired: the two ran within the same repeat, so the ratio cancels slow drift
        speedup = statistics.median(s / f for s, f in zip(times["scaled"], times["folded"],
                                                           strict=True))
        hybrid_nonlinear = (multiply_adds(hybrid.head) + multiply_adds(hybrid.prefix)
                            + multiply_adds(hybrid.tail))
        folded_linear = multiply_adds(folded.map)
        macs = {"original": multiply_adds(original), "scaled": multiply_adds(scaled),
                "hybrid": {"nonlinear": hybrid_nonlinear, "linear": hybrid.linear_map.numel()},
                "folded": {"nonlinear": multiply_adds(folded) - folded_linear,
                           "linear": folded_linear}}
        folded_total = sum(macs["folded"].values())
        row = {"network": name, "layer": layer, "h": h, "width": hybrid.width,
               "out_width": hybrid.out_width, "dmd_rank": hybrid.rank_, **map_summary(folded),
               "fold_relative_error": error,
               "samples_per_s": {k: batch / s for k, s in seconds.items()},
               "multiply_adds": macs,
               "folded_speedup_over_scaled": speedup,
               "folded_fewer_macs_than_scaled": folded_total < macs["scaled"],
               "folded_faster_than_scaled": speedup > 1.0}
        rows.append(row)
        print(f"{name} layer {layer} h={h:2d}: " + ", ".join(
            f"{k} {v:,.0f}/s" for k, v in row["samples_per_s"].items())
            + f"; folded/scaled {speedup:.2f}x; MACs folded {folded_total} vs scaled "
            f"{macs['scaled']}", flush=True)
    return rows


def markdown(result: dict) -> str:
    cfg = result["config"]
    lines = [f"# Folded hybrid: throughput and multiply-adds ({'quick' if cfg['quick'] else 'full'}"
             " run)", "",
             f"Command: `{cfg['command']}`. Batch {cfg['batch']}, {cfg['threads']} BLAS thread, "
             f"median of {cfg['repeats']} interleaved repeats, float32, torch "
             f"{result['environment']['torch']}, {result['environment']['cpus']} CPUs, load "
             f"average {result['environment']['load_before']} before and "
             f"{result['environment']['load_after']} after.", "",
             "The machine is shared with other jobs: contention distorts absolute timings, so "
             "only the ratios between networks of one row (measured interleaved, in the same "
             "seconds) are meaningful.", "",
             "Multiply-adds per sample: nn.Linear in x out, elementwise work ignored; "
             "hybrid/folded as nonlinear (head, prefix blocks, tail) + linear (the map). "
             "`folded/scaled`: median over repeats of the paired speed-up (scaled time / folded "
             "time within one repeat); `fewer MACs`: folded total < scaled; `faster`: that "
             "speed-up > 1.", "",
             "| network | layer | h | map (r) | original /s | scaled /s | hybrid /s | folded /s "
             "| folded/scaled | MACs original | scaled | hybrid (nl+lin) | folded (nl+lin) "
             "| fewer MACs | faster |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        sp, mac = r["samples_per_s"], r["multiply_adds"]
        kind = f"factored ({r['rank']})" if r["factored"] else "dense"
        lines.append(
            f"| {r['network']} | {r['layer']} | {r['h']} | {kind} | {sp['original']:,.0f} | "
            f"{sp['scaled']:,.0f} | {sp['hybrid']:,.0f} | {sp['folded']:,.0f} | "
            f"{r['folded_speedup_over_scaled']:.2f} | {mac['original']:,} | {mac['scaled']:,} | "
            f"{mac['hybrid']['nonlinear']:,}+{mac['hybrid']['linear']:,} | "
            f"{mac['folded']['nonlinear']:,}+{mac['folded']['linear']:,} | "
            f"{'yes' if r['folded_fewer_macs_than_scaled'] else 'no'} | "
            f"{'yes' if r['folded_faster_than_scaled'] else 'no'} |")
    acc = result["acceptance"]
    lines += ["", f"Acceptance (folded faster than scaled wherever it needs fewer multiply-adds): "
              f"{'PASS' if acc['pass'] else 'FAIL'}: {acc['cells_fewer_macs']} cell(s) with fewer "
              f"multiply-adds, {len(acc['violations'])} of them not faster"
              + (f" ({', '.join(acc['violations'])})" if acc["violations"] else "") + ".",
              f"Largest relative difference folded vs hybrid logits: "
              f"{max(r['fold_relative_error'] for r in result['rows']):.1e}.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few cells, seconds")
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    # the inserts stay untrained on purpose, so scale_layer's "scaling FAILED" log is expected
    logging.getLogger("koopnet.scaling").setLevel(logging.CRITICAL)
    plan = QUICK if args.quick else FULL
    repeats = args.repeats or plan["repeats"]
    cells = plan.get("cells") or {name: dict.fromkeys(FULL["layers"], FULL["delays"])
                                  for name in NETWORKS}
    load_before = os.getloadavg()
    rows = []
    for name, layers in cells.items():
        model, X = base_network(name, args.seed, args.quick)
        for layer, delays in layers.items():
            rows += cell(name, model, X, layer, delays, args.batch, repeats, args.seed)
    fewer = [r for r in rows if r["folded_fewer_macs_than_scaled"]]
    violations = [f"{r['network']} layer {r['layer']} h={r['h']}" for r in fewer
                  if not r["folded_faster_than_scaled"]]
    command = "OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_fold.py" + (
        " --quick" if args.quick else "")
    result = {"config": {"quick": args.quick, "batch": args.batch, "repeats": repeats,
                         "threads": args.threads, "seed": args.seed, "n_inserted": N_INSERTED,
                         "dmd_rank": 0.999, "command": command},
              "environment": {"torch": torch.__version__, "python": platform.python_version(),
                              "cpus": os.cpu_count(),
                              "load_before": [round(v, 2) for v in load_before],
                              "load_after": [round(v, 2) for v in os.getloadavg()]},
              "rows": rows,
              "acceptance": {"cells_fewer_macs": len(fewer), "violations": violations,
                             "pass": not violations}}
    args.out.mkdir(parents=True, exist_ok=True)  # a quick run says so in both files
    (args.out / "bench_fold.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / "bench_fold.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
