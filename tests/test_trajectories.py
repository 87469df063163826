import dataclasses

import pytest
import torch

from koopnet.lab.recipes import YINYANG_SCALING
from koopnet.scaling import scale_layer
from koopnet.trajectories import PAD_VALUE, collect_trajectories, pad_states

NO_TRAINING = dataclasses.replace(YINYANG_SCALING, epochs=1, lr=1e-12)


def test_states_follow_the_network_and_padding_is_documented(tiny_mlp):
    model, X, _ = tiny_mlp
    scaled, _ = scale_layer(model, 1, X, n_inserted=10, config=NO_TRAINING)
    trajectories = collect_trajectories(scaled, X, batch_size=128)  # several batches
    assert trajectories.states.shape == (600, 12, 8)
    assert trajectories.widths == [8] * 11 + [6]
    states = trajectories.states
    with torch.no_grad():
        assert torch.allclose(states[:, 0], scaled.head(X))
        assert torch.allclose(states[:, 1], scaled.inserts[0](scaled.head(X)))
        assert torch.allclose(states[:, -1, :6], scaled.replaced(scaled.inserts(scaled.head(X))))
    assert torch.all(states[:, -1, 6:] == -1.0) and PAD_VALUE == -1.0  # the paper's padding
    assert trajectories.concatenated().shape == (1, 600 * 12, 8)
    assert not any(stage._forward_hooks for stage in scaled.stages)  # hooks removed


def test_pad_states_widens_every_state():
    out = pad_states([torch.zeros(2, 3), torch.ones(2, 5)], pad_value=-1)
    assert out.shape == (2, 2, 5) and torch.all(out[:, 0, 3:] == -1)


def test_collect_errors(tiny_mlp):
    model, X, _ = tiny_mlp
    scaled, _ = scale_layer(model, 1, X, n_inserted=1, config=NO_TRAINING)
    with pytest.raises(ValueError, match="X has 5 features but the model expects 2"):
        collect_trajectories(scaled, torch.zeros(3, 5))
    with pytest.raises(ValueError, match=r"X is empty \(shape \(0, 2\)\)"):
        collect_trajectories(scaled, torch.zeros(0, 2))
    with pytest.raises(ValueError, match="batch_size=0 must be >= 1"):
        collect_trajectories(scaled, X, batch_size=0)
