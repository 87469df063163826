"""Depth trajectories lifted by a learned observable: ``linearize_depth`` with
``FitSpec(observable_kind="learned")``, its artifact round trip, ``koopnet depth-fit
--observable learned`` and the refusal on the streamed route (psi needs the states themselves).

The network is tests/depth_factory.py's tiny residual classifier (width 6, 4 blocks), so the
saved hybrid can be rebuilt from its factory; psi trains for a few steps only (seconds).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import safetensors.torch
import torch

from koopnet import depth
from koopnet.cli import main
from koopnet.depth import DepthHybrid, collect_depth_states, linearize_depth
from koopnet.io.depth import load_depth_files, load_depth_hybrid, save_depth_hybrid
from koopnet.learned import LearnedObservable
from koopnet.spec import FitSpec

HERE = Path(__file__).resolve().parent
BLOCKS = ["blocks.0", "blocks.1", "blocks.2", "blocks.3"]  # T = 5 depth states
WIDTH, LATENT, STEPS = 6, 3, 15


def learned_spec(n_delays: int = 1, constant: bool = False) -> FitSpec:
    return FitSpec(n_delays, constant=constant, exact_rollout=True, observable_kind="learned",
                   latent_dims=LATENT, n_steps=STEPS)


@pytest.fixture(autouse=True)
def _factory_importable(monkeypatch):
    monkeypatch.syspath_prepend(str(HERE))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The tiny residual classifier, its weights file W and inputs X [96, 4]."""
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(HERE))
        from depth_factory import write_tiny
    return write_tiny(tmp_path_factory.mktemp("depth_learned"), seed=3, n=96)


@pytest.mark.parametrize(("n_delays", "constant"), [(0, False), (1, True), (2, False)])
def test_a_learned_spec_lifts_to_delays_plus_psi(files, n_delays, constant):
    model, X = files["model"], files["X_t"]
    hybrid = linearize_depth(model, BLOCKS, X, spec=learned_spec(n_delays, constant))
    assert isinstance(hybrid.observable, LearnedObservable)
    assert hybrid.observable.training_loss_ is not None  # psi was trained, not left at init
    # lifted g = [s_h, ..., s_0, psi, (1)]: W (h + 1) + r (+ 1) features
    expected = WIDTH * (n_delays + 1) + LATENT + int(constant)
    assert hybrid.dmd_.n_features_in_ == hybrid.observable.n_output_features_ == expected
    assert hybrid.linear_map.shape == (WIDTH, expected)
    assert (hybrid.n_delays, hybrid.linear_steps) == (n_delays, len(BLOCKS) - n_delays)
    with torch.no_grad():
        logits = hybrid(X[:10])
    assert logits.shape == (10, 3) and bool(torch.isfinite(logits).all())


def test_psi_is_trained_on_all_the_states_not_on_a_probe(files):
    """The same hybrid as one built by hand from every sample's states (bit for bit: the same
    float64 states, the same seeded training); psi fitted on two samples differs."""
    model, X = files["model"], files["X_t"]
    spec = learned_spec()
    hybrid = linearize_depth(model, BLOCKS, X, spec=spec)
    states = collect_depth_states(model, BLOCKS, X).to(torch.float64)  # [96, 5, 6]
    observable = spec.observable().fit(states)
    by_hand = DepthHybrid(model, BLOCKS, observable, spec.dmd().fit(observable.transform(states)))
    probe = spec.observable().fit(states[:2])
    with torch.no_grad():
        assert torch.equal(hybrid(X), by_hand.eval()(X))
        assert not torch.equal(hybrid.observable.mean_, probe.mean_)


def test_a_learned_spec_is_refused_where_states_would_be_streamed(files, monkeypatch):
    model, X = files["model"], files["X_t"]
    monkeypatch.setattr(depth, "_IN_MEMORY_BYTES", 4 * 2**10)  # 4 KiB: 21 samples of 5 x 6
    with pytest.raises(ValueError, match=(
            r"^spec\.observable_kind='learned' trains psi on all the depth states at once, "
            r"which the streamed fit \(moments only\) never holds: the states of these 96 "
            r"samples take 0\.0 MiB, over the 0\.0 MiB fitted in memory; pass at most 17 "
            r"samples, or pass FitSpec\(\.\.\., observable_kind='delay'\)\.$")):
        linearize_depth(model, BLOCKS, X, spec=learned_spec())
    linearize_depth(model, BLOCKS, X[:17], spec=learned_spec())  # the advice holds
    linearize_depth(model, BLOCKS, X, n_delays=1)  # delays alone stream


