import pytest
import torch

from koopnet._checks import NotFittedError
from koopnet.dmd import DMD, PairStatistics
from koopnet.observables import TimeDelay, snapshot_pairs


def _sorted(values: torch.Tensor) -> torch.Tensor:
    return values[torch.argsort(values.real * 10 + values.imag)]


def test_exact_eigenvalues_of_known_linear_system(linear_system):
    _, eigenvalues, states = linear_system
    dmd = DMD().fit(states)
    # Noise-free data from an exactly linear system: only rounding error remains (float64).
    assert torch.allclose(_sorted(dmd.eigenvalues_), _sorted(eigenvalues), atol=1e-8)
    assert dmd.rank_ == 4 and dmd.n_features_in_ == 4


def test_gram_route_equals_svd_route(linear_system):
    _, _, states = linear_system
    X, Y = snapshot_pairs(states)
    a = DMD().fit_pairs(X, Y)
    b = DMD().fit_statistics(PairStatistics.from_pairs(X, Y))
    # Well-conditioned data: squaring the condition number costs ~1e-14 here.
    assert torch.allclose(_sorted(a.eigenvalues_), _sorted(b.eigenvalues_), atol=1e-9)
    assert torch.allclose(a.transition(3), b.transition(3), atol=1e-9)


def test_matches_pydmd_on_same_data(linear_system):
    import pydmd  # a dev dependency: a missing one fails loudly instead of skipping

    _, _, states = linear_system
    series = states[0] + 0.01 * torch.randn_like(states[0])  # one noisy trajectory [T, W]
    ours = DMD(rank=3).fit(series[None])
    theirs = pydmd.DMD(svd_rank=3, exact=True).fit(series.T.numpy())
    # Same algorithm (truncated SVD, exact modes) on the same data: agreement to rounding.
    expected = _sorted(torch.from_numpy(theirs.eigs).to(torch.complex128))
    assert torch.allclose(_sorted(ours.eigenvalues_), expected, atol=1e-10)


def test_prediction_equals_eigendecomposition_closed_form(linear_system):
    _, _, states = linear_system
    dmd = DMD(rank=3).fit(states)
    g = states[:, 0]
    # PyKoopman's simulate: Re(V Phi Lambda^m Phi^-1 V^T g); ours: V A~^m V^T g, all real.
    _, eigenvectors = torch.linalg.eig(dmd.operator_)
    lam_m = torch.diag(dmd.eigenvalues_**5)
    closed = dmd.basis_.to(lam_m.dtype) @ eigenvectors @ lam_m @ torch.linalg.inv(eigenvectors)
    expected = (g.to(closed.dtype) @ (closed @ dmd.basis_.T.to(closed.dtype)).T).real
    assert torch.allclose(dmd.predict(g, n_steps=5), expected, atol=1e-10)


def test_one_step_full_rank_is_least_squares():
    X = torch.randn(200, 5, dtype=torch.float64).relu()
    Y = torch.cat([(X @ torch.randn(5, 3, dtype=torch.float64)).relu(),
                   -torch.ones(200, 2, dtype=torch.float64)], dim=1)  # padded to width 5
    dmd = DMD().fit(torch.stack([X, Y], dim=1))  # trajectories of T=2 states, h = 0
    solution = torch.linalg.lstsq(X, Y).solution  # [5, 5]
    assert torch.allclose(dmd.predict(X), X @ solution, atol=1e-10)


def test_rank_options():
    X = torch.randn(100, 6, dtype=torch.float64) * torch.tensor([10, 5, 1, 0.1, 0.01, 0.001])
    Y = X.roll(1, dims=1)
    assert DMD(rank=2).fit_pairs(X, Y).rank_ == 2
    # Energies ~ 100, 25, 1, 0.01, ...: one mode holds ~79%, two ~99.2%, three ~99.99%.
    assert DMD(rank=0.75).fit_pairs(X, Y).rank_ == 1
    assert DMD(rank=0.95).fit_pairs(X, Y).rank_ == 2
    assert DMD(rank=0.999).fit_pairs(X, Y).rank_ == 3
    assert DMD(rank=None).fit_pairs(X, Y).rank_ == 6


GD_SPECTRUM = [10.0, 5.0, 3.0, 2.7, 2.0] + [1.0] * 15  # median 1, three values above omega(1)


def _gd_rank(c3=0.56, c2=0.95, c1=1.82, c0=1.43, beta=1.0) -> int:
    omega = c3 * beta**3 - c2 * beta**2 + c1 * beta + c0  # 2.86 at beta = 1
    return sum(v > omega * 1.0 for v in GD_SPECTRUM)


def test_gavish_donoho_rank_on_a_known_spectrum():
    # A square 20 x 20 snapshot matrix with exactly these singular values: beta = 1, the
    # threshold is omega(1) * median = 2.86, so 10, 5 and 3 are kept and 2.7, 2, 1 are not.
    gen = torch.Generator().manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(20, 20, dtype=torch.float64, generator=gen))
    V, _ = torch.linalg.qr(torch.randn(20, 20, dtype=torch.float64, generator=gen))
    X = U @ torch.diag(torch.tensor(GD_SPECTRUM, dtype=torch.float64)) @ V.T
    assert DMD(rank=0).fit_pairs(X, X.roll(1, dims=0)).rank_ == 3 == _gd_rank()
    stats = PairStatistics.from_pairs(X, X.roll(1, dims=0))
    assert DMD(rank=0).fit_statistics(stats).rank_ == 3  # the Gram route resolves the same
    # halving any one constant of omega(beta) would move the rank: the example can tell
    halved = [_gd_rank(c3=0.28), _gd_rank(c2=0.475), _gd_rank(c1=0.91), _gd_rank(c0=0.715)]
    assert halved == [4, 2, 5, 4]


