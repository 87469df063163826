"""Render ``report.md`` from ``results.json``: plain markdown tables that diff well.

The report only reads the results (and links the figures next to them), so ``koopnet report
RUN_DIR`` can rebuild it at any time without re-running anything.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from koopnet.lab.frontier import frontier_section
from koopnet.lab.markdown import table as _table
from koopnet.lab.study_report import render_study

SCHEMA = 1
# Top-level entries each kind of results.json needs, and their JSON types.
_RUN_KEYS = {"dataset": str, "protocol": str, "seed": int, "original": dict, "scaled": list,
             "sweep": list}
_EVALUATE_KEYS = {"layer": int, "n_delays": int, "linear_steps": int, "data": dict,
                  "metrics": dict}
_TYPE_NAMES = {str: "a string", int: "an integer", dict: "an object", list: "a list"}


def load_results(path) -> dict:
    """Read a run's ``results.json``, refusing a malformed one with a message that names the
    file and what is wrong (invalid JSON, another schema, a missing or mistyped entry)."""
    path = Path(path)
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise ValueError(f"'{path}' is not a UTF-8 text file ({err}); re-run the command "
                         "that wrote it.") from err
    except json.JSONDecodeError as err:
        raise ValueError(f"'{path}' is not valid JSON (line {err.lineno}, column {err.colno}: "
                         f"{err.msg}); re-run the command that wrote it.") from err
    if not isinstance(results, dict):
        raise ValueError(f"'{path}' holds a {type(results).__name__}, not the object koopnet "
                         "writes; re-run the command that wrote it.")
    if results.get("schema", SCHEMA) != SCHEMA:
        raise ValueError(f"'{path}' has schema {results.get('schema')!r}; this koopnet reads "
                         f"{SCHEMA}.")
    needed = _EVALUATE_KEYS if results.get("stage") == "evaluate" else _RUN_KEYS
    for key, kind in needed.items():
        if key not in results:
            raise ValueError(f"'{path}' lacks the key '{key}'; it is not a complete results.json "
                             "of koopnet reproduce, study or evaluate (re-run it).")
        if not isinstance(results[key], kind) or isinstance(results[key], bool):
            raise ValueError(f"'{path}': '{key}' must be {_TYPE_NAMES[kind]}; got "
                             f"{type(results[key]).__name__}.")
    return results


def _pct(value) -> str:
    return "–" if value is None else f"{100 * value:.2f}"


def _several_observables(results: dict) -> bool:
    """Whether the sweep holds rows of observables other than delay coordinates; only then do
    settings name their observable (so a delay-only report reads as it always did)."""
    return any(row.get("observable", "delay") != "delay" for row in results["sweep"])


def _setting(row: dict, observable: bool = False) -> str:
    named = f"{row.get('observable', 'delay')}, " if observable else ""
    return (f"{named}h={row['n_delays']}, rank={row['rank']} (→{row['rank_resolved']}), "
            f"tikhonov={row['tikhonov']}, constant={row['constant']}, "
            f"M={row['trajectories']}")


def paper_grid_section(results: dict) -> list[str]:
    """MNIST, paper protocol: our hybrid test accuracy next to the paper's grid, cell by cell.

    Each cell reads ``ours vs paper (ours - paper)`` in percent; empty for other runs.
    """
    from koopnet.lab.paper import PAPER_MNIST, PAPER_MNIST_DELAYS, PAPER_MNIST_GRID

    if results.get("dataset") != "mnist" or results.get("protocol") != "paper":
        return []
    ours: dict[tuple, dict] = {}
    for row in results["sweep"]:
        key = (row["layer"], row["trajectories"], row["n_delays"])
        if key not in ours or row["val_accuracy"] > ours[key]["val_accuracy"]:
            ours[key] = row

    def cell(key) -> str:
        if key not in ours:
            return f"– vs {_pct(PAPER_MNIST_GRID[key])}"
        mine, theirs = ours[key]["test_accuracy"], PAPER_MNIST_GRID[key]
        return f"{_pct(mine)} vs {_pct(theirs)} ({100 * (mine - theirs):+.2f})"

    pairs = sorted({(layer, m) for layer, m, _ in PAPER_MNIST_GRID})
    header = ["layer", "M", *[f"h={h}" for h in PAPER_MNIST_DELAYS]]
    rows = [[layer, m, *[cell((layer, m, h)) for h in PAPER_MNIST_DELAYS]] for layer, m in pairs]
    headline = (3, 500, 10)
    lines = ["## Paper grid: ours vs the paper", "",
             "MNIST hybrid test accuracy (%), rank 500, concatenated series, raw-pixel "
             "trajectories; each cell is `ours vs paper (difference)`. Paper: "
             "`figures/mnist_accuracies.csv` of the authors' code (paper-method section 9).", ""]
    if headline in ours:
        lines += [f"Headline cell (layer 3, M=500, h=10): ours "
                  f"{_pct(ours[headline]['test_accuracy'])}% vs the paper's "
                  f"{_pct(PAPER_MNIST_GRID[headline])}%; original network ours "
                  f"{_pct(results['original']['test_accuracy'])}% vs "
                  f"{_pct(PAPER_MNIST['original'])}%. Both sides are single training runs; "
                  "`benchmarks/paper_seeds.py --dataset mnist` gives this cell's spread over "
                  "seeds.", ""]
    return [*lines, *_table(header, rows)]


def paper_yinyang_section(results: dict) -> list[str]:
    """Yin-Yang, paper protocol: our numbers next to the paper's three; empty for other runs."""
    from koopnet.lab.paper import PAPER_YINYANG

    if results.get("dataset") != "yinyang" or results.get("protocol") != "paper":
        return []
    saved = [r for r in results["sweep"]
             if (r["layer"], r["trajectories"], r["n_delays"]) == (1, 5000, 10)]
    rows = [["original network", _pct(results["original"]["test_accuracy"]),
             _pct(PAPER_YINYANG["original"])]]
    if saved:
        rows.append(["hybrid, layer 1, M=5000, h=10, full rank (the paper's saved run)",
                     _pct(saved[0]["test_accuracy"]), _pct(PAPER_YINYANG["saved_hybrid_layer1"])])
    if results.get("selected"):
        best = results["selected"]
        rows.append([f"best hybrid (layer {best['layer']}, "
                     f"{_setting(best, _several_observables(results))})",
                     _pct(results["selected"]["test_accuracy"]),
                     _pct(PAPER_YINYANG["best_hybrid"])])
    return ["## Ours vs the paper", "",
            "Test accuracy (%) on the paper's 4k test set. The paper reports one training run; "
            "between seeds the layer-1 hybrid moves by several points, so compare with the "
            "spread over seeds of `benchmarks/paper_seeds.py --dataset yinyang` "
            "(`benchmarks/results/yinyang_paper_seeds.md`), not with one run.", "",
            *_table(["quantity", "ours", "paper"], rows), ""]


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
    lines += _networks_section(results) + _selected_section(results) + _delays_section(results)
    lines += paper_grid_section(results)
    lines += paper_yinyang_section(results)
    lines += frontier_section(results)
    lines += render_study(results)
    embedded = {Path(f).name for f in results.get("study", {}).get("figures", [])}
    for figure in figures or []:
        if Path(figure).name not in embedded:
            lines += [f"![{Path(figure).stem}]({Path(figure).name})", ""]
    timings = results.get("timings_s", {})
    if timings:
        lines += ["## Timings (s)", "", *_table(list(timings), [list(timings.values())])]
    env = results.get("environment", {})
    lines += ["Environment: " + ", ".join(f"{k} {v}" for k, v in env.items()), ""]
    return "\n".join(lines)


