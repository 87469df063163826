"""``koopnet reproduce resmlp-mnist``: the residual-MLP depth reproduction, end to end.

Per seed: the clean MNIST splits (validation carved from the training set with the seed), a
residual MLP trained on the training split, its depth states on a training subset, the sweep
of :mod:`koopnet.lab.residual` scored on validation, the selected row per (span, method)
scored on test, and the linearity profile. :func:`write_depth_run` writes results.json, the
figure and report.md into a (staged) folder.
"""

from __future__ import annotations

import dataclasses
import logging
import platform
import time
from dataclasses import dataclass

import numpy as np
import torch

from koopnet._version import __version__
from koopnet.io.artifacts import atomic_write_text, write_json
from koopnet.io.datasets import idx_splits
from koopnet.lab import residual
from koopnet.lab.devices import device_record
from koopnet.lab.recipes import RESMLP_MNIST_QUICK, RESMLP_MNIST_RECIPE
from koopnet.models import TrainConfig, accuracy

log = logging.getLogger(__name__)
SCHEMA = 1
_SETTING_KEYS = ("seed", "n_delays", "rank", "tikhonov", "ridge", "lifting_ratio",
                 "lifting_latent", "lifting_hidden", "nonlinear_macs", "block_macs")
METHODS = ("delay DMD", "learned lifting", "least squares", "ridge", "identity")


@dataclass(frozen=True)
class DepthConfig:
    """Everything the reproduction depends on; written into results.json."""

    seeds: tuple[int, ...] = (0, 1, 2)
    width: int = 256
    n_blocks: int = 4
    base: TrainConfig = RESMLP_MNIST_RECIPE
    train_subset: int | None = None  # train on the first n training images (quick runs)
    fit_subset: int = 20000  # depth states of the first n training images feed every fit
    delays: tuple[int, ...] | None = None  # None: every d = 0..h
    ranks: tuple = (None, 0.9999, 0.999)
    tikhonovs: tuple[float, ...] = (0.0, 1e-6, 1e-4)
    ridges: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1)
    lifting_spans: tuple[int, ...] = (3, 4)  # spans that also get a learned lifting
    lifting_ratio: int = 1  # psi's features per neuron: W -> W -> W costs one block's MACs
    lifting_steps: int = 600
    data_dir: str | None = None


def depth_config(*, seed: int | None = None, seeds: tuple[int, ...] | None = None,
                 quick: bool = False, data_dir: str | None = None) -> DepthConfig:
    """Seeds 0, 1, 2 (or those given); ``quick``: 5k images, 1 epoch, seed 0, small grid."""
    config = DepthConfig(data_dir=data_dir)
    if quick:
        config = dataclasses.replace(config, seeds=(0,), base=RESMLP_MNIST_QUICK,
                                     train_subset=5000, fit_subset=5000, delays=(0, 1),
                                     ranks=(None,),
                                     tikhonovs=(0.0,), ridges=(1e-2,), lifting_spans=(1,),
                                     lifting_steps=5)
    if seed is not None:
        seeds = (seed,)
    if seeds is not None:
        if not seeds:
            raise ValueError("seeds is empty; pass at least one seed, e.g. --seeds 0.")
        config = dataclasses.replace(config, seeds=tuple(seeds))
    return config


def _run_seed(config: DepthConfig, seed: int, device: torch.device | str = "cpu") -> dict:
    splits = idx_splits(config.data_dir, name="mnist", n_val=None, seed=seed)
    train = splits.train
    if config.train_subset is not None:
        train = train.subset(slice(0, config.train_subset))
    train, val, test = (s.to(device) for s in (train, splits.val, splits.test))
    splits = dataclasses.replace(splits, val=val, test=test)
    torch.manual_seed(seed)  # the weights are drawn on the CPU, then moved
    model = residual.ResidualMLP(splits.n_features, config.width, config.n_blocks,
                                 splits.n_classes).to(device)
    start = time.perf_counter()
    residual.train_residual(model, train.X, train.y, config.base, seed=seed)
    trained_s = time.perf_counter() - start
    original = {"seed": seed, "val_accuracy": accuracy(model, splits.val.X, splits.val.y),
                "test_accuracy": accuracy(model, splits.test.X, splits.test.y),
                "train_seconds": trained_s}
    log.info("seed %d: residual MLP trained in %.0f s, val %.4f", seed, trained_s,
             original["val_accuracy"])
    states = residual.depth_states(model, train.X[:config.fit_subset])
    grid = {"delays": config.delays, "ranks": config.ranks, "tikhonovs": config.tikhonovs,
            "ridges": config.ridges, "lifting_spans": config.lifting_spans,
            "lifting_ratio": config.lifting_ratio, "lifting_steps": config.lifting_steps,
            "seed": seed}
    sweep, models = residual.sweep_spans(model, states, splits.val, grid, log=log.info)
    rows = []
    for row in residual.select(sweep):  # chosen on validation; test only scores the choice
        replaced = models[row["span"], row["method"]]
        rows.append({**row, "seed": seed,
                     "test_accuracy": accuracy(replaced, splits.test.X, splits.test.y)})
    val_states = residual.depth_states(model, splits.val.X)
    profile = [{**p, "seed": seed} for p in
               residual.linearity_profile(model, states, val_states, splits.val)]
    return {"original": original, "rows": rows, "profile": profile,
            "sweep": [{**r, "seed": seed} for r in sweep]}


