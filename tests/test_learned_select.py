"""Learned observables as a fit option: FitSpec, the staged `koopnet fit`, save/load and fold."""

import dataclasses
import json

import pytest
import torch

from koopnet.cli.main import main
from koopnet.dmd import DMD
from koopnet.fold import LearnedLift
from koopnet.hybrid import KoopmanHybrid
from koopnet.io.serialize import load_with_meta
from koopnet.lab.recipes import YINYANG_SCALING
from koopnet.learned import LearnedObservable
from koopnet.linearization import fit_hybrid
from koopnet.models import build_mlp
from koopnet.observables import TimeDelay
from koopnet.scaling import scale_layer
from koopnet.spec import FitSpec
from koopnet.trajectories import collect_trajectories

NO_TRAINING = dataclasses.replace(YINYANG_SCALING, epochs=1, lr=1e-12)

LEARNED = {"observable_kind": "learned", "latent_dims": 3, "n_steps": 5, "seed": 1}


def _relative_error(folded, hybrid, X, *, norm=False):
    """max |got - expected| / max |expected|; ``norm``: ||got - expected|| / ||expected||."""
    with torch.no_grad():
        expected, got = hybrid(X), folded(X)
    assert got.dtype == expected.dtype and got.shape == expected.shape
    if norm:
        return float(torch.linalg.norm(got - expected) / torch.linalg.norm(expected))
    return float((got - expected).abs().max() / expected.abs().max())


def test_fitspec_selects_the_learned_observable_with_its_options():
    spec = FitSpec(2, constant=True, **LEARNED)
    observable = spec.observable()
    assert type(observable) is LearnedObservable
    assert (observable.n_delays, observable.constant, observable.latent_dims,
            observable.n_steps, observable.seed) == (2, True, 3, 5, 1)
    assert spec.as_dict()["observable_kind"] == "learned"
    assert FitSpec(**spec.as_dict()) == spec  # what a results file records rebuilds the spec
    assert type(FitSpec(2).observable()) is TimeDelay
    # delay fits record the keys they recorded before learned observables existed
    assert set(FitSpec(2).as_dict()) == {"n_delays", "rank", "tikhonov", "constant", "pairing",
                                         "exact_rollout"}


@pytest.mark.parametrize(("changes", "message"), [
    ({"observable_kind": "rbf"}, "observable_kind='rbf' must be 'delay' or 'learned'"),
    ({"latent_dims": 0}, "latent_dims=0 must be >= 1"),
    ({"n_steps": -1}, "n_steps=-1 must be >= 0"),
])
def test_fitspec_refuses_bad_learned_options(changes, message):
    with pytest.raises(ValueError, match=message):
        FitSpec(1, **{**LEARNED, **changes})


@pytest.fixture(scope="module")
def widening():
    """Layer 1 of a 3-4-7-5-2 MLP with 4 inserts: the prefix states are padded 4 -> 7."""
    torch.manual_seed(2)
    X = 2 * torch.randn(200, 3)
    scaled, _ = scale_layer(build_mlp([3, 4, 7, 5, 2]), 1, X, n_inserted=4,
                            config=NO_TRAINING, init="he")
    return scaled, X


@pytest.mark.parametrize("encoder_input", ["delay", "state"])
@pytest.mark.parametrize(("h", "constant"), [(0, False), (2, True), (4, False)])
def test_folded_learned_hybrid_equals_the_hybrid_and_exports(widening, h, constant,
                                                              encoder_input):
    scaled, X = widening
    states = collect_trajectories(scaled, X).states
    observable = LearnedObservable(h, constant=constant, latent_dims=3, n_steps=5,
                                   encoder_input=encoder_input).fit(states)
    dmd = DMD(rank=0.999).fit(observable.transform(states))
    probe = 2 * torch.randn(300, 3)
    # the map applied in float64: the folded net computes the same function, up to the order
    # of the float64 sums
    exact = KoopmanHybrid.from_dmd(scaled, observable, dmd, compute_dtype=torch.float64)
    assert _relative_error(exact.eval().fold(), exact, probe) < 1e-12
    # in float32 the two nets are two roundings of it (the map's GEMM reads D or (h+1) w + r
    # inputs): equal within 1e-6 relative (Frobenius)
    hybrid = KoopmanHybrid.from_dmd(scaled, observable, dmd).eval()
    folded = hybrid.fold()
    assert isinstance(folded.lift, LearnedLift)
    assert list(dict(folded.named_children()))[-3:] == ["lift", "map", "tail"]
    assert _relative_error(folded, hybrid, probe, norm=True) < 1e-6
    with torch.no_grad():  # the folded net does not change with the hybrid it came from
        before = folded(probe)
        next(hybrid.observable.psi_.parameters()).add_(1.0)
        assert torch.equal(folded(probe), before)
    exported = torch.export.export(folded, (probe[:8],))
    assert torch.allclose(exported.module()(probe[:8]), folded(probe[:8]))


