"""Render ``report.md`` from ``results.json``: plain markdown tables that diff well.

The report only reads the results (and links the figures next to them), so ``koopnet report
RUN_DIR`` can rebuild it at any time without re-running anything.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path


def _pct(value) -> str:
    return "–" if value is None else f"{100 * value:.2f}"


def _table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return [*lines, ""]


def _setting(row: dict) -> str:
    return (f"h={row['n_delays']}, rank={row['rank']} (→{row['rank_resolved']}), "
            f"tikhonov={row['tikhonov']}, constant={row['constant']}, "
            f"M={row['trajectories']}")


def render_report(results: dict, figures: list[str] | None = None) -> str:
    """Markdown for one run. Accuracies are percentages in the tables."""
    protocol = results["protocol"]
    lines = [f"# koopnet report: {results['dataset']}, protocol `{protocol}`, "
             f"seed {results['seed']}", ""]
    if protocol == "paper":
        lines += ["Protocol **paper**: the paper's data sets and seeds; its test set overlaps the "
                  "trajectory pool and the scaling set, and the best row is picked on it, as the "
                  "paper did. `held-out` scores the same rows on an independent set.", ""]
    else:
        lines += ["Protocol **clean**: models and DMD fitted on the training split, every "
                  "hyper-parameter selected on the validation split, test reported.", ""]
    original = results["original"]
    lines += ["## Networks", ""]
    header = ["model", "val %", "test %"]
    rows = [["original", _pct(original["val_accuracy"]), _pct(original["test_accuracy"])]]
    for s in results["scaled"]:
        status = "" if s["scaling_ok"] else " **(scaling failed)**"
        rows.append([f"scaled, layer {s['layer']} ({s['width']}→{s['out_width']}, "
                     f"{s['init']} init){status}", _pct(s["val_accuracy"]),
                     _pct(s["test_accuracy"])])
    lines += _table(header, rows)

    selected = results.get("selected")
    if selected:
        lines += ["## Selected Koopman hybrid", "",
                  f"Layer {selected['layer']}, {_setting(selected)}: "
                  f"{selected['linear_steps']} linear steps, {selected['nonlinear_blocks']} "
                  f"inserted nonlinear blocks still run. Validation "
                  f"{_pct(selected['val_accuracy'])}%, **test {_pct(selected['test_accuracy'])}%**"
                  + (f", held-out {_pct(selected['held_out_accuracy'])}%"
                     if "held_out_accuracy" in selected else "") + ".", ""]
        header = ["layer", "setting", "linear steps", "val %", "test %"]
        rows = [[r["layer"], _setting(r), r["linear_steps"], _pct(r["val_accuracy"]),
                 _pct(r["test_accuracy"])] for r in results.get("selected_per_layer", [])]
        lines += ["Best row per layer (chosen on validation):", "", *_table(header, rows)]

    lines += ["## Hybrid accuracy by number of delays", "",
              "Best validation row for each (layer, h, trajectories); test of that row.", ""]
    best: dict[tuple, dict] = {}
    for row in results["sweep"]:
        key = (row["layer"], row["trajectories"], row["n_delays"])
        if key not in best or row["val_accuracy"] > best[key]["val_accuracy"]:
            best[key] = row
    delays = sorted({k[2] for k in best})
    groups: dict[tuple, dict] = defaultdict(dict)
    for (layer, m, h), row in best.items():
        groups[(layer, m)][h] = row
    for metric in ["val_accuracy", "test_accuracy"] + (
            ["held_out_accuracy"] if any("held_out_accuracy" in r for r in best.values()) else []):
        header = ["layer", "M", *[f"h={h}" for h in delays]]
        rows = [[layer, m, *[_pct(cells[h][metric]) if h in cells else "–" for h in delays]]
                for (layer, m), cells in sorted(groups.items())]
        lines += [f"**{metric.replace('_', ' ')} (%)**", "", *_table(header, rows)]

    for figure in figures or []:
        lines += [f"![{Path(figure).stem}]({Path(figure).name})", ""]
    timings = results.get("timings_s", {})
    if timings:
        lines += ["## Timings (s)", "", *_table(list(timings), [list(timings.values())])]
    env = results.get("environment", {})
    lines += ["Environment: " + ", ".join(f"{k} {v}" for k, v in env.items()), ""]
    return "\n".join(lines)
