import dataclasses

import numpy as np
import pytest
import torch

from koopnet.dmd import DMD, PairStatistics
from koopnet.io.datasets import Split
from koopnet.lab.baselines import (
    jacobian_baseline,
    reduced_rank_baseline,
    ridge_baseline,
    ridge_fit,
    softmax_floor,
)
from koopnet.lab.recipes import YINYANG_SCALING
from koopnet.lab.spectra import (
    hankel_right_singular_vectors,
    resdmd_residuals,
    singular_value_decay,
)
from koopnet.models import accuracy, build_mlp
from koopnet.observables import TimeDelay, snapshot_pairs
from koopnet.scaling import scale_layer

NO_TRAINING = dataclasses.replace(YINYANG_SCALING, epochs=1, lr=1e-12)


def _splits(n_features=3, n=300):
    X = torch.randn(n, n_features)
    y = (X[:, 0] + 0.5 * X[:, 1] > 0).long()
    return Split(X[:100], y[:100]), Split(X[100:200], y[100:200]), Split(X[200:], y[200:])


def _scaled(activation):
    model = build_mlp([3, 7, 6, 5, 2], activation=activation)
    train, val, test = _splits()
    scaled, _ = scale_layer(model, 1, train.X, n_inserted=0, config=NO_TRAINING)
    return model, scaled, train, val, test