def test_folded_learned_map_reads_the_latent_columns(widening):
    """A map that ignores psi would pass the equality test only if psi's columns were zero."""
    scaled, X = widening
    hybrid = fit_hybrid(scaled, X, spec=FitSpec(1, rank=0.999, **LEARNED)).eval()
    folded = hybrid.fold(factored=False)
    latent = hybrid.observable.latent_dims_
    assert folded.map.in_features == 2 * scaled.width + latent
    assert float(folded.map.weight[:, -latent:].abs().max()) > 0


@pytest.fixture(scope="module")
def scale_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("staged")
    assert main(["--quiet", "train", "--dataset", "yinyang", "--widths", "2,6,6,2",
                 "--epochs", "2", "--batch-size", "512", "--out", str(root / "train")]) == 0
    assert main(["--quiet", "scale", str(root / "train"), "--layer", "1", "--n-inserted", "3",
                 "--epochs", "30", "--init", "identity", "--out", str(root / "scale")]) == 0
    return root / "scale"


def test_staged_fit_with_a_learned_observable_saves_and_evaluates(scale_dir, tmp_path, capsys):
    fit = tmp_path / "fit"
    assert main(["--quiet", "fit", str(scale_dir), "--n-delays", "1", "--observable", "learned",
                 "--latent-dims", "4", "--learned-steps", "3", "--learned-seed", "2",
                 "--out", str(fit)]) == 0
    capsys.readouterr()
    hybrid, meta = load_with_meta(fit, "hybrid")
    assert type(hybrid.observable) is LearnedObservable
    assert hybrid.observable.latent_dims_ == 4 and hybrid.observable.seed == 2
    assert meta["config"]["fit"]["observable_kind"] == "learned"
    assert meta["config"]["fit"]["n_steps"] == 3
    assert _relative_error(hybrid.fold(), hybrid, torch.randn(50, 2), norm=True) < 1e-6
    assert main(["--quiet", "evaluate", str(fit), "--out", str(tmp_path / "ev")]) == 0
    metrics = json.loads(capsys.readouterr().out)["metrics"]
    assert 0.0 <= metrics["val"]["hybrid"] <= 1.0


@pytest.mark.parametrize(("extra", "message"), [
    (["--latent-dims", "4"], "--latent-dims apply to --observable learned only; add "
                             "--observable learned or leave them out."),
    (["--observable", "learned", "--latent-dims", "99"], "latent_dims=99 exceeds 4x the layer "
                                                         "width"),
    (["--observable", "mystery"], "argument --observable: invalid choice: 'mystery'"),
])
def test_staged_fit_refuses_bad_learned_options_in_one_line(scale_dir, tmp_path, capsys, extra,
                                                             message):
    code = main(["--quiet", "fit", str(scale_dir), "--n-delays", "1", *extra,
                 "--out", str(tmp_path / "fit")])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_streamed_fit_refuses_a_learned_observable(tmp_path, capsys):
    from safetensors.torch import save_file

    path = tmp_path / "t.safetensors"
    save_file({"states": torch.randn(10, 4, 3)}, str(path))
    code = main(["--quiet", "fit", "--trajectories", str(path), "--n-delays", "1",
                 "--observable", "learned", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "--observable learned needs a scale folder" in err


def test_a_learned_fit_may_ask_for_a_rank_up_to_its_lifted_width(widening):
    """The rank limit counts psi's r outputs: delays give 2 x 7 = 14 features, psi 3 more."""
    scaled, X = widening
    spec = {**LEARNED, "n_delays": 1}
    hybrid = fit_hybrid(scaled, X, spec=FitSpec(rank=17, **spec))
    assert hybrid.dmd_.rank_ <= 17
    with pytest.raises(ValueError, match=r"^rank=18 exceeds what the data supports: min\(D=17,"):
        fit_hybrid(scaled, X, spec=FitSpec(rank=18, **spec))


def test_psi_follows_a_koopman_hybrid_to_another_device(widening):
    """As for depth hybrids: `.to(device)` moves the hybrid's own psi (meta stands in for a
    GPU), never the observable it was built from."""
    scaled, X = widening
    states = collect_trajectories(scaled, X).states
    observable = LearnedObservable(1, latent_dims=3, n_steps=2).fit(states)
    hybrid = KoopmanHybrid.from_dmd(scaled, observable, DMD().fit(observable.transform(states)))
    hybrid.to("meta")
    assert next(hybrid.observable.psi_.parameters()).device.type == "meta"
    assert hybrid.observable.mean_.device.type == "meta"
    assert next(observable.psi_.parameters()).device.type == "cpu"
