"""Drop-predicting scores (koopnet.lab.predict): Spearman's rho and the closed-form scores."""

import math

import pytest
import torch

from koopnet.lab.predict import (
    calibrate,
    drop_scores,
    first_order_flips,
    flip_score,
    layer_cells,
    rank_correlation,
    rollout_errors,
    suggest,
)


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


def test_first_order_flips_exact_for_a_linear_tail():
    generator = torch.Generator().manual_seed(0)
    tail = torch.nn.Linear(3, 4).double()
    target = torch.randn(500, 3, generator=generator, dtype=torch.float64)
    error = 0.5 * torch.randn(500, 3, generator=generator, dtype=torch.float64)
    with torch.no_grad():  # a linear tail: first order is the exact change of the logits
        exact = tail(target + error).argmax(1) != tail(target).argmax(1)
    predicted = first_order_flips(tail, target, error)
    assert 0 < exact.sum() < 500  # some decisions flip, some do not: the count is informative
    assert predicted["flip"] == exact.double().mean().item()
    assert predicted["flip"] <= predicted["margin"] <= 1.0  # a flip closes its whole margin
    assert first_order_flips(tail, target, torch.zeros_like(error)) == {"flip": 0.0,
                                                                       "margin": 0.0}


def test_first_order_flips_is_first_order_through_relu():
    # tail = ReLU then sum into class 1 against a constant class 0; at s = 1 the JVP is e, so
    # e = -2 predicts a flip although tail(s + e) = 0 ties (ReLU cut): no exact evaluation
    tail = torch.nn.Sequential(torch.nn.ReLU(), torch.nn.Linear(1, 2))
    with torch.no_grad():
        tail[1].weight.copy_(torch.tensor([[0.0], [1.0]]))
        tail[1].bias.copy_(torch.tensor([0.5, 0.0]))
    scores = first_order_flips(tail, torch.tensor([[1.0]]), torch.tensor([[-2.0]]))
    assert scores == {"flip": 1.0, "margin": 1.0}
    with pytest.raises(ValueError, match="one error per target state"):
        first_order_flips(tail, torch.ones(2, 1), torch.ones(3, 1))


def test_rollout_errors_vanish_on_linear_trajectories():
    states = _linear_states(50, 6, 3, 0)
    target, error = rollout_errors(states[:40], states[40:], 2, tikhonov=0.0, out_width=2)
    assert target.shape == error.shape == (10, 2)
    assert error.abs().max() < 1e-8  # one linear map generates every trajectory


def test_flip_score_is_the_least_over_fits_and_skips_unsupported_ranks():
    states = torch.randn(40, 5, 3, generator=torch.Generator().manual_seed(1),
                         dtype=torch.float64)
    tail = torch.nn.Linear(3, 3).double()
    fits = [{"rank": None, "constant": True, "tikhonov": t} for t in (0.0, 1e-2)]
    each = [flip_score(states[:30], states[30:], 1, tail, fits=[f]) for f in fits]
    both = flip_score(states[:30], states[30:], 1, tail, fits=fits)
    assert both["flip"] == min(e["flip"] for e in each)
    too_large = {"rank": 500, "constant": False, "tikhonov": 0.0}  # D = 6 < 500: skipped
    assert flip_score(states[:30], states[30:], 1, tail, fits=[*fits, too_large]) == both
    with pytest.raises(ValueError, match="no fit of h=1 is possible"):
        flip_score(states[:30], states[30:], 1, tail, fits=[too_large])


def test_layer_cells_adds_flip_with_a_tail():
    states = _linear_states(40, 5, 3, 2)
    tail = torch.nn.Linear(3, 2).double()
    cells = layer_cells(states[:30], states[30:], 1, delays=[0, 2], tail=tail,
                        fits=[{"rank": None, "constant": False, "tikhonov": 0.0}])
    assert [c["h"] for c in cells] == [0, 2]
    assert all(c["flip"] == 0.0 for c in cells)  # exact roll-out: no decision moves
    assert "flip" not in layer_cells(states[:30], states[30:], 1, delays=[0])[0]
