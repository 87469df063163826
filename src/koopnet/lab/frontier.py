"""The frontier: how much of a layer runs linearly before accuracy is lost.

For every layer and number of linear steps, the row chosen on validation among every method and
setting at that step count (per seed), its test accuracy (mean over seeds) and its drop from the
original network. The *linear depth at 0.5 point* of a layer is the largest number of linear
steps whose validation-chosen row keeps the mean test accuracy within 0.5 point of the original.
Computed from the rows of results.json alone, so it can be recomputed from the file.
"""

from __future__ import annotations

from collections import defaultdict

TOLERANCE = 0.005


def _choose(rows: list[dict]) -> dict:
    """Best validation accuracy; ties to the cheaper replacement (fewer parameters)."""
    return max(rows, key=lambda r: (r["val_accuracy"], -r.get("replacement_parameters", 0)))


def has_linear_step(row: dict) -> bool:
    """False for a row whose learned encoder costs as many blocks as it rolls out: it claims
    no linear step, so frontiers and figures leave it out."""
    return row["linear_steps"] >= 1


def frontier(rows: list[dict], originals: dict, tolerance: float = TOLERANCE) -> list[dict]:
    """One entry per (layer, linear steps): methods chosen, mean test accuracy, drop, within.

    ``rows`` need layer, linear_steps, val_accuracy, test_accuracy (and seed when several
    seeds); ``originals`` maps seed -> the original network's test accuracy. Rows without a
    linear step (a learned encoder that costs the whole roll-out) are left out.
    """
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        if has_linear_step(row):
            groups[(row["layer"], row["linear_steps"], row.get("seed"))].append(row)
    chosen: dict[tuple, list[dict]] = defaultdict(list)
    for (layer, steps, _), group in groups.items():
        chosen[(layer, steps)].append(_choose(group))
    original = sum(originals.values()) / len(originals)
    out = []
    for (layer, steps), picks in sorted(chosen.items()):
        test = sum(r["test_accuracy"] for r in picks) / len(picks)
        entry = {"layer": layer, "linear_steps": steps, "test_accuracy": test,
                 "drop": original - test, "within": original - test <= tolerance,
                 "methods": sorted({r.get("observable", "delay") for r in picks}),
                 "seeds": len(picks)}
        if all("test_state_errors" in r for r in picks):  # study rows: mean over the seeds' picks
            errors = zip(*(r["test_state_errors"] for r in picks), strict=True)
            entry["test_state_errors"] = [sum(e) / len(picks) for e in errors]
            entry["spectral_radius"] = sum(r["spectral_radius"] for r in picks) / len(picks)
        out.append(entry)
    return out


def linear_depth(entries: list[dict]) -> dict[int, int | None]:
    """Per layer, the largest number of linear steps still within the tolerance (None: none)."""
    depth: dict[int, int | None] = {}
    for entry in entries:
        best = depth.get(entry["layer"])
        if entry["within"] and (best is None or entry["linear_steps"] > best):
            depth[entry["layer"]] = entry["linear_steps"]
        else:
            depth.setdefault(entry["layer"], None)
    return depth


def frontier_section(results: dict) -> list[str]:
    """Markdown: the frontier table and the linear depth of each layer."""
    if "comparison" in results:
        rows = results["comparison"]
        originals = {run["seed"]: run["original"]["test_accuracy"]
                     for run in results["seeds"]["runs"]}
    elif results.get("sweep"):
        rows, originals = results["sweep"], {None: results["original"]["test_accuracy"]}
    else:
        return []
    entries = frontier(rows, originals)
    errors = all("test_state_errors" in e for e in entries)
    lines = ["## Frontier: accuracy against linear steps", "",
             "At each number of linear steps, the row chosen on validation among every method "
             "and setting (per seed); test accuracy mean over seeds; drop from the original "
             "network in points."
             + (" max |lambda|: the chosen K's spectral radius; state errors: the held-out "
                "(test) relative error ||S_hat_t - S_t|| / ||S_t|| of every state the roll-out "
                "predicts, first to last (the last is the replaced layer's output); both mean "
                "over seeds." if errors else ""), "",
             "| layer | linear steps | chosen | test % | drop | within 0.5 |"
             + (" max abs lambda | state errors |" if errors else ""),
             "|---|---|---|---|---|---|" + ("---|---|" if errors else "")]
    for e in entries:
        extra = (f" {e['spectral_radius']:.3f} | "
                 + " ".join(f"{x:.2g}" for x in e["test_state_errors"]) + " |") if errors else ""
        lines.append(f"| {e['layer']} | {e['linear_steps']} | {', '.join(e['methods'])} | "
                     f"{100 * e['test_accuracy']:.2f} | {100 * e['drop']:+.2f} | "
                     f"{'yes' if e['within'] else 'no'} |" + extra)
    depth = linear_depth(entries)
    lines += ["", "**Linear depth at 0.5 point** (largest number of linear steps within 0.5 "
              "point of the original): " + "; ".join(
                  f"layer {layer}: {d if d is not None else 'none'}"
                  for layer, d in sorted(depth.items())) + ".", ""]
    return lines
