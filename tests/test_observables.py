import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from koopnet._checks import NotFittedError
from koopnet.observables import TimeDelay, snapshot_pairs


def _loop_delay(states: torch.Tensor, h: int) -> torch.Tensor:
    """Reference: g_t = [s_t, s_{t-1}, ..., s_{t-h}] built one window at a time."""
    B, T, W = states.shape
    out = torch.empty(B, T - h, W * (h + 1))
    for b in range(B):
        for t in range(h, T):
            out[b, t - h] = torch.cat([states[b, t - lag] for lag in range(h + 1)])
    return out


@given(st.integers(1, 3), st.integers(1, 8), st.integers(1, 4), st.data())
@settings(max_examples=30, deadline=None)
def test_batched_equals_loop(batch, n_states, width, data):
    h = data.draw(st.integers(0, n_states - 1))
    states = torch.randn(batch, n_states, width)
    lifted = TimeDelay(n_delays=h).fit_transform(states)
    assert lifted.shape == (batch, n_states - h, width * (h + 1))
    assert torch.equal(lifted, _loop_delay(states, h))


def test_zero_delays_is_identity_and_constant_appends_one():
    states = torch.randn(2, 5, 3)
    assert torch.equal(TimeDelay(0).fit_transform(states), states)
    lifted = TimeDelay(0, constant=True).fit_transform(states)
    assert torch.equal(lifted[..., :3], states) and torch.all(lifted[..., 3] == 1)


def test_newest_first_and_readout_selects_newest_state():
    states = torch.arange(12.0).view(1, 4, 3)
    observable = TimeDelay(2).fit(states)
    lifted = observable.transform(states)
    assert lifted[0, 0].tolist() == [6, 7, 8, 3, 4, 5, 0, 1, 2]
    readout = observable.readout(2)
    assert (lifted[0].double() @ readout.T).tolist() == [[6, 7], [9, 10]]
    assert observable.feature_names()[:4] == ["x0(t)", "x1(t)", "x2(t)", "x0(t-1)"]


def test_no_pair_crosses_trajectories():
    states = torch.stack([torch.zeros(4, 2), torch.ones(4, 2)])  # sample 0 all 0, sample 1 all 1
    X, Y = snapshot_pairs(TimeDelay(1).fit_transform(states))
    assert X.shape == (4, 4)
    assert torch.equal(X.sum(1) == 0, Y.sum(1) == 0)  # each pair stays inside its sample


def test_errors():
    with pytest.raises(ValueError, match=r"n_delays=12 needs trajectories of at least 13 states; "
                                         r"got T=12"):
        TimeDelay(12).fit_transform(torch.zeros(1, 12, 3))
    with pytest.raises(ValueError, match=r"n_delays=-1 must be >= 0"):
        TimeDelay(-1).fit(torch.zeros(1, 3, 2))
    with pytest.raises(ValueError, match=r"states must have 3 dimensions; got shape \(3, 2\)"):
        TimeDelay(0).fit(torch.zeros(3, 2))
    with pytest.raises(NotFittedError, match="TimeDelay instance is not fitted"):
        TimeDelay(0).transform(torch.zeros(1, 3, 2))
    with pytest.raises(ValueError, match="DMD needs at least 2 per trajectory"):
        snapshot_pairs(torch.zeros(3, 1, 2))


# --- EDMD dictionaries: Polynomial and RandomFourier ---

from koopnet.observables import Polynomial, RandomFourier  # noqa: E402


def _dictionaries(h, **kwargs):
    return [Polynomial(2, h, max_features=7, **kwargs),
            RandomFourier(6, h, scale=1.5, seed=3, **kwargs)]


@pytest.mark.parametrize("h", [0, 2])
@pytest.mark.parametrize("constant", [False, True])
def test_dictionaries_shape_and_batched_equals_loop(h, constant):
    states = torch.randn(3, 5, 2, dtype=torch.float64)
    for observable in _dictionaries(h, constant=constant):
        lifted = observable.fit_transform(states)
        D = 2 * (h + 1) + observable.n_extra_ + int(constant)
        assert lifted.shape == (3, 5 - h, D) == (3, 5 - h, observable.n_output_features_)
        assert (observable.n_delays_, observable.n_features_in_) == (h, 2)
        assert len(observable.feature_names()) == D
        # every trajectory lifted alone gives the same rows: nothing couples the batch
        alone = torch.cat([observable.transform(states[b:b + 1]) for b in range(3)])
        torch.testing.assert_close(alone, lifted, rtol=0, atol=1e-12)
        # the delay vector comes first, so readout() selects the newest state exactly
        torch.testing.assert_close(lifted @ observable.readout().T, states[:, h:])
        # the constant observable is the last feature, and only there is it all ones
        assert bool(torch.all(lifted[..., -1] == 1)) == constant


