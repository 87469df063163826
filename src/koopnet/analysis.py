"""Baselines and spectral diagnostics for a replaced layer, as plain dict rows and tensors.

Baselines replace the layer directly (its input a = head(x) -> its output b = replaced(a)), with
no inserted blocks, and are scored like the hybrids (accuracy of the remaining original network):

- ``ridge_baseline``: closed-form ridge regression a -> b, lambda chosen on validation;
- ``reduced_rank_baseline``: the ridge map projected onto its top-r output directions
  (reduced-rank regression, Izenman 1975), for a parameter budget;
- ``jacobian_baseline``: the layer linearised at the mean training input (first-order Taylor);
- ``softmax_floor``: multinomial logistic regression on the raw inputs (the whole-model linear
  floor).

Spectral diagnostics: ``resdmd_residuals`` (Colbrook and Townsend 2024, "Rigorous data-driven
computation of spectral properties of Koopman operators"): for an eigenpair (lambda, w) with
eigenfunction phi = w^T g, the relative residual ||Y w - lambda X w|| / ||X w|| on held-out pairs,
computed from Gram matrices; a large residual flags a spurious eigenvalue.
``hankel_right_singular_vectors`` and ``singular_value_decay`` give the paper's SVD evidence.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from koopnet._checks import as_tensor, check_int
from koopnet.datasets import Split
from koopnet.dmd import DMD, PairStatistics
from koopnet.scaling import ScaledMLP

LAMBDAS = (0.0, 1e-6, 1e-4, 1e-2, 1e-1, 1.0)


def ridge_fit(A: torch.Tensor, B: torch.Tensor, lam: float = 0.0
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Closed-form ridge regression with an unpenalised intercept, in float64.

    Minimises ||B - A W^T - c||^2 + lam * n * ||W||^2 (lam is per sample, so scale free in n).
    Shape: A [n, p], B [n, q] -> W [q, p], c [q].
    """
    A, B = A.to(torch.float64), B.to(torch.float64)
    a_mean, b_mean = A.mean(0), B.mean(0)
    Ac, Bc = A - a_mean, B - b_mean  # [n, p], [n, q]
    gram = Ac.T @ Ac + lam * len(A) * torch.eye(A.shape[1], dtype=A.dtype)  # [p, p]
    W = torch.linalg.lstsq(gram, Ac.T @ Bc).solution.T  # [q, p]
    return W, b_mean - W @ a_mean


def _layer_io(scaled: ScaledMLP, X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        a = scaled.head(X)
        return a, scaled.replaced(a)


def _accuracy_with(scaled: ScaledMLP, split: Split, W: torch.Tensor, c: torch.Tensor) -> float:
    """Accuracy of tail(a W^T + c): the layer replaced by an affine map."""
    with torch.no_grad():
        a = scaled.head(split.X).to(torch.float64)
        logits = scaled.tail((a @ W.T + c).to(split.X.dtype))
        return float((logits.argmax(1) == split.y).float().mean())


def _row(scaled, method, W, c, val, test, parameters=None, **extra) -> dict:
    return {"layer": scaled.layer, "method": method,
            "parameters": int(W.numel() + c.numel()) if parameters is None else parameters,
            "val_accuracy": _accuracy_with(scaled, val, W, c),
            "test_accuracy": _accuracy_with(scaled, test, W, c), **extra}


def ridge_baseline(scaled: ScaledMLP, train: Split, val: Split, test: Split,
                   lambdas=LAMBDAS) -> dict:
    """Ridge regression replacing the layer; lambda chosen on validation accuracy."""
    a, b = _layer_io(scaled, train.X)
    rows = [_row(scaled, "ridge", *ridge_fit(a, b, lam), val, test, ridge_lambda=lam)
            for lam in lambdas]
    return max(rows, key=lambda r: (r["val_accuracy"], r["ridge_lambda"]))


def reduced_rank_baseline(scaled: ScaledMLP, train: Split, val: Split, test: Split, rank: int,
                          lambdas=LAMBDAS) -> dict:
    """Reduced-rank (rank ``rank``) ridge regression replacing the layer; lambda on validation.

    The full ridge map is projected onto the top ``rank`` principal directions of its fitted
    outputs. Parameters: min(rank (w + w'), w w') + w' (two factors or the full map, and the
    intercept).
    """
    a, b = _layer_io(scaled, train.X)
    rank = check_int(rank, "rank", low=1, high=min(a.shape[1], b.shape[1]))
    rows = []
    for lam in lambdas:
        W, c = ridge_fit(a, b, lam)
        fitted = (a.to(torch.float64) - a.to(torch.float64).mean(0)) @ W.T  # [n, w']
        directions = torch.linalg.svd(fitted, full_matrices=False)[2][:rank]  # [r, w']
        W = directions.T @ directions @ W  # [w', w] of rank r
        w, w_out = a.shape[1], b.shape[1]
        params = min(rank * (w + w_out), w * w_out) + w_out  # factors (or full map) + intercept
        rows.append(_row(scaled, "reduced-rank ridge", W, c, val, test, parameters=params,
                         ridge_lambda=lam, rank=rank))
    return max(rows, key=lambda r: (r["val_accuracy"], r["ridge_lambda"]))


def jacobian_baseline(scaled: ScaledMLP, train: Split, val: Split, test: Split) -> dict:
    """The layer linearised at the mean training input: b ~ f(a_mean) + J (a - a_mean)."""
    a, _ = _layer_io(scaled, train.X)
    a_mean = a.mean(0).to(torch.float64)
    layer = copy.deepcopy(scaled.replaced).to(torch.float64)
    J = torch.autograd.functional.jacobian(layer, a_mean)  # [w', w]
    with torch.no_grad():
        c = layer(a_mean) - J @ a_mean  # [w']
    return _row(scaled, "jacobian at mean", J, c, val, test)


def softmax_floor(train: Split, val: Split, test: Split,
                  weight_decays=(0.0, 1e-4, 1e-2), max_iter: int = 200) -> dict:
    """Multinomial logistic regression on the inputs (L-BFGS); weight decay on validation."""
    n_classes = int(max(train.y.max(), val.y.max(), test.y.max())) + 1
    best = None
    for decay in weight_decays:
        model = nn.Linear(train.X.shape[1], n_classes).double()
        optimizer = torch.optim.LBFGS(model.parameters(), max_iter=max_iter,
                                      line_search_fn="strong_wolfe")
        X = train.X.double()

        def closure(model=model, optimizer=optimizer, X=X, decay=decay):
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(X), train.y) + decay * (model.weight**2).sum()
            loss.backward()
            return loss

        optimizer.step(closure)
        with torch.no_grad():
            acc = {name: float((model(s.X.double()).argmax(1) == s.y).float().mean())
                   for name, s in (("val", val), ("test", test))}
        row = {"layer": None, "method": "softmax regression on inputs",
               "parameters": (train.X.shape[1] + 1) * n_classes, "weight_decay": decay,
               "val_accuracy": acc["val"], "test_accuracy": acc["test"]}
        if best is None or row["val_accuracy"] > best["val_accuracy"]:
            best = row
    return best


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
