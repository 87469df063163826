"""Spectral diagnostics of fitted operators, and the tensors behind the study's figures.

``resdmd_residuals`` (Colbrook and Townsend 2024, "Rigorous data-driven computation of spectral
properties of Koopman operators"): for an eigenpair (lambda, w) with eigenfunction phi = w^T g,
the relative residual ||Y w - lambda X w|| / ||X w|| on held-out pairs, computed from Gram
matrices; a large residual flags a spurious eigenvalue. ``hankel_right_singular_vectors`` and
``singular_value_decay`` give the paper's SVD evidence. ``save_spectra`` stores what the study
computed and ``make_figures`` redraws every study figure from the run folder alone.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from koopnet._checks import as_tensor, check_int
from koopnet.dmd import DMD, PairStatistics
from koopnet.io.artifacts import load_artifact, save_artifact
from koopnet.lab.protocols import select


def left_eigenvectors(dmd: DMD) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues and the eigenfunction coefficients w (phi(g) = w^T g) of a fitted DMD.

    w = V u with u a left eigenvector of the reduced operator, so w^T V A~ V^T = lambda w^T.
    Shape: eigenvalues [R], W [D, R] (complex).
    """
    eigenvalues, right = torch.linalg.eig(dmd.operator_)  # [R], [R, R]
    left = torch.linalg.inv(right)  # row i: left eigenvector of eigenvalue i
    return eigenvalues, dmd.basis_.to(left.dtype) @ left.T  # [D, R]


def resdmd_residuals(dmd: DMD, stats: PairStatistics) -> torch.Tensor:
    """Relative residual ||Y w - lambda X w|| / ||X w|| of every eigenpair on the pairs in
    ``stats`` (held-out pairs, so a mode fitted to noise cannot score well).

    residual^2 = (w* G_yy w - 2 Re(lambda w* G_yx w) + |lambda|^2 w* G_xx w) / (w* G_xx w), with
    G_xx = X^T X, G_yx = Y^T X, G_yy = Y^T Y. Shape: [R], in the order of ``dmd.eigenvalues_``.
    """
    if stats.xx.shape[0] != dmd.n_features_in_:
        raise ValueError(f"stats have D={stats.xx.shape[0]}; this DMD was fitted on "
                         f"D={dmd.n_features_in_}. Lift the held-out pairs the same way.")
    eigenvalues, W = left_eigenvectors(dmd)  # same LAPACK call as dmd.eigenvalues_: same order

    def quad(G: torch.Tensor) -> torch.Tensor:  # w_i^* G w_i for every column, [R]
        return (W.conj() * (G.to(W.dtype) @ W)).sum(0)

    xx, yx, yy = quad(stats.xx).real, quad(stats.yx), quad(stats.yy).real
    numerator = yy - 2 * (eigenvalues * yx).real + eigenvalues.abs() ** 2 * xx
    return (numerator.clamp_min(0) / xx.clamp_min(torch.finfo(xx.dtype).tiny)).sqrt()


