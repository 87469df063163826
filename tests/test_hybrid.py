import dataclasses

import pytest
import torch

from koopnet.dmd import DMD
from koopnet.hybrid import KoopmanHybrid
from koopnet.lab.recipes import YINYANG_SCALING
from koopnet.models import build_mlp
from koopnet.observables import TimeDelay
from koopnet.scaling import scale_layer
from koopnet.trajectories import collect_trajectories

NO_TRAINING = dataclasses.replace(YINYANG_SCALING, epochs=1, lr=1e-12)


def _linear_case(n_inserted: int):
    model = build_mlp([3, 7, 6, 5, 2], activation="identity")
    X = torch.randn(400, 3)
    scaled, _ = scale_layer(model, 1, X, n_inserted=n_inserted, config=NO_TRAINING)
    return scaled, X


# n_delays = n_inserted: the one linear step left is a single affine map (fewer delays would
# leave several different affine steps, which one operator cannot do)
@pytest.mark.parametrize(("n_inserted", "n_delays"), [(0, 0), (3, 3), (10, 10)])
def test_linear_network_is_reproduced_exactly(n_inserted, n_delays):
    scaled, X = _linear_case(n_inserted)
    trajectories = collect_trajectories(scaled, X)
    # Identity activations: every step is affine, so the constant observable makes it exact.
    observable = TimeDelay(n_delays, constant=True).fit(trajectories.states)
    dmd = DMD().fit(observable.transform(trajectories.states))
    hybrid = KoopmanHybrid.from_dmd(scaled, observable, dmd)
    # Float32 network, map fitted in float64 and applied in float32: float32 rounding only.
    assert torch.allclose(hybrid(X), scaled(X), atol=1e-5)
    assert hybrid.linear_steps == n_inserted + 1 - n_delays
    assert hybrid.nonlinear_blocks == n_delays


def test_map_precision_follows_the_network_unless_asked(tiny_mlp):
    model, X, y = tiny_mlp
    scaled, _ = scale_layer(model, 2, X, y, n_inserted=10, config=NO_TRAINING, init="identity")
    trajectories = collect_trajectories(scaled, X)
    observable = TimeDelay(3).fit(trajectories.states)
    dmd = DMD(rank=0.999).fit(observable.transform(trajectories.states))
    single = KoopmanHybrid.from_dmd(scaled, observable, dmd)
    double = KoopmanHybrid.from_dmd(scaled, observable, dmd, compute_dtype=torch.float64)
    assert single.linear_map.dtype == torch.float64  # stored as fitted
    assert torch.allclose(single(X), double(X), atol=1e-5)
    assert single(X).dtype == double(X).dtype == X.dtype


def test_forward_states_equals_forward(tiny_mlp):
    model, X, y = tiny_mlp
    scaled, _ = scale_layer(model, 2, X, y, n_inserted=10, config=NO_TRAINING, init="identity")
    trajectories = collect_trajectories(scaled, X)
    for h in (0, 4):
        observable = TimeDelay(h).fit(trajectories.states)
        dmd = DMD(rank=0.999).fit(observable.transform(trajectories.states))
        hybrid = KoopmanHybrid.from_dmd(scaled, observable, dmd)
        assert torch.allclose(hybrid(X), hybrid.forward_states(trajectories.states), atol=1e-6)
        lifted = observable.transform(trajectories.states[:, :h + 1])[:, -1]  # g_h, [B, D]
        assert torch.equal(hybrid.forward_lifted(lifted),
                           hybrid.forward_states(trajectories.states))
        assert hybrid.linear_map.shape == (scaled.out_width, observable.n_output_features_)
        assert hybrid(X).dtype == X.dtype


def test_too_many_delays_is_refused(tiny_mlp):
    model, X, _ = tiny_mlp
    scaled, _ = scale_layer(model, 1, X, n_inserted=2, config=NO_TRAINING)
    trajectories = collect_trajectories(scaled, X)
    observable = TimeDelay(2).fit(trajectories.states)
    dmd = DMD().fit(TimeDelay(1).fit_transform(trajectories.states))
    with pytest.raises(ValueError, match=r"n_delays=3 needs trajectories of at least 5 states; "
                                         r"got T=4"):
        KoopmanHybrid.from_dmd(scaled, TimeDelay(3).fit(trajectories.states), dmd)
    del observable
