"""Render ``report.md`` from ``results.json``: plain markdown tables that diff well.

The report only reads the results (and links the figures next to them), so ``koopnet report
RUN_DIR`` can rebuild it at any time without re-running anything.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

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


def _table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return [*lines, ""]


def _setting(row: dict) -> str:
    return (f"h={row['n_delays']}, rank={row['rank']} (→{row['rank_resolved']}), "
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
        rows.append([f"best hybrid (layer {best['layer']}, {_setting(best)})",
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
    lines = ["## Selected Koopman hybrid", "",
             f"Layer {selected['layer']}, {_setting(selected)}: "
             f"{selected['linear_steps']} linear steps, {selected['nonlinear_blocks']} "
             f"inserted nonlinear blocks still run. Validation "
             f"{_pct(selected['val_accuracy'])}%, **test {_pct(selected['test_accuracy'])}%**"
             f"{held}.", ""]
    header = ["layer", "setting", "linear steps", "val %", "test %"]
    rows = [[r["layer"], _setting(r), r["linear_steps"], _pct(r["val_accuracy"]),
             _pct(r["test_accuracy"])] for r in results.get("selected_per_layer", [])]
    return [*lines, "Best row per layer (chosen on validation):", "", *_table(header, rows)]


def _delays_section(results: dict) -> list[str]:
    lines = ["## Hybrid accuracy by number of delays", "",
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
    return lines


# --- study sections (koopnet study): rendered only when results.json has the study keys ---

STUDY_FIGURES = {
    "accuracy_vs_linear_steps": "Hybrid test accuracy (mean ± sd over seeds) against the number "
                                "of trajectory steps predicted linearly; horizontal lines: "
                                "ridge, original network, softmax floor.",
    "eigenvalue_grid": "DMD eigenvalues (paper's concatenated series, full rank) for M "
                       "trajectories x h delays; colour = ResDMD residual on held-out pairs.",
    "hankel_rsv": "Top 7 right singular vectors of the Hankel matrix for 1, 10 and 50 stacked "
                  "copies (paper-method section 8).",
    "singular_values": "Singular value decay of the lifted snapshot matrix per dictionary.",
    "modes": "Koopman modes of the selected delay DMD mapped back to the neurons.",
    "decision_boundaries": "Decision boundaries: original, scaled, selected hybrid.",
}


def _mean_sd(values) -> str:
    values = [100 * v for v in values if v is not None]
    if not values:
        return "–"
    mean = sum(values) / len(values)
    if len(values) == 1:
        return f"{mean:.2f}"
    sd = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5
    return f"{mean:.2f} ± {sd:.2f}"


def _mean(values) -> float:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else float("nan")


def _group(rows: list[dict], *keys: str) -> dict[tuple, list[dict]]:
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        groups[tuple(row.get(k) for k in keys)].append(row)
    return groups


def _fmt_count(values) -> str:
    values = sorted({v for v in values if v is not None})
    return "–" if not values else "/".join(str(v) for v in values)


def render_study(results: dict) -> list[str]:
    """Sections for the comparison, baselines, ablations and seeds; [] without a study."""
    if "comparison" not in results:
        return []
    seeds = results.get("seeds", {}).get("seeds", [results.get("seed")])
    comparison, baselines = results["comparison"], results.get("baselines", [])
    n = len(seeds)
    lines = [f"## Observables and baselines ({n} seed{'s' if n > 1 else ''}: {seeds})", "",
             "Every number is the mean ± sd over seeds of the row chosen on validation (rank "
             "and Tikhonov value per observable and h; lambda for the baselines). h = inserted "
             "nonlinear blocks still run; linear steps = 11 − h. `identity` is plain DMD on the "
             "states from s_h on (no delays); `delay` stacks s_h..s_0. Test accuracy in %.", ""]
    observables = list(dict.fromkeys(r["observable"] for r in comparison))
    cells = _group(comparison, "layer", "observable", "n_delays")
    base_groups = _group(baselines, "layer", "method")
    for layer in sorted({r["layer"] for r in comparison}):
        header = ["h", "linear steps", *observables, "best"]
        rows = []
        for h in sorted({r["n_delays"] for r in comparison if r["layer"] == layer}):
            means = {o: _mean([r["test_accuracy"] for r in cells.get((layer, o, h), [])])
                     for o in observables}
            valid = {o: m for o, m in means.items() if m == m}
            winner = max(valid, key=valid.get) if valid else "–"
            steps = _fmt_count(r["linear_steps"] for r in cells.get((layer, "delay", h), []))
            rows.append([h, steps, *[_mean_sd([r["test_accuracy"] for r in
                                               cells.get((layer, o, h), [])])
                                     for o in observables], winner])
        lines += [f"**Layer {layer}: hybrid test accuracy (%)**", "", *_table(header, rows)]
        header = ["baseline (replaces the layer directly)", "parameters", "val %", "test %"]
        rows = [[method, _fmt_count(r["parameters"] for r in group),
                 _mean_sd([r["val_accuracy"] for r in group]),
                 _mean_sd([r["test_accuracy"] for r in group])]
                for (lay, method), group in base_groups.items() if lay == layer]
        lines += _table(header, rows)
    rows = [[method, _fmt_count(r["parameters"] for r in group),
             _mean_sd([r["val_accuracy"] for r in group]),
             _mean_sd([r["test_accuracy"] for r in group])]
            for (lay, method), group in base_groups.items() if lay is None]
    if rows:
        lines += ["**Whole-model references**", "",
                  *_table(["model", "parameters", "val %", "test %"], rows)]
    lines += _verdict(comparison, baselines)
    lines += _linear_steps_table(comparison)
    lines += _ablation_tables(results.get("ablations", []))
    lines += _study_figures(results)
    timings = results.get("seeds", {}).get("timings_s")
    if timings:
        lines += ["Study time per seed (s): " + ", ".join(f"{k} {v}" for k, v in
                                                           timings.items()), ""]
    return lines


def _verdict(comparison: list[dict], baselines: list[dict]) -> list[str]:
    """Plain statements of who wins, computed from the mean test accuracies."""
    lines = ["### Which method wins where", ""]
    for layer in sorted({r["layer"] for r in comparison}):
        rows = [r for r in comparison if r["layer"] == layer]
        means = {(o, h): _mean([r["test_accuracy"] for r in group])
                 for (o, h), group in _group(rows, "observable", "n_delays").items()}
        (o_best, h_best), best = max(means.items(), key=lambda kv: kv[1])
        delay = {h: m for (o, h), m in means.items() if o == "delay"}
        h_delay = max(delay, key=delay.get)
        ridge = _mean([b["test_accuracy"] for b in baselines
                       if b["layer"] == layer and b["method"] == "ridge"])
        beaten = [h for h, m in delay.items() if m < ridge]
        wins = sorted({o for (o, h), m in means.items()
                       if m == max(v for (o2, h2), v in means.items() if h2 == h)})
        lines.append(
            f"- Layer {layer}: best hybrid is **{o_best}** at h={h_best} "
            f"({100 * best:.2f}%); best delay DMD {100 * delay[h_delay]:.2f}% at h={h_delay}; "
            f"ridge replacing the layer {100 * ridge:.2f}%. Ridge beats delay DMD at "
            f"{len(beaten)} of {len(delay)} values of h"
            + (f" (h = {', '.join(map(str, sorted(beaten)))})" if beaten else "")
            + f". Observables that win at least one h: {', '.join(wins)}.")
    return [*lines, ""]


def _linear_steps_table(comparison: list[dict]) -> list[str]:
    header = ["layer", "observable", "h", "linear steps", "nonlinear blocks",
              "replacement parameters", "rank", "val %", "test %"]
    rows = []
    for (layer, o, h), group in sorted(_group(comparison, "layer", "observable",
                                              "n_delays").items(), key=lambda kv: (
            kv[0][0], kv[0][1], -kv[0][2])):
        rows.append([layer, o, h, _fmt_count(r["linear_steps"] for r in group),
                     _fmt_count(r["nonlinear_blocks"] for r in group),
                     _fmt_count(r["replacement_parameters"] for r in group),
                     _fmt_count(r["rank_resolved"] for r in group),
                     _mean_sd([r["val_accuracy"] for r in group]),
                     _mean_sd([r["test_accuracy"] for r in group])])
    return ["## Accuracy against linear steps", "",
            "Parameters of the replacement = entries of the applied map [w', D]; ranks listed "
            "over seeds.", "", *_table(header, rows)]


def _ablation_tables(ablations: list[dict]) -> list[str]:
    if not ablations:
        return []
    lines = ["## Ablations", "",
             "Delay DMD; h (and rank/Tikhonov where the row says so) chosen on validation.", ""]
    for group in dict.fromkeys(r["group"] for r in ablations):
        rows = []
        for (layer, variant), items in _group([r for r in ablations if r["group"] == group],
                                              "layer", "variant").items():
            failed = sum(1 for r in items if r.get("scaling_ok") is False)
            rows.append([layer, variant, _fmt_count(r["n_delays"] for r in items),
                         _mean_sd([r["val_accuracy"] for r in items]),
                         _mean_sd([r["test_accuracy"] for r in items]),
                         failed if "scaling_ok" in items[0] else "–"])
        lines += [f"**{group}**", "", *_table(["layer", "variant", "h chosen", "val %",
                                               "test %", "scaling failed"], rows)]
    return lines


def _study_figures(results: dict) -> list[str]:
    names = results.get("study", {}).get("figures", [])
    if not names:
        return []
    lines = ["## Study figures", "",
             "Drawn by `koopnet study` from results.json and spectra.safetensors "
             "(`python -c \"from koopnet.lab.spectra import make_figures; "
             "make_figures('RUN_DIR')\"` "
             "redraws them).", ""]
    for name in names:
        stem = Path(name).stem
        caption = next((text for key, text in STUDY_FIGURES.items() if stem.startswith(key)),
                       "")
        lines += [f"![{stem}]({Path(name).name})", "", f"*{stem}*: {caption}", ""]
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