def hankel_right_singular_vectors(series: torch.Tensor, n_stacked: int, k: int = 7
                                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Top right singular vectors of the Hankel matrix of one series (paper-method section 8).

    ``n_stacked`` = d shifted copies stacked (d = 1: no delay), so H is [W d, n - d + 1]; its
    right singular vectors are time signals. Shape: series [n, W] -> (singular values [min],
    Vh[:k] [k, n - d + 1]).
    """
    series = as_tensor(series, "series", ndim=2, dtype=torch.float64)
    d = check_int(n_stacked, "n_stacked", low=1, high=len(series))
    columns = len(series) - d + 1
    hankel = torch.cat([series[j:j + columns].T for j in range(d)])  # [W d, n - d + 1]
    _, s, Vh = torch.linalg.svd(hankel, full_matrices=False)
    return s, Vh[:k]


def singular_value_decay(lifted: torch.Tensor) -> torch.Tensor:
    """Singular values of the lifted snapshot matrix (rows g_t), divided by the largest.

    Shape: lifted [B, T', D] or [n, D] -> [min(n, D)].
    """
    lifted = torch.as_tensor(lifted, dtype=torch.float64)
    s = torch.linalg.svdvals(lifted.reshape(-1, lifted.shape[-1]))  # [min(n, D)]
    return s / s[0]


def save_spectra(out: Path, tensors: dict[str, torch.Tensor]) -> str:
    clean = {k: v.detach().to("cpu", torch.float64 if v.is_floating_point() else v.dtype)
             .contiguous()
             for k, v in tensors.items()}
    return str(save_artifact(out, "spectra", clean, {"keys": sorted(clean)}, kind="spectra"))


def _sv_label(name: str) -> str:
    """Spectra keys name the dictionary; those without an h were lifted with h=10."""
    if name == "identity":
        return "identity (h=0)"
    return name if "h=" in name else f"{name} h=10"


def make_figures(run_dir, *, pdf: bool = False) -> list[str]:
    """Draw every study figure from ``results.json`` and ``spectra.safetensors`` in ``run_dir``."""
    from koopnet.lab import figures as plots

    run = Path(run_dir)
    results = json.loads((run / "results.json").read_text())
    tensors, _ = load_artifact(run, "spectra", kind="spectra")
    dataset, written = results["dataset"], []
    layers = sorted({int(k.split("/")[0][5:]) for k in tensors if k.startswith("layer")})
    for layer in layers:
        for name, fig in _layer_figures(results, tensors, layer):
            written += plots.save_figure(fig, run / f"{name}_layer{layer}", pdf=pdf)
    fig = plots.plot_accuracy_vs_linear_steps(results["comparison"], results["baselines"],
                                              title=f"{dataset}: hybrid test accuracy vs "
                                                    "linearly predicted steps, h = 0..10 "
                                                    "(rank, Tikhonov chosen on validation; "
                                                    "mean ± sd over seeds; psi counted as "
                                                    "the blocks it costs)")
    written += plots.save_figure(fig, run / "accuracy_vs_linear_steps", pdf=pdf)
    if "grid/original" in tensors:
        setting = results["study"]["decision_setting"]
        layer = results["study"]["decision_layer"]
        scaled = next(r for r in results["scaled"] if r["layer"] == layer)
        accuracies = {"original": results["original"]["test_accuracy"],
                      "scaled": scaled["test_accuracy"],
                      "hybrid": results["selected"]["test_accuracy"]}
        fig = plots.plot_decision_boundaries(
            tensors["grid/axis"], {f"{k} (test {100 * v:.2f}%)": tensors[f"grid/{k}"]
                                   for k, v in accuracies.items()},
            tensors["grid/test_X"], tensors["grid/test_y"],
            title=(f"{dataset} decision boundaries: layer {layer}"
                   f", hybrid h={setting['n_delays']}, rank={setting['rank']}"))
        written += plots.save_figure(fig, run / "decision_boundaries", pdf=pdf)
    return written


def _layer_figures(results: dict, tensors: dict, layer: int):
    """(file stem, Figure) of each per-layer study figure."""
    from koopnet.lab import figures as plots

    dataset, prefix = results["dataset"], f"layer{layer}/"

    def part(kind: str, skip: int) -> dict:
        return {key[len(prefix) + skip:]: v for key, v in tensors.items()
                if key.startswith(prefix + kind)}

    eig = {k: torch.view_as_complex(v) for k, v in part("eig/", 4).items()}
    yield "eigenvalue_grid", plots.plot_eigenvalue_grid(eig, part("res/", 4), title=(
        f"{dataset} layer {layer}: DMD eigenvalues, concatenated series, full rank "
        "(colour: ResDMD residual on held-out pairs)"))
    rsv = {int(key.removeprefix("d")): v for key, v in part("rsv/", 4).items()}
    yield "hankel_rsv", plots.plot_right_singular_vectors(rsv, title=(
        f"{dataset} layer {layer}: top 7 right singular vectors of the Hankel matrix "
        f"({max(results['study']['config']['eig_trajectories'])} trajectories, "
        "first 5 shown)"))
    sv = dict(sorted({_sv_label(k): v for k, v in part("sv/", 3).items()}.items()))
    yield "singular_values", plots.plot_singular_value_decay(sv, title=(
        f"{dataset} layer {layer}: singular values of the lifted snapshot matrix X "
        "(training pairs)"))
    best = select([r for r in results["comparison"] if r["layer"] == layer
                   and r["observable"] == "delay" and r["seed"] == results["seed"]])
    yield "modes", plots.plot_modes_on_neurons(
        torch.view_as_complex(tensors[prefix + "modes"]),
        torch.view_as_complex(tensors[prefix + "modes_eig"]), tensors[prefix + "modes_res"],
        title=(f"{dataset} layer {layer}: Koopman modes on neurons (delay DMD, "
               f"h={best['n_delays']}, rank {best['rank_resolved']})"))