def _networks_section(results: dict) -> list[str]:
    original = results["original"]
    rows = [["original", _pct(original["val_accuracy"]), _pct(original["test_accuracy"])]]
    for s in results["scaled"]:
        status = "" if s["scaling_ok"] else " **(scaling failed)**"
        rows.append([f"scaled, layer {s['layer']} ({s['width']}→{s['out_width']}, "
                     f"{s['init']} init){status}", _pct(s["val_accuracy"]),
                     _pct(s["test_accuracy"])])
    return ["## Networks", "", *_table(["model", "val %", "test %"], rows)]


def _selected_section(results: dict) -> list[str]:
    selected = results.get("selected")
    if not selected:
        return []
    held = (f", held-out {_pct(selected['held_out_accuracy'])}%"
            if "held_out_accuracy" in selected else "")
    named = _several_observables(results)
    lines = ["## Selected Koopman hybrid", "",
             f"Layer {selected['layer']}, {_setting(selected, named)}: "
             f"{selected['linear_steps']} linear steps, {selected['nonlinear_blocks']} "
             f"inserted nonlinear blocks still run. Validation "
             f"{_pct(selected['val_accuracy'])}%, **test {_pct(selected['test_accuracy'])}%**"
             f"{held}.", ""]
    header = ["layer", "setting", "linear steps", "val %", "test %"]
    rows = [[r["layer"], _setting(r, named), r["linear_steps"], _pct(r["val_accuracy"]),
             _pct(r["test_accuracy"])] for r in results.get("selected_per_layer", [])]
    return [*lines, "Best row per layer (chosen on validation):", "", *_table(header, rows)]