def test_ridge_fit_equals_closed_form():
    A, B = torch.randn(50, 4, dtype=torch.float64), torch.randn(50, 3, dtype=torch.float64)
    lam = 0.1
    W, c = ridge_fit(A, B, lam)
    # closed form with an unpenalised intercept: augment [A, 1], penalise only the weights
    Aa = np.hstack([A.numpy(), np.ones((50, 1))])
    penalty = np.diag([lam * 50] * 4 + [0.0])
    coef = np.linalg.solve(Aa.T @ Aa + penalty, Aa.T @ B.numpy())  # [5, 3]
    np.testing.assert_allclose(W.numpy(), coef[:4].T, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(c.numpy(), coef[4], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("baseline", [ridge_baseline, jacobian_baseline])
def test_linear_layer_is_replaced_exactly(baseline):
    # identity activations: the replaced layer is affine, so ridge (lambda=0) and the Jacobian
    # at any point are the layer itself and the accuracy is the original network's
    model, scaled, train, val, test = _scaled("identity")
    kwargs = {"lambdas": (0.0,)} if baseline is ridge_baseline else {}
    row = baseline(scaled, train, val, test, **kwargs)
    assert row["val_accuracy"] == accuracy(model, val.X, val.y)
    assert row["test_accuracy"] == accuracy(model, test.X, test.y)
    assert row["parameters"] == 6 * 7 + 6 and row["layer"] == 1


def test_ridge_picks_lambda_on_validation_and_rrr_full_rank_equals_ridge():
    _, scaled, train, val, test = _scaled("relu")
    rows = [ridge_baseline(scaled, train, val, test, lambdas=(lam,)) for lam in (0.0, 1.0)]
    best = ridge_baseline(scaled, train, val, test, lambdas=(0.0, 1.0))
    assert best["val_accuracy"] == max(r["val_accuracy"] for r in rows)
    full = reduced_rank_baseline(scaled, train, val, test, rank=6, lambdas=(0.0,))
    assert full["test_accuracy"] == rows[0]["test_accuracy"]
    one = reduced_rank_baseline(scaled, train, val, test, rank=1, lambdas=(0.0,))
    assert one["parameters"] == 1 * (7 + 6) + 6
    with pytest.raises(ValueError, match=r"rank=7 must be <= 6"):
        reduced_rank_baseline(scaled, train, val, test, rank=7)


def test_softmax_floor_separates_linear_classes():
    row = softmax_floor(*_splits(n=600), weight_decays=(1e-3,))  # separable: keep weights finite
    assert row["test_accuracy"] > 0.9 and row["parameters"] == (3 + 1) * 2


def _residual_direct(dmd, X, Y):
    from koopnet.lab.spectra import left_eigenvectors

    lam, W = left_eigenvectors(dmd)
    X, Y = X.to(W.dtype), Y.to(W.dtype)
    return torch.linalg.norm(Y @ W - (X @ W) * lam, dim=0) / torch.linalg.norm(X @ W, dim=0)


def test_resdmd_residual_vanishes_for_exact_eigenpairs(linear_system):
    _, _, states = linear_system
    observable = TimeDelay(0).fit(states)
    dmd = DMD().fit(observable.transform(states[:10]))
    held_out = snapshot_pairs(observable.transform(states[10:]))
    residuals = resdmd_residuals(dmd, PairStatistics.from_pairs(*held_out))
    assert residuals.shape == (4,)
    assert residuals.max() < 1e-6  # exact linear data: only round-off of the Gram route


def test_resdmd_flags_spurious_eigenvalues(linear_system):
    _, _, states = linear_system
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(20, 15, 2, generator=generator, dtype=torch.float64)  # white in time
    augmented = torch.cat([states, noise], dim=2)  # [20, 15, 6]
    observable = TimeDelay(0).fit(augmented)
    dmd = DMD().fit(observable.transform(augmented[:10]))
    X, Y = snapshot_pairs(observable.transform(augmented[10:]))
    residuals = resdmd_residuals(dmd, PairStatistics.from_pairs(X, Y))
    # the Gram route squares: a residual of 0 comes out as ~sqrt(eps) ~ 1e-8
    torch.testing.assert_close(residuals, _residual_direct(dmd, X, Y), rtol=1e-6, atol=1e-6)
    ranked = residuals.sort().values
    assert ranked[:4].max() < 0.1  # the system's eigenpairs survive the noise channels
    assert ranked[4:].min() > 0.5  # the noise channels' eigenvalues are flagged


def test_resdmd_dimension_mismatch():
    dmd = DMD().fit(torch.randn(2, 5, 3, dtype=torch.float64))
    stats = PairStatistics.from_pairs(torch.randn(4, 2), torch.randn(4, 2))
    with pytest.raises(ValueError, match=r"stats have D=2; this DMD was fitted on D=3"):
        resdmd_residuals(dmd, stats)


def test_hankel_and_singular_value_decay():
    series = torch.randn(40, 3, dtype=torch.float64)
    s, _ = hankel_right_singular_vectors(series, 1, k=2)
    torch.testing.assert_close(s, torch.linalg.svdvals(series.T))
    s10, Vh10 = hankel_right_singular_vectors(series, 10, k=7)
    assert Vh10.shape == (7, 31) and len(s10) == 30
    torch.testing.assert_close(Vh10 @ Vh10.T, torch.eye(7, dtype=torch.float64))
    decay = singular_value_decay(torch.randn(2, 6, 4))
    assert decay[0] == 1 and torch.all(decay[1:] <= decay[:-1])
    with pytest.raises(ValueError, match=r"n_stacked=41 must be <= 40"):
        hankel_right_singular_vectors(series, 41)


def test_study_quick_writes_tables_figures_and_rerenders(tmp_path):
    """End to end: `koopnet study --quick --seeds 1` (one seed, tiny training)."""
    import json

    from koopnet.cli import main

    out = tmp_path / "study"
    assert main(["--quiet", "study", "yinyang", "--quick", "--seeds", "1", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["schema"] == 1 and results["seeds"]["seeds"] == [0]
    observables = {r["observable"] for r in results["comparison"]}
    assert observables == {"delay", "identity", "polynomial", "rbf", "rbf, fitted read-out",
                           "learned"}
    for row in results["comparison"]:
        assert row["linear_steps"] + row["nonlinear_blocks"] == 11
        # the held-out error of every predicted state, and the chosen K's spectrum
        assert len(row["test_state_errors"]) == row["linear_steps"] + row.get("encoder_blocks", 0)
        assert ("encoder_blocks" in row) == row["observable"].startswith("learned")
        assert all(e >= 0 for e in row["test_state_errors"]) and row["spectral_radius"] >= 0
    methods = {r["method"] for r in results["baselines"]}
    assert {"ridge", "reduced-rank ridge", "jacobian at mean", "original network",
            "softmax regression on inputs", "scaled network"} <= methods
    groups = {r["group"] for r in results["ablations"]}
    assert groups == {"scaling init", "inserted blocks N", "constant observable",
                      "rank / Tikhonov", "trajectory windows", "scaling variant"}
    report = (out / "report.md").read_text()
    for name in results["study"]["figures"]:
        assert f"]({name})" in report and (out / name).stat().st_size > 5_000
    assert "### Which method wins where" in report and "## Ablations" in report
    assert "| max abs lambda | state errors |" in report
    (out / "report.md").unlink()
    assert main(["report", str(out)]) == 0
    assert (out / "report.md").read_text() == report
