"""A run folder's human-readable part: the eigenvalue figure and report.md beside results.json.

:func:`write_run` fills a folder (the caller stages it with
:func:`koopnet.io.artifacts.staged_folder`, so a run appears whole or not at all).
"""

from __future__ import annotations

import json
from pathlib import Path

from koopnet.io.artifacts import atomic_write_text, write_json
from koopnet.lab.report import render_report

__all__ = ["write_run"]


def write_run(out: Path, results: dict, figures: dict, *, pdf: bool = False) -> list[str]:
    """results.json first, then the figures, then report.md (which links them)."""
    write_json(out / "results.json", results)
    results = json.loads((out / "results.json").read_text())  # render exactly what was saved
    written = []
    layers = figures.get("layers", {})
    if layers:
        import matplotlib.pyplot as plt

        from koopnet.lab.figures import plot_eigenvalues, save_figure

        fig, axes = plt.subplots(1, len(layers), figsize=(4.4 * len(layers), 4.6), squeeze=False,
                                 layout="constrained")
        for ax, (layer, info) in zip(axes[0], layers.items(), strict=True):
            best, dmd = info["best"], info["fit"][0]
            plot_eigenvalues(dmd.eigenvalues_, ax, title=(
                f"{results['dataset']} layer {layer}: h={best['n_delays']}, "
                f"rank {best['rank_resolved']}"))
        fig.suptitle(f"DMD eigenvalues of the selected operators ({results['protocol']} "
                     "protocol)")
        written += save_figure(fig, out / "eigenvalues", pdf=pdf)
    atomic_write_text(out / "report.md", render_report(results, written))
    return written
