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