def run_depth(config: DepthConfig, device: torch.device | str = "cpu") -> dict:
    """All seeds on ``device``; returns the results.json dictionary (kind "depth")."""
    start = time.perf_counter()
    parts = [_run_seed(config, seed, device) for seed in config.seeds]
    architecture = {"n_in": 784, "width": config.width, "n_blocks": config.n_blocks,
                    "block": "x + Linear(GELU(Linear(LayerNorm(x))))",
                    "head": "LayerNorm + Linear"}
    results = depth_results("resmlp-mnist", config, architecture, parts, start, device)
    results["summary"] = summarize(results)
    return results


def depth_results(experiment: str, config, architecture: dict, parts: list[dict],
                  start: float, device: torch.device | str = "cpu") -> dict:
    """The results.json dictionary (kind "depth") of a depth reproduction's seeds."""
    return {
        "kind": "depth", "schema": SCHEMA, "dataset": "mnist", "experiment": experiment,
        "config": dataclasses.asdict(config), "architecture": architecture,
        "original": [p["original"] for p in parts],
        **{key: [r for p in parts for r in p[key]] for key in ("rows", "profile", "sweep")},
        "environment": {"koopnet": __version__, "torch": torch.__version__,
                        "python": platform.python_version(),
                        "threads": torch.get_num_threads(), **device_record(device),
                        "seconds": time.perf_counter() - start},
    }


def merge_depth_results(runs: list[dict]) -> dict:
    """One results dictionary from depth runs of disjoint seeds with the same configuration
    otherwise (seeds run as separate processes); the per-seed lists are concatenated in seed
    order; the environment sums the wall times and keeps each run's. ``summary`` is left to
    the caller."""
    if not runs:
        raise ValueError("merge_depth_results needs at least one run.")
    seeds = [o["seed"] for run in runs for o in run["original"]]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"runs share seeds {sorted(s for s in set(seeds) if seeds.count(s) > 1)}"
                         "; merge runs of disjoint seeds.")
    first = runs[0]
    for run in runs[1:]:
        for key in ("experiment", "architecture", "kind", "schema"):
            if run[key] != first[key]:
                raise ValueError(f"runs differ in '{key}'; merge runs of one experiment.")
        differ = sorted(k for k in first["config"] if k != "seeds"
                        and first["config"][k] != run["config"].get(k))
        if differ:
            raise ValueError(f"runs differ in config {differ}; merge runs of one setting.")
    merged = {key: value for key, value in first.items()
              if key not in ("summary", "acceptance", "environment")}
    merged["config"] = {**first["config"], "seeds": sorted(seeds)}
    for key in ("original", "rows", "profile", "sweep"):  # stable: a seed's order is kept
        merged[key] = sorted((r for run in runs for r in run[key]), key=lambda r: r["seed"])
    merged["environment"] = {**runs[0]["environment"],  # versions and threads of the first
                             "seconds": sum(run["environment"]["seconds"] for run in runs),
                             "runs": [run["environment"] for run in runs]}
    return merged


def summary_table(summary: list[dict]) -> list[str]:
    """The report's accuracy-against-replaced-blocks table (drop > 0: accuracy lost)."""
    lines = ["## Test accuracy (%) against the number of replaced last blocks", "",
             "| replaced | method | test | drop vs original | val | settings (per seed) |",
             "|---:|---|---:|---:|---:|---|"]
    for s in summary:
        settings = "; ".join(_settings(s["method"], x) for x in s["settings"])
        lines.append(f"| {s['span']} | {s['method']} | {s['test_mean']:.2f} ± "
                     f"{s['test_sd']:.2f} | {s['drop_mean']:+.2f} ± {s['drop_sd']:.2f} | "
                     f"{s['val_mean']:.2f} ± {s['val_sd']:.2f} | {settings} |")
    return lines


