"""Baselines and spectral diagnostics for a replaced layer, as plain dict rows and tensors.

Baselines replace the layer directly (its input a = head(x) -> its output b = replaced(a)), with
no inserted blocks, and are scored like the hybrids (accuracy of the remaining original network):

- ``ridge_baseline``: closed-form ridge regression a -> b, lambda chosen on validation;
- ``reduced_rank_baseline``: the ridge map projected onto its top-r output directions
  (reduced-rank regression, Izenman 1975), for a parameter budget;
- ``jacobian_baseline``: the layer linearised at the mean training input (first-order Taylor);
- ``softmax_floor``: multinomial logistic regression on the raw inputs (the whole-model linear
  floor).

Spectral diagnostics live in :mod:`koopnet.lab.spectra`.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from koopnet._checks import check_int
from koopnet.io.datasets import Split
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
    eye = torch.eye(A.shape[1], dtype=A.dtype, device=A.device)
    gram = Ac.T @ Ac + lam * len(A) * eye  # [p, p]
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
        # drawn on the CPU like every other weight, then moved to the data
        model = nn.Linear(train.X.shape[1], n_classes, device="cpu").double().to(train.X.device)
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
