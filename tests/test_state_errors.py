"""The held-out error of every state a hybrid's roll-out predicts (issue 11: a K that only gets
the last state right must show in the states before it)."""

import pytest
import torch

from koopnet.dmd import DMD
from koopnet.lab.predict import state_errors
from koopnet.observables import TimeDelay


def _linear_trajectories(n: int, T: int, seed: int) -> torch.Tensor:
    rotation = torch.randn(4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    A = torch.linalg.qr(rotation)[0] * 0.9  # the same system for every seed
    generator = torch.Generator().manual_seed(seed)
    states = [torch.randn(n, 4, generator=generator, dtype=torch.float64)]
    for _ in range(T - 1):
        states.append(states[-1] @ A.T)
    return torch.stack(states, dim=1)  # [n, T, 4]


def test_a_linear_system_is_predicted_at_every_step():
    train, held = _linear_trajectories(50, 6, 0), _linear_trajectories(20, 6, 1)
    observable = TimeDelay(1).fit(train)
    dmd = DMD(exact_rollout=True).fit(observable.transform(train))
    errors = state_errors(observable, dmd, held, 1, 4, 4)
    assert len(errors) == 4  # s_2..s_5 from s_1
    assert max(errors) < 1e-10


def test_an_error_in_one_state_shows_at_that_step_only():
    train, held = _linear_trajectories(50, 6, 0), _linear_trajectories(20, 6, 1)
    observable = TimeDelay(1).fit(train)
    dmd = DMD(exact_rollout=True).fit(observable.transform(train))
    held[:, 3] += 1.0  # the network did something else at s_3
    errors = state_errors(observable, dmd, held, 1, 4, 4)
    assert errors[1] > 0.1 and max(errors[0], errors[2], errors[3]) < 1e-10


def test_padding_of_the_last_state_is_left_out():
    train, held = _linear_trajectories(50, 6, 0), _linear_trajectories(20, 6, 1)
    observable = TimeDelay(0).fit(train)
    dmd = DMD(exact_rollout=True).fit(observable.transform(train))
    held[:, -1, 2:] = 5.0  # padding beyond the last state's real width of 2
    errors = state_errors(observable, dmd, held, 0, 4, 2)
    assert max(errors) < 1e-10


def test_errors_equal_a_loop_over_single_transitions():
    """state_errors takes every step from DMD.transitions; the numbers are those of one
    transition(m) per state, in both roll-outs."""
    train, held = _linear_trajectories(50, 6, 0), _linear_trajectories(20, 6, 1)
    held = held + 0.05 * torch.randn(held.shape, generator=torch.Generator().manual_seed(2),
                                     dtype=torch.float64)  # errors well above rounding
    observable = TimeDelay(1).fit(train)
    for exact_rollout in (False, True):
        dmd = DMD(rank=5, exact_rollout=exact_rollout).fit(observable.transform(train))
        lifted = observable.transform(held[:, 0:2])[:, -1]  # [B, D] at s_1
        expected = []
        for t, w in zip(range(2, 6), (4, 4, 4, 2), strict=True):
            step = dmd.transition(t - 1, observable.readout(4))[:w]
            error = lifted @ step.T - held[:, t, :w]
            expected.append(float(error.norm() / held[:, t, :w].norm()))
        errors = state_errors(observable, dmd, held, 1, 4, 2)
        assert min(errors) > 1e-3
        assert errors == pytest.approx(expected, rel=1e-12, abs=0)