def _settings(method: str, x: dict) -> str:
    if method == "learned lifting":
        return (f"ψ: {x['lifting_ratio']}W features ({x['nonlinear_macs'] / x['block_macs']:.2f}"
                f" block), tik={x['tikhonov']}")
    if method == "lifting/flat":
        return (f"ψ: {x['lifting_latent']} features ({x['nonlinear_macs'] / x['block_macs']:.2f}"
                f" block), rank={x['rank']}, tik={x['tikhonov']}")
    if "DMD" in method:
        return f"delays={x['n_delays']}, rank={x['rank']}, tik={x['tikhonov']}"
    return f"λ={x['ridge']}" if x["ridge"] else "-"


def mean_sd(values) -> tuple[float, float]:
    values = np.asarray(values, dtype=float)
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def summarize(results: dict, methods=METHODS) -> list[dict]:
    """Mean and sd over seeds of test and validation accuracy per (span, method), in %,
    with the drop against the original network of the same seed."""
    base = {o["seed"]: o["test_accuracy"] for o in results["original"]}
    out = []
    spans = sorted({r["span"] for r in results["rows"]})
    for span in spans:
        for method in methods:
            rows = [r for r in results["rows"] if r["span"] == span and r["method"] == method]
            if not rows:
                continue
            test = mean_sd([100 * r["test_accuracy"] for r in rows])
            val = mean_sd([100 * r["val_accuracy"] for r in rows])
            drop = mean_sd([100 * (base[r["seed"]] - r["test_accuracy"]) for r in rows])
            out.append({"span": span, "method": method, "test_mean": test[0],
                        "test_sd": test[1], "val_mean": val[0], "val_sd": val[1],
                        "drop_mean": drop[0], "drop_sd": drop[1], "n_seeds": len(rows),
                        "settings": [{k: r[k] for k in _SETTING_KEYS if k in r}
                                     for r in rows]})
    return out


def render_depth_report(results: dict, figures: list[str]) -> str:
    """report.md: accuracy against replaced blocks per method, and the linearity profile."""
    orig = mean_sd([100 * o["test_accuracy"] for o in results["original"]])
    seeds = [o["seed"] for o in results["original"]]
    lines = [f"# Residual MLP on MNIST: depth as a trajectory (seeds {seeds})", "",
             f"Original network: test {orig[0]:.2f} ± {orig[1]:.2f} %. Every setting was "
             "chosen on the validation split; the test split scores only the chosen one.", "",
             *summary_table(results["summary"])]
    lines += ["", "## Linearity profile (held-out validation states)", "",
              "LS R² of the span's input -> output map, R² of its update (output - input), the "
              "one-step DMD relative residual on held-out pairs, and the validation accuracy "
              "with the span replaced by its least-squares map; mean ± sd over seeds.", "",
              "| blocks | LS R² | LS R² (update) | DMD residual | val acc. replaced (%) |",
              "|---|---:|---:|---:|---:|"]
    spans = sorted({(p["first"], p["last"]) for p in results["profile"]})
    for first, last in spans:
        rows = [p for p in results["profile"] if (p["first"], p["last"]) == (first, last)]
        cells = [mean_sd([p[k] * (100 if k == "val_accuracy_ls" else 1) for p in rows])
                 for k in ("ls_r2", "ls_r2_update", "dmd_residual", "val_accuracy_ls")]
        fmt = [f"{m:.4f} ± {s:.4f}" for m, s in cells[:3]] + [f"{cells[3][0]:.2f} ± "
                                                               f"{cells[3][1]:.2f}"]
        lines.append(f"| {first}..{last} | " + " | ".join(fmt) + " |")
    lines += ["", *(f"![{name}]({name})" for name in figures), ""]
    return "\n".join(lines)


def write_depth_run(out, results: dict, *, pdf: bool = False) -> list[str]:
    """results.json, the accuracy figure, then report.md, into ``out``."""
    import matplotlib.pyplot as plt

    from koopnet.lab.figures import plot_accuracy_vs_replaced_blocks, save_figure

    write_json(out / "results.json", results)
    fig = plot_accuracy_vs_replaced_blocks(results["summary"], results["original"],
                                           title="Residual MLP on MNIST: last k blocks "
                                                 "replaced")
    written = save_figure(fig, out / "accuracy_vs_replaced_blocks", pdf=pdf)
    plt.close(fig)
    names = [p.rsplit("/", 1)[-1] for p in written if p.endswith(".png")]
    atomic_write_text(out / "report.md", render_depth_report(results, names))
    return written
