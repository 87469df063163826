import dataclasses

import pytest
import torch
from torch import nn

from koopnet.io.datasets import make_yinyang
from koopnet.lab.recipes import YINYANG_SCALING
from koopnet.models import TrainConfig, accuracy, build_mlp
from koopnet.scaling import scale_layer, split_mlp

FAST = dataclasses.replace(YINYANG_SCALING, epochs=60, batch_size=300, plateau_patience=None)


def test_split_mlp_cuts_around_hidden_layer():
    model = build_mlp([2, 8, 6, 4, 3, 2])
    head, replaced, tail = split_mlp(model, 2)
    assert head[-2].out_features == 6 and replaced[0].in_features == 6
    assert replaced[0].out_features == 4 and tail[0].in_features == 4
    x = torch.randn(5, 2)
    assert torch.equal(tail(replaced(head(x))), model(x))


@pytest.mark.parametrize(("model", "layer", "match"), [
    (build_mlp([2, 8, 6, 4, 3, 2]), 4, r"layer=4 is out of range: this model has 4 hidden layers, "
                                       r"so layer must be in 1..3"),
    (build_mlp([2, 8, 6, 4, 3, 2]), 0, r"layer=0 is out of range"),
    (build_mlp([2, 8, 2]), 1, r"model has 1 hidden layer\(s\); linearising needs at least 2"),
    (nn.Sequential(nn.Linear(2, 3), nn.Dropout(), nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 2)), 1,
     r"model\[2\] is Linear where an activation is needed after the Linear model\[0\]"),
    (nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.ReLU(), nn.ReLU(), nn.Linear(3, 2)), 1,
     r"model\[2\] is ReLU where a Linear layer is needed \(it follows the activation model\[1\]\)"),
])
def test_split_mlp_errors(model, layer, match):
    with pytest.raises(ValueError, match=match):
        split_mlp(model, layer)


def test_split_mlp_rejects_non_sequential():
    with pytest.raises(TypeError, match=r"model must be an nn\.Sequential MLP \[Linear, "
                                        r"activation, \.\.\., Linear\]; got Linear"):
        split_mlp(nn.Linear(2, 2), 1)


def test_scaling_freezes_originals_and_keeps_the_function(tiny_mlp):
    model, X, y = tiny_mlp
    before = {k: v.clone() for k, v in model.state_dict().items()}
    scaled, report = scale_layer(model, 1, X, y, n_inserted=4, config=FAST, seed=0)
    assert report.ok, report.attempts
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])  # the user's model is untouched
    frozen = [*scaled.head.parameters(), *scaled.replaced.parameters(), *scaled.tail.parameters()]
    assert all(not p.requires_grad for p in frozen)
    assert all(p.requires_grad for p in scaled.inserts.parameters())
    assert scaled.n_inserted == 4 and scaled.n_states == 6 and len(scaled.stages) == 6
    original_acc = float((model(X).argmax(1) == y).float().mean())
    assert report.agreement >= original_acc - 0.005


def test_identity_init_starts_at_the_original_function(tiny_mlp):
    model, X, _ = tiny_mlp
    untrained = dataclasses.replace(FAST, epochs=1, lr=1e-12)
    scaled, _ = scale_layer(model, 2, X, n_inserted=10, init="identity", config=untrained,
                            retries=0)
    with torch.no_grad():
        start = scaled.head(X)
        end = scaled.inserts(start)
    # W = I + 0.001 noise on non-negative inputs: 10 blocks move the state by ~0.5% of its scale.
    assert (end - start).abs().max() < 0.01 * start.abs().max()


def test_dead_he_init_is_retried_then_falls_back(tiny_mlp):
    model, X, y = tiny_mlp
    no_training = TrainConfig(epochs=1, lr=1e-12, batch_size=600)
    _, report = scale_layer(model, 3, X, y, n_inserted=10, init="he", config=no_training,
                            retries=2, seed=3)
    # untrained He inserts scramble the state, so both He attempts miss the tolerance; the
    # untrained near-identity fallback keeps the state and passes
    assert [a["init"] for a in report.attempts] == ["he", "he", "identity"]
    assert [a["seed"] for a in report.attempts] == [3, 1003, 2003]
    assert report.ok and report.init == "identity"
    assert max(a["agreement"] for a in report.attempts[:2]) < report.attempts[2]["agreement"]


def test_retries_are_judged_on_the_judge_points(tiny_mlp):
    model, X, y = tiny_mlp
    Xj, yj = make_yinyang(300, seed=9)  # points the inserts never see
    scaled, report = scale_layer(model, 3, X, y, n_inserted=10, init="identity", config=FAST,
                                 retries=0, seed=3, judge=(Xj, yj))
    assert report.attempts[0]["agreement"] == accuracy(scaled, Xj, yj) == report.agreement
    assert report.agreement != accuracy(scaled, X, y)


def test_scale_layer_input_errors(tiny_mlp):
    model, X, _ = tiny_mlp
    with pytest.raises(ValueError, match="X has 3 features but the model expects 2"):
        scale_layer(model, 1, torch.zeros(4, 3))
    with pytest.raises(ValueError, match=r"init='xavier' must be 'he' \(paper\) or 'identity'"):
        scale_layer(model, 1, X, init="xavier", config=FAST)
    with pytest.raises(ValueError, match=r"X contains 1 inf values"):
        scale_layer(model, 1, torch.tensor([[0.0, float("inf")]]))