def test_polynomial_monomials_and_cap():
    states = torch.tensor([[[2.0, 3.0], [5.0, 7.0]]])
    lifted = Polynomial(2, 1).fit_transform(states)[0, 0]  # delay vector [5, 7, 2, 3]
    g = [5.0, 7.0, 2.0, 3.0]
    products = [g[i] * g[j] for i in range(4) for j in range(i, 4)]
    assert lifted.tolist() == g + products
    capped = Polynomial(3, 1, max_features=12).fit(states)
    assert capped.n_extra_ == 12 and capped.feature_names()[4] == "x0(t)*x0(t)"
    cubic = Polynomial(3).fit_transform(torch.tensor([[[2.0, 3.0]]]))[0, 0]
    assert cubic.tolist() == [2, 3, 4, 6, 9, 8, 12, 18, 27]


def test_random_fourier_is_seeded_and_standardised():
    states = 10 + 5 * torch.randn(4, 6, 3)
    a = RandomFourier(20, 1, seed=0).fit_transform(states)
    b = RandomFourier(20, 1, seed=0).fit_transform(states)
    c = RandomFourier(20, 1, seed=1).fit_transform(states)
    assert torch.equal(a, b) and not torch.equal(a, c)
    features = a[..., 6:]
    assert features.abs().max() <= 2**0.5 + 1e-6
    # standardised inputs at scale 1: the features are spread over (-sqrt2, sqrt2), not saturated
    assert features.std() > 0.5


def test_fitted_readout_is_the_least_squares_map():
    states = torch.rand(6, 8, 3, dtype=torch.float64)
    for observable in _dictionaries(2, include_state=False, constant=True):
        lifted = observable.fit_transform(states)
        assert lifted.shape[2] == observable.n_extra_ + 1  # no delay block
        L, S = lifted.reshape(-1, lifted.shape[2]), states[:, 2:].reshape(-1, 3)
        expected = torch.linalg.pinv(L) @ S  # [D, W]
        torch.testing.assert_close(observable.readout(), expected.T, rtol=1e-6, atol=1e-8)
        torch.testing.assert_close(observable.readout(2), expected.T[:2], rtol=1e-6, atol=1e-8)


def test_fitted_readout_recovers_a_state_inside_the_span():
    # squares of a non-negative state: x = sqrt(x^2) is not linear, but x^2 is in the span, so a
    # state built as x^2 is read back exactly from the degree-2 monomials alone
    base = torch.rand(5, 4, 2, dtype=torch.float64)
    observable = Polynomial(2, include_state=False).fit(base)
    lifted = observable.transform(base)
    readout = Polynomial(2, include_state=False).fit(base).fit_readout(lifted, base**2).readout_
    torch.testing.assert_close(lifted @ readout.T, base**2, rtol=1e-8, atol=1e-10)


def test_dictionary_errors():
    for observable in _dictionaries(0):
        with pytest.raises(NotFittedError, match="instance is not fitted yet"):
            observable.transform(torch.zeros(1, 3, 2))
        with pytest.raises(NotFittedError, match="instance is not fitted yet"):
            observable.readout()
    with pytest.raises(ValueError, match=r"degree=1 must be >= 2"):
        Polynomial(1).fit(torch.zeros(1, 3, 2))
    with pytest.raises(ValueError, match=r"n_features=0 must be >= 1"):
        RandomFourier(0).fit(torch.zeros(1, 3, 2))
    with pytest.raises(ValueError, match=r"n_delays=4 needs trajectories of at least 5 states"):
        Polynomial(2, 4).fit(torch.zeros(1, 3, 2))
    with pytest.raises(ValueError, match=r"lifted has 6 rows but states has 3"):
        Polynomial(2).fit(torch.rand(2, 3, 2)).fit_readout(torch.rand(2, 3, 4),
                                                           torch.rand(1, 3, 2))
