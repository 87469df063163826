"""Figures from fitted objects. Every function takes an optional Axes and returns the Figure.

The Agg backend is selected on import, so no display is needed; nothing calls ``plt.show``.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import torch


def _axes(ax, figsize=(4.5, 4.5)):
    if ax is None:
        fig, ax = plt.subplots(figsize=figsize)
        return fig, ax
    return ax.figure, ax


def plot_eigenvalues(eigenvalues: torch.Tensor, ax=None, *, title: str = "",
                     residuals: torch.Tensor | None = None, min_modulus: float = 0.0):
    """DMD eigenvalues in the complex plane against the unit circle (paper-method section 8).

    ``residuals`` (one per eigenvalue) colours the points, so spurious eigenvalues stand out.
    """
    fig, ax = _axes(ax)
    lam = eigenvalues.detach().cpu().numpy()
    keep = np.abs(lam) >= min_modulus
    theta = np.linspace(0, 2 * np.pi, 400)
    ax.plot(np.cos(theta), np.sin(theta), "k--", lw=0.8, label="unit circle")
    if residuals is None:
        ax.scatter(lam.real[keep], lam.imag[keep], s=14, c="tab:blue", label="eigenvalues")
    else:
        res = residuals.detach().cpu().numpy()[keep]
        points = ax.scatter(lam.real[keep], lam.imag[keep], s=14, c=res, cmap="viridis_r",
                            vmin=0, vmax=max(1e-12, float(np.nanmax(res))) if len(res) else 1)
        fig.colorbar(points, ax=ax, label="residual")
    limit = max(1.2, float(np.abs(lam[keep]).max()) * 1.1) if keep.any() else 1.2
    limit = min(limit, 2.0)
    ax.set(xlim=(-limit, limit), ylim=(-limit, limit), xlabel="Re(λ)", ylabel="Im(λ)",
           aspect="equal", title=title)
    ax.axhline(0, color="0.85", lw=0.5, zorder=0)
    ax.axvline(0, color="0.85", lw=0.5, zorder=0)
    return fig


def save_figure(fig, path, *, pdf: bool = False) -> list[str]:
    """Save as PNG (and PDF), atomically, then close the figure. Returns the written paths."""
    from pathlib import Path

    from koopnet.artifacts import atomic_write_bytes

    path = Path(path)
    written = []
    for suffix in (".png", ".pdf") if pdf else (".png",):
        import io

        buffer = io.BytesIO()
        fig.savefig(buffer, format=suffix[1:], dpi=150, bbox_inches="tight")
        atomic_write_bytes(path.with_suffix(suffix), buffer.getvalue())
        written.append(str(path.with_suffix(suffix)))
    plt.close(fig)
    return written