def test_a_learned_depth_hybrid_round_trips_through_its_artifact(files, tmp_path):
    model, X = files["model"], files["X_t"]
    hybrid = linearize_depth(model, BLOCKS, X, spec=learned_spec(constant=True))
    path = save_depth_hybrid(hybrid, tmp_path / "h", factory="depth_factory:make_tiny",
                             weights=files["W"])
    again, _, meta = load_depth_files(path.parent)
    entry = meta["config"]["observable"]
    assert entry["type"] == "learned" and entry["settings"]["latent_dims"] == LATENT
    assert entry["psi"]["type"] == "sequential"  # rebuilt from JSON, never unpickled
    stored = safetensors.torch.load_file(path.with_suffix(".safetensors"))
    assert {"observable.mean", "observable.std", "observable.psi.0.weight"} <= set(stored)
    assert isinstance(again.observable, LearnedObservable)
    with torch.no_grad():  # the same psi weights, map and blocks: the same logits exactly
        assert torch.equal(again(X), hybrid(X))


def test_edited_psi_weights_or_settings_are_refused_by_the_hashes(files, tmp_path):
    from koopnet.io.artifacts import ArtifactError

    hybrid = linearize_depth(files["model"], BLOCKS, files["X_t"], spec=learned_spec())
    save = functools.partial(save_depth_hybrid, hybrid, factory="depth_factory:make_tiny",
                             weights=files["W"])
    weights = save(tmp_path / "a").with_suffix(".safetensors")
    tensors = safetensors.torch.load_file(weights)
    tensors["observable.psi.0.weight"] = tensors["observable.psi.0.weight"] + 1
    safetensors.torch.save_file(tensors, weights)
    with pytest.raises(ArtifactError, match="does not match the hash recorded"):
        load_depth_hybrid(weights.parent)
    settings = save(tmp_path / "b")
    meta = json.loads(settings.read_text())
    meta["config"]["observable"]["settings"]["activation"] = "relu"
    settings.write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match="edited"):
        load_depth_hybrid(settings.parent)


def test_cli_depth_fit_with_a_learned_observable_then_evaluate(files, tmp_path, capsys):
    out = tmp_path / "fit"
    assert main(["--quiet", "depth-fit", "--model-factory", "depth_factory:make_tiny",
                 "--weights", files["W"], "--blocks", ",".join(BLOCKS), "--data", files["X"],
                 "--n-delays", "1", "--observable", "learned", "--latent-dims", str(LATENT),
                 "--learned-steps", str(STEPS), "--out", str(out)]) == 0
    line = json.loads(capsys.readouterr().out)
    assert line["n_features"] == 2 * WIDTH + LATENT
    fit = json.loads((out / "depth_hybrid.json").read_text())["config"]["fit"]
    assert (fit["observable_kind"], fit["latent_dims"], fit["n_steps"], fit["seed"]) == (
        "learned", LATENT, STEPS, 0)
    memory = linearize_depth(files["model"], BLOCKS, files["X_t"], spec=learned_spec())
    with torch.no_grad():
        assert torch.equal(load_depth_hybrid(out)(files["X_t"]), memory(files["X_t"]))
    assert main(["--quiet", "depth-evaluate", str(out), "--data", files["X"]]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["fit"]["observable_kind"] == "learned"
    assert results["metrics"]["metric"] == "agreement_with_original"
    assert 0.0 <= results["metrics"]["hybrid"] <= 1.0


def test_cli_learned_options_without_a_learned_observable_are_one_line(files, tmp_path, capsys):
    capsys.readouterr()
    assert main(["--quiet", "depth-fit", "--model-factory", "depth_factory:make_tiny",
                 "--weights", files["W"], "--blocks", ",".join(BLOCKS), "--data", files["X"],
                 "--latent-dims", "3", "--out", str(tmp_path / "fit")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("koopnet: error: --latent-dims apply to --observable learned only; add "
                   "--observable learned or leave them out.")
    assert not (tmp_path / "fit").exists()


def _devices(observable) -> set[str]:
    return {p.device.type for p in observable.psi_.parameters()} | {
        observable.mean_.device.type, observable.std_.device.type}


def test_psi_follows_the_hybrid_to_another_device(files):
    """psi is not a submodule: `.to(device)` must take it along (the meta device stands in for
    a GPU), and only the hybrid's own copy moves, never the observable it was built from."""
    model, X = files["model"], files["X_t"]
    states = collect_depth_states(model, BLOCKS, X).to(torch.float64)
    observable = learned_spec().observable().fit(states)
    hybrid = DepthHybrid(model, BLOCKS, observable, learned_spec().dmd().fit(
        observable.transform(states)))
    hybrid.to("meta")
    assert _devices(hybrid.observable) == {"meta"} and hybrid.linear_map.device.type == "meta"
    assert _devices(observable) == {"cpu"}
