"""LearnedObservable: the dictionary interface, determinism, a linear system, save/load."""

from __future__ import annotations

import pytest
import torch

from koopnet._checks import NotFittedError
from koopnet.dmd import DMD
from koopnet.hybrid import KoopmanHybrid
from koopnet.io.serialize import load_hybrid, save_hybrid
from koopnet.learned import LearnedObservable
from koopnet.models import TrainConfig
from koopnet.observables import TimeDelay
from koopnet.scaling import scale_layer
from koopnet.trajectories import collect_trajectories

FAST = {"n_steps": 20, "latent_dims": 3}


def test_interface_contract():
    states = torch.randn(6, 5, 4)
    observable = LearnedObservable(1, constant=True, **FAST)
    assert observable.fit(states) is observable
    lifted = observable.transform(states)
    assert lifted.shape == (6, 4, 4 * 2 + 3 + 1)
    assert observable.n_output_features_ == 12 and observable.n_delays_ == 1
    torch.testing.assert_close(lifted[..., :8], TimeDelay(1).fit_transform(states))
    assert torch.equal(lifted[..., -1], torch.ones(6, 4))
    readout = observable.readout(3)
    assert readout.shape == (3, 12)
    torch.testing.assert_close(lifted[..., :3].double(), lifted.double() @ readout.T)
    names = observable.feature_names()
    assert names[0] == "x0(t)" and names[8] == "psi0" and names[-1] == "1"
    assert observable.nonlinear_macs() == 8 * 6 + 6 * 3 == observable.nonlinear_macs(4)


def test_state_encoder_costs_one_block():
    """psi = tanh(s_t A + b) with r = W reads only the newest state: W^2 multiply-adds, the
    cost of one inserted block, whatever h is."""
    states = torch.randn(6, 7, 4)
    observable = LearnedObservable(3, encoder_input="state", hidden=0, n_steps=5)
    assert observable.nonlinear_macs(4) == 16
    lifted = observable.fit_transform(states)
    assert lifted.shape == (6, 4, 4 * 4 + 4)
    assert [type(m).__name__ for m in observable.psi_] == ["Linear", "Tanh"]
    assert observable.psi_[0].in_features == 4


def test_not_fitted_is_refused():
    with pytest.raises(NotFittedError, match="LearnedObservable instance is not fitted yet"):
        LearnedObservable(1).transform(torch.randn(2, 3, 4))
    with pytest.raises(NotFittedError, match="not fitted yet"):
        LearnedObservable(1).readout()


def test_seeded_fit_is_deterministic():
    states = torch.randn(8, 6, 3)
    first = LearnedObservable(2, seed=3, **FAST).fit(states).transform(states)
    torch.manual_seed(123)  # the global RNG must not matter
    again = LearnedObservable(2, seed=3, **FAST).fit(states).transform(states)
    other = LearnedObservable(2, seed=4, **FAST).fit(states).transform(states)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_linear_system_is_predicted_as_well_as_by_delays(linear_system):
    """On x_{t+1} = A x_t the state alone is a Koopman-invariant subspace: the learned lifting
    keeps it, so its DMD predicts the last state as accurately as the delay DMD's."""
    _, _, states = linear_system  # [20, 15, 4]
    errors = {}
    for name, observable in (("delay", TimeDelay(1)), ("learned", LearnedObservable(1, **FAST))):
        lifted = observable.fit_transform(states)
        dmd = DMD(tikhonov=0.0, exact_rollout=True).fit(lifted)
        m = lifted.shape[1] - 1
        predicted = lifted[:, 0].double() @ dmd.transition(m, observable.readout(4)).T
        errors[name] = float((predicted - states[:, -1]).norm() / states[:, -1].norm())
    assert errors["delay"] < 1e-8
    assert errors["learned"] < 1e-6


@pytest.fixture(scope="module")
def scaled_states(tiny_mlp):
    model, X, y = tiny_mlp
    torch.manual_seed(0)
    scaled, _ = scale_layer(model, 2, X, y, n_inserted=4, init="identity",
                            config=TrainConfig(epochs=3, batch_size=200, lr=1e-2), retries=0)
    return scaled, X, collect_trajectories(scaled, X).states


@pytest.mark.parametrize("settings", [{}, {"encoder_input": "state", "hidden": 0}])
def test_hybrid_runs_and_round_trips_bit_identically(scaled_states, tmp_path, settings):
    scaled, X, states = scaled_states
    observable = LearnedObservable(1, constant=True, **FAST, **settings).fit(states)
    dmd = DMD(tikhonov=1e-6, exact_rollout=True).fit(observable.transform(states))
    hybrid = KoopmanHybrid.from_dmd(scaled, observable, dmd)
    with torch.no_grad():
        logits = hybrid(X)
    assert logits.shape == (len(X), 2) and torch.isfinite(logits).all()
    save_hybrid(hybrid, tmp_path)
    loaded = load_hybrid(tmp_path)
    assert isinstance(loaded.observable, LearnedObservable)
    assert loaded.observable.encoder_input == observable.encoder_input
    with torch.no_grad():
        assert torch.equal(loaded(X), logits)
    assert loaded.observable.nonlinear_macs() == hybrid.observable.nonlinear_macs()


def test_time_delay_hybrid_file_is_unchanged(tiny_mlp, tmp_path):
    """A TimeDelay hybrid's JSON entry keeps its old form and its file holds no extra tensors."""
    import json

    from koopnet.linearization import fit_hybrid

    model, X, y = tiny_mlp
    scaled, _ = scale_layer(model, 2, X, y, n_inserted=3, init="identity",
                            config=TrainConfig(epochs=2, batch_size=200, lr=1e-2), retries=0)
    save_hybrid(fit_hybrid(scaled, X, n_delays=1), tmp_path)
    entry = json.loads((tmp_path / "hybrid.json").read_text())["config"]["observable"]
    assert entry == {"type": "time_delay", "n_delays": 1, "constant": False,
                     "n_features_in": entry["n_features_in"]}


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    ({"latent_dims": 17}, ValueError,
     r"latent_dims=17 exceeds 4x the layer width \(4 x 4 = 16\).*Lower latent_dims to <= 16"),
    ({"n_steps": -1}, ValueError, r"n_steps=-1 must be >= 0"),
    ({"n_steps": 2.5}, TypeError, r"n_steps=2.5 must be an integer"),
    ({"activation": "sigmoid"}, ValueError, r"activation='sigmoid' must be 'tanh' or 'relu'"),
    ({"horizon": 0}, ValueError, r"horizon=0 must be >= 1"),
    ({"lr": -1.0}, ValueError, r"lr=-1.0 must be a finite number >= 0.0"),
    ({"encoder_input": "latent"}, ValueError,
     r"encoder_input='latent' must be 'delay' or 'state'"),
    ({"hidden": -1}, ValueError, r"hidden=-1 must be >= 0"),
])
def test_bad_parameters_are_refused(kwargs, error, match):
    with pytest.raises(error, match=match):
        LearnedObservable(1, **kwargs).fit(torch.randn(3, 5, 4))


def test_too_many_delays_are_refused():
    with pytest.raises(ValueError, match=r"n_delays=4 leaves 1 window per trajectory"):
        LearnedObservable(4, n_steps=1).fit(torch.randn(3, 5, 4))
