"""The study's sections of report.md (``koopnet study``): observables against baselines,
ablations, seeds and figures; rendered only when results.json has the study keys."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from koopnet.lab.markdown import table as _table

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