def _delays_section(results: dict) -> list[str]:
    named = _several_observables(results)  # then each observable has its own table rows
    group = "(layer, observable, h, trajectories)" if named else "(layer, h, trajectories)"
    lines = ["## Hybrid accuracy by number of delays", "",
             f"Best validation row for each {group}; test of that row.", ""]
    best: dict[tuple, dict] = {}
    for row in results["sweep"]:
        kind = (row.get("observable", "delay"),) if named else ()
        key = (row["layer"], *kind, row["trajectories"], row["n_delays"])
        if key not in best or row["val_accuracy"] > best[key]["val_accuracy"]:
            best[key] = row
    delays = sorted({k[-1] for k in best})
    groups: dict[tuple, dict] = defaultdict(dict)
    for (*where, h), row in best.items():
        groups[tuple(where)][h] = row
    for metric in ["val_accuracy", "test_accuracy"] + (
            ["held_out_accuracy"] if any("held_out_accuracy" in r for r in best.values()) else []):
        header = ["layer", *(["observable"] if named else []), "M", *[f"h={h}" for h in delays]]
        rows = [[*where, *[_pct(cells[h][metric]) if h in cells else "–" for h in delays]]
                for where, cells in sorted(groups.items())]
        lines += [f"**{metric.replace('_', ' ')} (%)**", "", *_table(header, rows)]
    return lines


def render_evaluation(results: dict) -> str:
    """Markdown for an evaluate folder's results.json."""
    fit = results.get("fit", {})
    lines = [f"# koopnet evaluation: layer {results['layer']}, h={results['n_delays']}", "",
             f"Hidden layer {results['layer'] + 1} replaced by a linear operator of rank "
             f"{fit.get('rank_')} ({results['linear_steps']} linear steps, "
             f"{fit.get('pairing')} pairs, tikhonov {fit.get('tikhonov')}, constant "
             f"{fit.get('constant')}). Data: `{results['data']['source']}`.", "",
             "| split | n | metric | original % | scaled % | hybrid % |",
             "|---|---|---|---|---|---|"]
    order = {"val": 0, "test": 1}
    for split, m in sorted(results["metrics"].items(), key=lambda kv: order.get(kv[0], 2)):
        lines.append(f"| {split} | {m['n']} | {m['metric']} | {100 * m['original']:.2f} | "
                     f"{100 * m['scaled']:.2f} | {100 * m['hybrid']:.2f} |")
    return "\n".join([*lines, ""])
