"""Figures from fitted objects. Every function takes an optional Axes and returns the Figure.

Nothing here calls ``plt.show`` or chooses a backend: importing this module leaves the user's
matplotlib settings alone (the command line selects the headless Agg backend itself).
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import torch

from koopnet.lab.frontier import has_linear_step


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

    from koopnet.io.artifacts import atomic_write_bytes

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


def _grid(axes, n_rows: int, n_cols: int, panel=(3.6, 3.4)):
    """A 2-D array of axes: the given one, or a new figure of ``n_rows x n_cols`` panels."""
    if axes is None:
        fig, axes = plt.subplots(n_rows, n_cols, squeeze=False, layout="constrained",
                                 figsize=(panel[0] * n_cols, panel[1] * n_rows))
        return fig, axes
    axes = np.asarray(axes, dtype=object).reshape(n_rows, n_cols)
    return axes[0, 0].figure, axes


def _label_key(key: str) -> tuple[int, int]:
    """'M50_h10' -> (50, 10)."""
    m, h = key.split("_")
    return int(m[1:]), int(h[1:])


def plot_eigenvalue_grid(eigenvalues: dict, residuals: dict | None = None, axes=None, *,
                         title: str = "", max_residual: float = 1.0):
    """Eigenvalues for a grid of (trajectories M, delays h), keys 'M{m}_h{h}' (paper-method 8).

    Rows are M, columns h; colour is the ResDMD residual clipped at ``max_residual`` (dark =
    trustworthy eigenpair, yellow = spurious).
    """
    keys = sorted(eigenvalues, key=_label_key)
    ms = sorted({_label_key(k)[0] for k in keys})
    hs = sorted({_label_key(k)[1] for k in keys})
    fig, axes = _grid(axes, len(ms), len(hs))
    theta = np.linspace(0, 2 * np.pi, 400)
    points = None
    for key in keys:
        m, h = _label_key(key)
        ax = axes[ms.index(m), hs.index(h)]
        lam = eigenvalues[key].detach().cpu().numpy()
        ax.plot(np.cos(theta), np.sin(theta), "k--", lw=0.8)
        if residuals is None:
            ax.scatter(lam.real, lam.imag, s=8, c="tab:blue")
        else:
            colour = np.clip(residuals[key].detach().cpu().numpy(), 0, max_residual)
            points = ax.scatter(lam.real, lam.imag, s=8, c=colour, cmap="viridis", vmin=0,
                                vmax=max_residual)
        limit = min(2.0, max(1.2, 1.1 * float(np.abs(lam).max())))
        ax.set(xlim=(-limit, limit), ylim=(-limit, limit), aspect="equal", xlabel="Re(λ)",
               ylabel="Im(λ)", title=f"M={m}, h={h}, rank {len(lam)}")
    if residuals is not None and points is not None:
        fig.colorbar(points, ax=axes, shrink=0.8, label=f"ResDMD residual (clipped at "
                                                          f"{max_residual:g})")
    fig.suptitle(title)
    return fig


def plot_right_singular_vectors(vectors: dict, axes=None, *, title: str = "",
                                trajectory_length: int = 12):
    """Top right singular vectors of Hankel matrices, one panel per number of stacked delays.

    ``vectors[d]`` is [k, n] (rows of Vh); each row is divided by its largest |value|, as the
    paper's notebook does. Dotted lines mark trajectory boundaries of the concatenated series.
    """
    stacks = sorted(vectors)
    fig, axes = _grid(axes, len(stacks), 1, panel=(9, 2.4))
    for ax, d in zip(axes[:, 0], stacks, strict=True):
        V = vectors[d].detach().cpu().numpy()
        for i, row in enumerate(V):
            ax.plot(row / max(np.abs(row).max(), 1e-300), lw=1, label=f"v{i + 1}")
        for boundary in range(trajectory_length, V.shape[1], trajectory_length):
            ax.axvline(boundary - 0.5, color="0.7", ls=":", lw=0.8)
        ax.set(ylim=(-1.05, 1.05), ylabel="v / max|v|",
               xlabel="column of the Hankel matrix (snapshot index)",
               title=f"{d} stacked cop{'y' if d == 1 else 'ies'} (h={d - 1})")
    axes[0, 0].legend(ncol=7, fontsize=7, loc="upper right")
    fig.suptitle(title)
    return fig


def plot_singular_value_decay(singular_values: dict, ax=None, *, title: str = ""):
    """Normalised singular values s_i / s_1 of lifted snapshot matrices, one line each."""
    fig, ax = _axes(ax, figsize=(6, 4.2))
    for name, s in singular_values.items():
        s = s.detach().cpu().numpy()
        ax.semilogy(np.arange(1, len(s) + 1), np.maximum(s, 1e-17), lw=1.2, label=name,
                    marker="o" if len(s) < 30 else None, ms=3)  # short spectra stay visible
    ax.set(xlabel="index i", ylabel="s_i / s_1", title=title)
    ax.legend(fontsize=8)
    return fig


def plot_modes_on_neurons(modes: torch.Tensor, eigenvalues: torch.Tensor,
                          residuals: torch.Tensor | None = None, ax=None, *, title: str = "",
                          n_modes: int = 16):
    """|Koopman mode| on each neuron of the newest state, for the ``n_modes`` eigenvalues of
    largest modulus; each column is divided by its largest entry. Shape: modes [W, R]."""
    fig, ax = _axes(ax, figsize=(min(14, 1 + 0.7 * n_modes), 4.5))
    lam = eigenvalues.detach().cpu().numpy()
    order = np.argsort(-np.abs(lam))[:n_modes]
    M = np.abs(modes.detach().cpu().numpy()[:, order])
    M = M / np.maximum(M.max(axis=0, keepdims=True), 1e-300)
    image = ax.imshow(M, aspect="auto", cmap="magma", vmin=0, vmax=1)
    labels = [f"{abs(lam[i]):.2f}∠{np.degrees(np.angle(lam[i])):.0f}°" for i in order]
    if residuals is not None:
        res = residuals.detach().cpu().numpy()
        labels = [f"{text}\nr={res[i]:.2f}" for text, i in zip(labels, order, strict=True)]
    ax.set_xticks(range(len(order)), labels, fontsize=7, rotation=90)
    ax.set_yticks(range(M.shape[0]))
    ax.set(xlabel="eigenvalue |λ|∠arg (r = ResDMD residual)", ylabel="neuron", title=title)
    fig.colorbar(image, ax=ax, label="|mode| / max")
    return fig


def _mean_sd(values: list[float]) -> tuple[float, float]:
    values = np.asarray([v for v in values if v is not None], dtype=float)
    if not len(values):
        return float("nan"), float("nan")
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def plot_accuracy_vs_linear_steps(comparison: list[dict], baselines: list[dict] | None = None,
                                  axes=None, *, title: str = "", metric: str = "test_accuracy"):
    """Hybrid accuracy (mean ± sd over seeds) against the number of linearly predicted steps,
    one panel per layer and one line per observable; baselines as horizontal lines. A row
    whose encoder costs as many blocks as it rolls out (no linear step left) is not drawn."""
    layers = sorted({r["layer"] for r in comparison})
    fig, axes = _grid(axes, 1, len(layers), panel=(4.6, 4.0))
    for ax, layer in zip(axes[0], layers, strict=True):
        rows = [r for r in comparison if r["layer"] == layer and has_linear_step(r)]
        for name in dict.fromkeys(r["observable"] for r in rows):
            steps = sorted({r["linear_steps"] for r in rows if r["observable"] == name})
            stats = [_mean_sd([100 * r[metric] for r in rows if r["observable"] == name
                               and r["linear_steps"] == s]) for s in steps]
            ax.errorbar(steps, [m for m, _ in stats], yerr=[s for _, s in stats], marker="o",
                        ms=3, capsize=2, lw=1.2, label=name)
        styles = {"ridge": ("tab:gray", "--"), "original network": ("k", ":"),
                  "softmax regression on inputs": ("tab:red", "-.")}
        for method, (colour, ls) in styles.items():
            values = [100 * b[metric] for b in baselines or []
                      if b["method"] == method and b["layer"] in (layer, None)]
            if values:
                ax.axhline(_mean_sd(values)[0], color=colour, ls=ls, lw=1, label=method)
        ax.set(xlabel="linear steps (11 − h − encoder blocks)",
               ylabel=f"{metric.replace('_', ' ')} (%)", title=f"layer {layer}")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=4, fontsize=8)
    fig.suptitle(title)
    return fig


def plot_accuracy_vs_replaced_blocks(summary: list[dict], original: list[dict] | None = None,
                                     ax=None, *, title: str = "", metric: str = "test"):
    """Accuracy (mean ± sd over seeds, %) against the number of replaced last blocks, one line
    per method; the original network as a dotted horizontal line.

    ``summary`` rows hold span, method, ``{metric}_mean`` and ``{metric}_sd`` (see
    :func:`koopnet.lab.residual_run.summarize`); ``original`` rows hold ``test_accuracy``.
    """
    fig, ax = _axes(ax, figsize=(5.2, 4.2))
    for method in dict.fromkeys(r["method"] for r in summary):
        rows = sorted((r for r in summary if r["method"] == method), key=lambda r: r["span"])
        ax.errorbar([r["span"] for r in rows], [r[f"{metric}_mean"] for r in rows],
                    yerr=[r[f"{metric}_sd"] for r in rows], marker="o", ms=4, capsize=2,
                    lw=1.3, label=method)
    if original:
        mean = _mean_sd([100 * o[f"{metric}_accuracy"] for o in original])[0]
        ax.axhline(mean, color="k", ls=":", lw=1, label="original network")
    spans = sorted({r["span"] for r in summary})
    ax.set_xticks(spans)
    ax.set(xlabel="replaced last blocks", ylabel=f"{metric} accuracy (%)", title=title)
    ax.legend(fontsize=8)
    return fig


def plot_decision_boundaries(axis: torch.Tensor, predictions: dict, X=None, y=None, axes=None,
                             *, title: str = "", n_points: int = 600):
    """Predicted class on a square grid of inputs, one panel per model, test points on top.

    Shape: axis [n] (grid coordinates, both axes), predictions[name] [n, n] (row = y index).
    """
    fig, axes = _grid(axes, 1, len(predictions), panel=(4.0, 4.0))
    a = axis.detach().cpu().numpy()
    for ax, (name, classes) in zip(axes[0], predictions.items(), strict=True):
        ax.imshow(classes.detach().cpu().numpy(), origin="lower", cmap="coolwarm", alpha=0.45,
                  extent=(a[0], a[-1], a[0], a[-1]), vmin=0, vmax=1, interpolation="nearest")
        if X is not None:
            Xn, yn = X[:n_points].cpu().numpy(), y[:n_points].cpu().numpy()
            ax.scatter(Xn[:, 0], Xn[:, 1], c=yn, cmap="coolwarm", s=4, vmin=0, vmax=1)
        ax.set(xlabel="x₁", ylabel="x₂", title=name, aspect="equal")
    fig.suptitle(title)
    return fig


def plot_mode_attribution(attribution: dict, ax=None, *, title: str = "", top: int = 8,
                          class_names: list[str] | None = None):
    """Modes ranked per class by how much removing them lowers that class's mean logit.

    ``attribution`` is :func:`koopnet.editing.mode_attribution`'s dict; one group of bars per
    class, its ``top`` modes (a conjugate pair counted once) in decreasing order, each bar
    labelled with the eigenvalue (and ResDMD residual r where known).
    """
    drop = attribution["logit_drop"].detach().cpu().numpy()  # [R, C]
    lam = attribution["eigenvalues"].detach().cpu().numpy()
    res = attribution["residual"].detach().cpu().numpy()
    group = attribution["group"].detach().cpu().numpy()
    firsts = np.unique(group)
    n_classes = drop.shape[1]
    names = class_names or [f"class {c}" for c in range(n_classes)]
    fig, ax = _axes(ax, figsize=(min(14, 2 + 1.6 * n_classes * min(top, len(firsts)) / 2), 4.5))
    position, ticks, labels = 0, [], []
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for c in range(n_classes):
        order = firsts[np.argsort(-drop[firsts, c])][:top]
        xs = np.arange(position, position + len(order))
        ax.bar(xs, drop[order, c], color=colours[c % len(colours)], label=names[c])
        for x, i in zip(xs, order, strict=True):
            text = f"#{i} {abs(lam[i]):.2f}∠{np.degrees(abs(np.angle(lam[i]))):.0f}°"
            labels.append(text if np.isnan(res[i]) else f"{text}\nr={res[i]:.2f}")
            ticks.append(x)
        position += len(order) + 1
    ax.set_xticks(ticks, labels, fontsize=7, rotation=90)
    ax.axhline(0, color="0.6", lw=0.6)
    ax.set(xlabel="mode |λ|∠arg (r = ResDMD residual)",
           ylabel="drop of the class's mean logit when removed", title=title)
    ax.legend(fontsize=8)
    return fig