@pytest.mark.parametrize(("rank", "error", "match"), [
    (2.0, ValueError, r"rank=2.0 is ambiguous"),
    (-3, ValueError, r"rank=-3 is ambiguous"),
    (7, ValueError, r"rank=7 exceeds what the data supports: min\(D=6, pairs=100\)=6"),
    ("full", TypeError, r"rank='full' must be None"),
])
def test_bad_rank(rank, error, match):
    X = torch.randn(100, 6, dtype=torch.float64)
    with pytest.raises(error, match=match):
        DMD(rank=rank).fit_pairs(X, X)


def test_tikhonov_damps_the_operator():
    X = torch.randn(50, 4, dtype=torch.float64) * torch.tensor([1, 1, 1, 1e-6])
    Y = torch.randn(50, 4, dtype=torch.float64)
    plain = DMD().fit_pairs(X, Y).operator_.norm()
    damped = DMD(tikhonov=1e-4).fit_pairs(X, Y).operator_.norm()
    assert damped < plain / 100


def test_tikhonov_full_rank_is_ridge_regression():
    # lambda = tikhonov * S_max^2: one step of the projected full-rank map is the ridge solution
    # (X^T X + lambda I)^-1 X^T Y, so the damping's sign and scale are pinned
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(60, 5, dtype=torch.float64, generator=gen) * torch.tensor(
        [3.0, 1.0, 0.3, 0.1, 0.03], dtype=torch.float64)
    Y = torch.randn(60, 5, dtype=torch.float64, generator=gen)
    lam = 1e-2 * torch.linalg.svdvals(X)[0] ** 2
    ridge = torch.linalg.solve(X.T @ X + lam * torch.eye(5, dtype=torch.float64), X.T @ Y)
    for fit in (DMD(tikhonov=1e-2).fit_pairs(X, Y),
                DMD(tikhonov=1e-2).fit_statistics(PairStatistics.from_pairs(X, Y))):
        assert torch.allclose(fit.predict(X), X @ ridge, atol=1e-10)


def test_not_fitted_and_bad_inputs():
    with pytest.raises(NotFittedError, match="DMD instance is not fitted yet"):
        DMD().predict(torch.zeros(1, 3))
    with pytest.raises(ValueError, match=r"X and Y must have the same shape"):
        DMD().fit_pairs(torch.ones(4, 3), torch.ones(4, 2))
    bad = torch.ones(4, 3)
    bad[2, 1] = float("nan")
    with pytest.raises(ValueError, match=r"X contains 1 NaN values \(first at index \(2, 1\)\)"):
        DMD().fit_pairs(bad, bad)
    with pytest.raises(ValueError, match="snapshot matrix is zero"):
        DMD().fit_pairs(torch.zeros(4, 3), torch.zeros(4, 3))
    with pytest.raises(ValueError, match=r"lifted has 2 features; this DMD was fitted on 3"):
        DMD().fit_pairs(torch.randn(5, 3), torch.randn(5, 3)).predict(torch.zeros(1, 2))


def test_refit_is_idempotent(linear_system):
    _, _, states = linear_system
    dmd = DMD(rank=3)
    first = dmd.fit(states).operator_.clone()
    assert torch.equal(dmd.fit(states).operator_, first)


def test_delay_dmd_recovers_scalar_oscillator():
    # A single observed coordinate of a rotation needs one delay to become linear (Takens).
    t = torch.arange(40, dtype=torch.float64)
    series = torch.cos(0.3 * t)[None, :, None]  # [1, 40, 1]
    lifted = TimeDelay(n_delays=1).fit_transform(series)
    dmd = DMD().fit(lifted)
    expected = torch.tensor([complex(torch.cos(torch.tensor(0.3)), s * torch.sin(torch.tensor(0.3)))
                             for s in (1, -1)], dtype=torch.complex128)
    assert torch.allclose(_sorted(dmd.eigenvalues_), _sorted(expected), atol=1e-8)


@pytest.mark.parametrize("exact_rollout", [False, True])
def test_transitions_are_every_transition_from_one_running_product(exact_rollout):
    generator = torch.Generator().manual_seed(3)
    X = torch.randn(40, 5, generator=generator, dtype=torch.float64)
    Y = X @ (0.4 * torch.randn(5, 5, generator=generator, dtype=torch.float64)).T
    dmd = DMD(rank=4, exact_rollout=exact_rollout).fit_pairs(X, Y)
    readout = torch.randn(3, 5, generator=generator, dtype=torch.float64)
    for left in (readout, None):
        maps = dmd.transitions(6, left)
        assert maps.shape == ((6, 3, 5) if left is not None else (6, 5, 5))
        for m in range(1, 7):
            torch.testing.assert_close(maps[m - 1], dmd.transition(m, left), rtol=0, atol=1e-12)
    assert dmd.transitions(0, readout).shape == (0, 3, 5)
    # the two roll-outs differ, so the check above tells them apart
    other = DMD(rank=4, exact_rollout=not exact_rollout).fit_pairs(X, Y)
    assert not torch.allclose(other.transitions(2, readout), dmd.transitions(2, readout),
                              atol=1e-6)
