"""Throughput of the original residual MLP and ViT against their depth hybrids (issue 12).

For every number k of replaced last blocks, a :class:`koopnet.DepthHybrid` (no delays: the
state entering the span is mapped straight to the state leaving it) is fitted on random
inputs and timed against the original on the same batch, in one process with 1 thread,
alternating original and hybrid so that load from other jobs hits both alike. Speed does not
depend on the weights, so the models are freshly initialised. The ViT gets three views: one
64x64-sized map per token (per position), one 1088x1088-sized map over the flattened state,
the flattened map with one delay (a [1088, 2176] map), and the learned lifting of the
flattened state of ``koopnet reproduce vit-mnist`` (psi, then a [1088, 1088 + r + 1] map). The
residual MLP also gets the map with 2 delays (the view its reproduction selects with 2 of 4
blocks replaced) and the learned lifting of ``koopnet reproduce resmlp-mnist`` (psi of one
block's multiply-adds, then one map). Every psi is untrained (its cost does not depend on it).

    OMP_NUM_THREADS=1 python benchmarks/bench_depth.py [--batches 8,256] [--repeats 30]

writes benchmarks/results/bench_depth.{json,md}. Two batch sizes, because on this sandbox a
forward pass of batch 256 can be dominated by the cost of fresh memory pages for its
intermediate tensors (the residual MLP's embed -> block -> block chain measured several times
the sum of its parts timed alone), which is not arithmetic and favours whichever model
allocates less; batch 8 keeps every tensor small.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from koopnet import linearize_depth
from koopnet.depth import DepthHybrid
from koopnet.dmd import DMD
from koopnet.lab import vit as vit_lab
from koopnet.lab.residual import LIFTING, ResidualMLP, depth_states
from koopnet.lab.vit import ViT
from koopnet.lab.vit_run import ViTConfig
from koopnet.learned import LearnedObservable

RESULTS = Path(__file__).parent / "results"
#: the views timed: per position, flattened (no delays), with 1 or 2 delays, learned lifting
VIEWS = {True: "per position", False: "flattened", "delay": "flattened, 1 delay",
         "delay2": "flattened, 2 delays", "lifting": "learned lifting"}
DELAYS = {"delay": 1, "delay2": 2}


def _time(model, X, repeats: int) -> list[float]:
    with torch.no_grad():
        model(X)  # warm-up
        out = []
        for _ in range(repeats):
            start = time.perf_counter()
            model(X)
            out.append(time.perf_counter() - start)
    return out


def _lifted(model, names, k: int, fit_X) -> DepthHybrid:
    """The learned-lifting hybrid of the last k blocks (psi untrained: same cost), as the
    residual MLP's and the ViT's reproductions build it."""
    if isinstance(model, ViT):
        states = vit_lab.view(vit_lab.vit_states(model, fit_X), "flat")[:, len(names) - k:]
        config = ViTConfig()
        observable = LearnedObservable(0, latent_dims=config.lifting_latent,
                                       hidden=config.lifting_hidden,
                                       **{**vit_lab.LIFTING, "n_steps": 0}).fit(states)
    else:
        states = depth_states(model, fit_X)[:, len(names) - k:]  # [n, k+1, W]
        observable = LearnedObservable(0, hidden=states.shape[2],
                                       **{**LIFTING, "n_steps": 0}).fit(states)
    dmd = DMD(exact_rollout=True).fit(observable.transform(states.double()))
    return DepthHybrid(model, names[len(names) - k:], observable, dmd).eval()


def bench(name, model, views, X, fit_X, repeats: int) -> list[dict]:
    names = [f"blocks.{i}" for i in range(len(model.blocks))]
    rows = []
    for k in range(1, len(names) + 1):
        for per_position in views:
            delays = DELAYS.get(per_position, 0)
            if per_position == "lifting":
                hybrid = _lifted(model, names, k, fit_X)
            elif delays + k > len(names):
                continue  # each delay needs one block before the span
            else:
                hybrid = linearize_depth(model, names[len(names) - k - delays:], fit_X,
                                         n_delays=delays, per_position=per_position is True)
            orig, hyb = [], []
            for _ in range(repeats):  # interleaved: original, hybrid, original, ...
                orig += _time(model, X, 1)
                hyb += _time(hybrid, X, 1)
            # the fastest pass is the one least disturbed by the other jobs on the machine
            t_orig, t_hyb = min(orig), min(hyb)
            rows.append({"model": name, "batch": len(X), "replaced": k, "of": len(names),
                         "view": VIEWS[per_position],
                         "original_ms": 1e3 * t_orig, "hybrid_ms": 1e3 * t_hyb,
                         "original_per_s": len(X) / t_orig, "hybrid_per_s": len(X) / t_hyb,
                         "speedup": t_orig / t_hyb,
                         "median_speedup": statistics.median(orig) / statistics.median(hyb)})
            print(json.dumps(rows[-1]))
    return rows


def render(meta: dict, rows: list[dict]) -> str:
    """bench_depth.md from the rows (``--render`` rebuilds it from bench_depth.json)."""
    lines = ["# Depth hybrids: throughput against the original (1 thread, fastest of "
             f"{meta['repeats']} interleaved passes)", "",
             "Command: `OMP_NUM_THREADS=1 python benchmarks/bench_depth.py`. Random weights "
             "(speed does not depend on them); hybrids without delays (k last blocks -> one "
             "linear map); 'learned lifting': psi then one map (ResMLP: psi of one block's "
             "multiply-adds; ViT: psi of the flattened state, then a [1088, 1088 + r + 1] "
             "map). "
             "Where the fastest and the median ratio disagree, the row does not measure the "
             "models: batch-256 passes on this sandbox have been bimodal in some runs (fresh "
             "pages for intermediate tensors cost more than the arithmetic).", "",
             "| model | batch | replaced | view | original (ms) | hybrid (ms) | speed-up | "
             "speed-up (medians) |", "|---|---:|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['batch']} | {r['replaced']}/{r['of']} | "
                     f"{r['view']} | {r['original_ms']:.2f} | {r['hybrid_ms']:.2f} | "
                     f"{r['speedup']:.2f}x | {r['median_speedup']:.2f}x |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", default="8,256")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--render", action="store_true",
                        help="only rebuild bench_depth.md from bench_depth.json")
    args = parser.parse_args()
    if args.render:
        saved = json.loads((RESULTS / "bench_depth.json").read_text())
        (RESULTS / "bench_depth.md").write_text(render(saved["meta"], saved["rows"]))
        return
    torch.set_num_threads(1)
    torch.manual_seed(0)
    batches = [int(b) for b in args.batches.split(",")]
    fit_X = torch.randn(512, 784)
    resmlp, vit = ResidualMLP(784, 256, 4).eval(), ViT().eval()
    rows = []
    for batch in batches:
        X = torch.randn(batch, 784)
        rows += bench("ResMLP 784-256 x4", resmlp, (False, "delay2", "lifting"), X, fit_X,
                      args.repeats)
        rows += bench("ViT 17x64 x6", vit, (True, False, "delay", "lifting"), X, fit_X,
                      args.repeats)
    meta = {"batches": batches, "repeats": args.repeats, "threads": torch.get_num_threads(),
            "statistic": "fastest of interleaved single-batch forward passes (median "
                                 "ratio beside it)",
            "torch": torch.__version__, "python": platform.python_version(),
            "machine": platform.machine(), "note": "2 shared cores, other jobs running"}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "bench_depth.json").write_text(json.dumps({"meta": meta, "rows": rows},
                                                         indent=1) + "\n")
    (RESULTS / "bench_depth.md").write_text(render(meta, rows))


if __name__ == "__main__":
    main()
