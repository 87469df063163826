"""Scaling variants (koopnet.scaling.ScalingSpec): residual and weight-tied inserts, the step and
DMD-residual penalties, their save/load round trip, and that the default is the paper's scaling
bit for bit."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from koopnet.io.artifacts import ArtifactError
from koopnet.io.serialize import load_scaled, save_scaled
from koopnet.models import build_mlp, fit_minibatch
from koopnet.scaling import (
    DEFAULT_SCALING,
    ResidualBlock,
    ScalingSpec,
    make_inserts,
    scale_layer,
    split_mlp,
)
from koopnet.scaling_penalties import dmd_residual, step_penalty
from koopnet.trajectories import collect_trajectories

FAST = dataclasses.replace(DEFAULT_SCALING, epochs=15)


@pytest.fixture(scope="module")
def problem():
    torch.manual_seed(0)
    model = build_mlp([2, 8, 6, 4, 3, 2])
    X = torch.rand(200, 2)
    return model, X, (X[:, 0] > X[:, 1]).long()


def _scale(problem, spec=None, n=4, **kw):
    model, X, y = problem
    return scale_layer(model, 2, X, y, n_inserted=n, config=FAST, seed=3, retries=0,
                       spec=spec, **kw)[0]


def test_default_spec_is_the_plain_run_bit_for_bit(problem):
    model, X, _ = problem
    scaled = _scale(problem)
    explicit = _scale(problem, ScalingSpec("plain"))
    head, replaced, _ = split_mlp(model, 2)  # the manual plain run: same draws, same training
    inserts = make_inserts(6, 4, head[-1], "identity", torch.Generator().manual_seed(3))
    with torch.no_grad():
        a = head(X)
        b = replaced(a)
    for p in replaced.parameters():
        p.requires_grad_(False)
    fit_minibatch(nn.Sequential(inserts, replaced), nn.functional.huber_loss, a, b, FAST,
                  seed=3)
    for mine in (scaled, explicit):
        assert mine.spec == ScalingSpec()
        manual = inserts.state_dict()
        assert all(torch.equal(mine.inserts.state_dict()[k], manual[k]) for k in manual)


def test_residual_inserts_move_the_state_by_f(problem):
    scaled = _scale(problem, ScalingSpec("residual"))
    assert all(isinstance(b, ResidualBlock) for b in scaled.inserts)
    states = collect_trajectories(scaled, problem[1][:20]).states  # [20, 6, 6]
    for t, block in enumerate(scaled.inserts):
        with torch.no_grad():
            step = block.body(states[:, t])
        torch.testing.assert_close(states[:, t + 1] - states[:, t], step, rtol=0, atol=1e-6)


def test_residual_inserts_start_near_the_identity():
    inserts = make_inserts(5, 3, "relu", "he", torch.Generator().manual_seed(0), "residual")
    x = torch.rand(10, 5)
    assert (inserts(x) - x).abs().max() < 0.05


def test_tied_inserts_share_one_parameter_set_and_record_every_state(problem):
    scaled = _scale(problem, ScalingSpec("tied"))
    assert len(list(scaled.inserts.parameters())) == 2  # one weight, one bias
    assert all(b[0] is scaled.inserts[0][0] for b in scaled.inserts)
    states = collect_trajectories(scaled, problem[1][:20]).states
    assert states.shape[1] == 6  # one state per step, not one per hook on the shared block
    with torch.no_grad():
        torch.testing.assert_close(states[:, 2], scaled.inserts[0](states[:, 1]))


def _linear_trajectory(T=8, w=4, B=30):
    torch.manual_seed(1)
    A = torch.linalg.qr(torch.randn(w, w, dtype=torch.float64))[0] * 0.9  # norm 0.9
    s = [torch.randn(B, w, dtype=torch.float64)]
    for _ in range(T - 1):
        s.append(s[-1] @ A)
    return torch.stack(s, dim=1)


@pytest.mark.parametrize("steps, delays", [(1, 0), (4, 0), (1, 1), (3, 1)])
def test_dmd_residual_is_zero_on_a_linear_trajectory_and_differentiable(steps, delays):
    states = _linear_trajectory()
    assert dmd_residual(states, steps=steps, n_delays=delays, ridge=1e-12) < 1e-10
    noisy = (states + 0.1 * torch.randn_like(states)).requires_grad_(True)
    value = dmd_residual(noisy, steps=steps, n_delays=delays)
    value.backward()
    assert value > 1e-4 and torch.isfinite(noisy.grad).all() and noisy.grad.abs().sum() > 0


def test_multi_step_residual_stays_bounded_on_a_growing_trajectory():
    states = _linear_trajectory() * 3.0 ** torch.arange(8.0, dtype=torch.float64)[None, :, None]
    assert torch.isfinite(dmd_residual(states, steps=7))


def test_step_penalty_is_zero_when_the_state_does_not_move_and_differentiable():
    still = torch.rand(5, 1, 3).repeat(1, 6, 1)
    assert step_penalty(still) == 0
    moving = torch.rand(5, 6, 3, requires_grad=True)
    step_penalty(moving).backward()
    assert moving.grad.abs().sum() > 0


@pytest.mark.parametrize("spec", [ScalingSpec(step_penalty=0.1),
                                  ScalingSpec(dmd_penalty=0.1, dmd_steps=3, dmd_delays=1),
                                  ScalingSpec("residual", dmd_penalty=0.1),
                                  ScalingSpec("tied", step_penalty=0.1)])
def test_penalised_scaling_trains_and_differs_from_plain(problem, spec):
    scaled = _scale(problem, spec)
    plain = _scale(problem, ScalingSpec(spec.kind))
    assert scaled.spec == spec
    assert any(not torch.equal(p, q) for p, q in zip(scaled.inserts.parameters(),
                                                     plain.inserts.parameters(), strict=True))


@pytest.mark.parametrize("kind", ["plain", "residual", "tied"])
def test_save_load_round_trip_is_bit_identical(problem, tmp_path, kind):
    spec = ScalingSpec(kind, step_penalty=0.01 if kind == "tied" else 0.0)
    scaled = _scale(problem, spec)
    save_scaled(scaled, tmp_path)
    loaded = load_scaled(tmp_path)
    assert loaded.spec == spec and len(loaded.inserts) == 4
    X = problem[1]
    with torch.no_grad():
        assert torch.equal(loaded(X), scaled(X))
    assert torch.equal(collect_trajectories(loaded, X).states,
                       collect_trajectories(scaled, X).states)
    if kind == "tied":
        assert all(b[0] is loaded.inserts[0][0] for b in loaded.inserts)
        assert len(list(loaded.inserts.parameters())) == 2


def test_tied_file_with_differing_copies_is_refused(problem, tmp_path):
    import json

    import safetensors.torch

    from koopnet.io.artifacts import file_sha256

    save_scaled(_scale(problem, ScalingSpec("tied")), tmp_path)
    path = tmp_path / "scaled.safetensors"
    tensors = safetensors.torch.load_file(path)
    tensors["inserts.1.0.weight"] = tensors["inserts.1.0.weight"] + 1
    safetensors.torch.save_file(tensors, path)
    meta = json.loads((tmp_path / "scaled.json").read_text())
    meta["sha256"] = file_sha256(path)
    (tmp_path / "scaled.json").write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match=r"belong to one tied parameter but differ"):
        load_scaled(tmp_path)


@pytest.mark.parametrize("kwargs, error, message", [
    ({"kind": "deep"}, ValueError, r"kind='deep' must be 'plain' or 'residual' or 'tied'"),
    ({"step_penalty": -1.0}, ValueError, r"step_penalty=-1.0 must be a finite number >= 0"),
    ({"dmd_penalty": float("nan")}, ValueError, r"dmd_penalty=nan must be a finite number"),
    ({"dmd_penalty": "big"}, TypeError, r"dmd_penalty='big' must be a real number"),
    ({"dmd_steps": 0}, ValueError, r"dmd_steps=0 must be"),
    ({"dmd_delays": -1}, ValueError, r"dmd_delays=-1 must be"),
])
def test_bad_specs_are_refused(kwargs, error, message):
    with pytest.raises(error, match=message):
        ScalingSpec(**kwargs)


def test_roll_out_longer_than_the_trajectory_is_refused(problem):
    with pytest.raises(ValueError, match=r"dmd_delays=1 \+ dmd_steps=5 needs at least 7 states, "
                                         r"but 4 inserted blocks give 6"):
        _scale(problem, ScalingSpec(dmd_penalty=1.0, dmd_steps=5, dmd_delays=1))


def test_spec_must_be_a_scaling_spec(problem):
    with pytest.raises(TypeError, match=r"spec must be a ScalingSpec; got dict"):
        _scale(problem, {"kind": "tied"})
