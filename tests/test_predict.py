"""Drop-predicting scores (koopnet.lab.predict): Spearman's rho and the closed-form scores."""

import math

import pytest
import torch

from koopnet.lab.predict import calibrate, drop_scores, rank_correlation, suggest


def test_spearman_monotone_reverse_and_ties():
    assert rank_correlation([1, 2, 3, 4], [10, 20, 30, 400]) == pytest.approx(1.0)
    assert rank_correlation([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ties share the average rank: ranks [1.5, 1.5, 3] vs [1, 2, 3] -> rho = sqrt(3)/2
    assert rank_correlation([5, 5, 7], [1, 2, 3]) == pytest.approx(math.sqrt(3) / 2)
    assert math.isnan(rank_correlation([1, 1, 1], [1, 2, 3]))


def test_spearman_bad_inputs():
    with pytest.raises(ValueError, match="scores has 2 values but drops has 3"):
        rank_correlation([1, 2], [1, 2, 3])
    with pytest.raises(ValueError, match="at least 2 pairs; got 1"):
        rank_correlation([1], [1])


def _linear_states(batch: int, n_states: int, width: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    A = torch.randn(width, width, generator=generator, dtype=torch.float64)
    A = 0.9 * A / torch.linalg.eigvals(A).abs().max()
    states = [torch.randn(batch, width, generator=generator, dtype=torch.float64)]
    for _ in range(n_states - 1):
        states.append(states[-1] @ A.T)
    return torch.stack(states, dim=1)  # [B, T, W]


@pytest.mark.parametrize("h", [0, 2])
def test_linear_trajectory_scores_exactly(h):
    states = _linear_states(50, 6, 3, 0)  # one A; train and val are different starts
    train, val = states[:40], states[40:]
    scores = drop_scores(train, val, h, tikhonov=0.0)
    assert scores["r2"] == pytest.approx(1.0, abs=1e-9)
    assert scores["residual"] < 1e-8
    assert scores["rollout"] < 1e-8


def test_scores_finite_on_random_states():
    states = torch.randn(30, 5, 4, generator=torch.Generator().manual_seed(0))
    scores = drop_scores(states[:20], states[20:], 1, out_width=2)
    assert set(scores) == {"r2", "unexplained", "residual", "rollout"}
    assert all(math.isfinite(v) for v in scores.values())


def test_drop_scores_bad_inputs():
    states = torch.randn(4, 5, 3)
    with pytest.raises(ValueError, match="h=4 needs trajectories of at least 6 states"):
        drop_scores(states, states, 4)
    with pytest.raises(ValueError, match="T and W must match"):
        drop_scores(states, states[:, :4], 1)


def test_calibrate_and_suggest():
    cells = [{"layer": 1, "h": 0, "s": 0.9, "drop": 0.2},
             {"layer": 1, "h": 3, "s": 0.1, "drop": 0.0},
             {"layer": 2, "h": 1, "s": 0.3, "drop": 0.004}]
    threshold = calibrate(cells, "s", 0.005)
    assert threshold == 0.3
    assert suggest(cells, "s", threshold)["h"] == 1
    assert suggest(cells, "s", -math.inf)["h"] == 3
    with pytest.raises(ValueError, match="at least one scored"):
        suggest([], "s", 0.0)
