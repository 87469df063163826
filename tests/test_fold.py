"""KoopmanHybrid.fold: a plain nn.Sequential with the hybrid's logits, exportable."""

import dataclasses

import pytest
import torch
from torch import nn

from koopnet import fold as fold_module
from koopnet.dmd import DMD
from koopnet.fold import linear_layers, multiply_adds, window_map
from koopnet.hybrid import KoopmanHybrid
from koopnet.lab.recipes import YINYANG_SCALING
from koopnet.models import build_mlp
from koopnet.observables import Polynomial, TimeDelay
from koopnet.scaling import scale_layer
from koopnet.trajectories import collect_trajectories

NO_TRAINING = dataclasses.replace(YINYANG_SCALING, epochs=1, lr=1e-12)
N_INSERTED = 6


@pytest.fixture(scope="module")
def widening():
    """Layer 1 of a 3-4-7-5-2 ReLU MLP with 6 He-normal inserts: the replaced layer widens
    4 -> 7, so the prefix states are padded; random inputs and their trajectories."""
    torch.manual_seed(2)
    X = 2 * torch.randn(300, 3)
    scaled, _ = scale_layer(build_mlp([3, 4, 7, 5, 2]), 1, X, n_inserted=N_INSERTED,
                            config=NO_TRAINING, init="he")
    return scaled, X, collect_trajectories(scaled, X).states


def _hybrid(scaled, states, h, *, constant=False, rank=0.999, **kwargs):
    """A hybrid of a well-conditioned fit (rank 0.999: the constant padding columns are not
    fitted)."""
    observable = TimeDelay(h, constant=constant).fit(states)
    dmd = DMD(rank=rank).fit(observable.transform(states))
    return KoopmanHybrid.from_dmd(scaled, observable, dmd, **kwargs).eval()


def _relative_error(folded, hybrid, X):
    with torch.no_grad():
        expected, got = hybrid(X), folded(X)
    assert got.dtype == expected.dtype and got.shape == expected.shape
    return float((got - expected).abs().max() / expected.abs().max())


@pytest.mark.parametrize("constant", [False, True])
@pytest.mark.parametrize("h", [0, 1, 5, N_INSERTED])
@pytest.mark.parametrize("factored", [None, False, True])
def test_folded_equals_hybrid_with_padding(widening, h, constant, factored):
    scaled, _, states = widening
    hybrid = _hybrid(scaled, states, h, constant=constant)
    assert hybrid.observable.n_features_in_ == 7 > hybrid.width == 4  # prefix states padded
    probe = 3 * torch.randn(500, 3)  # not the fitting inputs
    assert _relative_error(hybrid.fold(factored=factored), hybrid, probe) < 1e-6


@pytest.mark.parametrize("h", [1, 5])
def test_ill_conditioned_map_agrees_in_double_precision(widening, h):
    # A full-rank fit also fits the constant padding columns: entries ~1e13, eigenvalues ~1e5.
    # The float32 hybrid and the folded net are then two different roundings of a function
    # that float32 cannot resolve; applied in float64, as asked, they agree.
    scaled, _, states = widening
    hybrid = _hybrid(scaled, states, h, rank=None, compute_dtype=torch.float64)
    assert hybrid.linear_map.abs().max() > 1e9
    assert _relative_error(hybrid.fold(), hybrid, 3 * torch.randn(500, 3)) < 1e-6


@pytest.mark.parametrize("h", [0, 1, 5, 10])
def test_folded_equals_trained_hybrid(tiny_mlp, h):
    model, X, y = tiny_mlp
    scaled, _ = scale_layer(model, 2, X, y, n_inserted=10, config=NO_TRAINING, init="he")
    hybrid = _hybrid(scaled, collect_trajectories(scaled, X).states, h)
    assert hybrid.out_width < hybrid.width  # 6 -> 4: the read-out drops neurons
    assert _relative_error(hybrid.fold(), hybrid, torch.randn(400, 2)) < 1e-6


def test_fold_is_plain_torch_and_independent_of_the_hybrid(widening):
    scaled, X, states = widening
    hybrid = _hybrid(scaled, states, 2, n_blocks=4)
    folded = hybrid.fold()
    assert isinstance(folded, nn.Sequential)
    for module in folded.modules():
        assert type(module).__module__.startswith(("torch.nn", "koopnet.fold")), type(module)
    # 2 blocks before the window, 2 inside it: s_2..s_4 are the lifted states
    assert list(dict(folded.named_children())) == ["head", "block1", "block2", "window", "map",
                                                   "tail"]
    assert len(folded.window.blocks) == 2
    assert not any(p.requires_grad for p in folded.parameters()) and not folded.training
    assert _relative_error(folded, hybrid, X) < 1e-6
    before = folded(X)
    with torch.no_grad():
        for p in hybrid.parameters():
            p.add_(1.0)
        hybrid.linear_map.mul_(2.0)
    assert torch.equal(folded(X), before)


def test_compute_dtype_and_float64_networks(widening):
    scaled, X, states = widening
    hybrid = _hybrid(scaled, states, 3, constant=True, compute_dtype=torch.float64)
    folded = hybrid.fold(factored=False)
    assert [type(m) for m in folded.map] == [fold_module.Cast, nn.Linear, fold_module.Cast]
    assert folded.map[1].weight.dtype == torch.float64
    assert _relative_error(folded, hybrid, X) < 1e-6
    double = _hybrid(scaled.double(), states.double(), 3, constant=True)
    try:
        assert _relative_error(double.fold(), double, X.double()) < 1e-12
    finally:
        scaled.float()


def test_low_rank_map_is_applied_factored(widening):
    scaled, X, states = widening
    hybrid = _hybrid(scaled, states, N_INSERTED, rank=2)
    folded, dense = hybrid.fold(), hybrid.fold(factored=False)
    n, m = (N_INSERTED + 1) * 4, 7
    assert [type(layer) for layer in folded.map] == [nn.Linear, nn.Linear]
    assert (folded.map[0].in_features, folded.map[0].out_features) == (n, 2)
    assert folded.map[0].bias is None and folded.map[1].out_features == m
    assert multiply_adds(folded.map) == 2 * (n + m) < multiply_adds(dense.map) == n * m
    assert _relative_error(folded, hybrid, X) < 1e-6


def test_factoring_is_chosen_by_cost():
    weight, bias = torch.randn(7, 28, dtype=torch.float64), torch.randn(7, dtype=torch.float64)
    assert isinstance(linear_layers(weight, bias), nn.Linear)  # rank 7: 7 * 35 > 7 * 28
    low = torch.randn(7, 3, dtype=torch.float64) @ torch.randn(3, 28, dtype=torch.float64)
    factored = linear_layers(low, bias, dtype=torch.float64)  # rank 3: 3 * 35 < 7 * 28
    assert [layer.out_features for layer in factored] == [3, 7]
    forced = linear_layers(weight, bias, factored=True, dtype=torch.float64)
    x = torch.randn(5, 28, dtype=torch.float64)
    assert torch.allclose(forced(x), x @ weight.T + bias, rtol=1e-12, atol=1e-12)
    assert torch.allclose(factored(x), x @ low.T + bias, rtol=1e-12, atol=1e-12)


def test_multiply_adds_count_linear_layers_only():
    net = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Sequential(nn.Linear(5, 2, bias=False)))
    assert multiply_adds(net) == 3 * 5 + 5 * 2


def test_torch_export_gives_the_same_logits(widening):
    scaled, X, states = widening
    folded = _hybrid(scaled, states, 3, constant=True).fold()
    exported = torch.export.export(folded, (X,))
    assert torch.equal(exported.module()(X), folded(X))
    batch = torch.export.Dim("batch")  # any batch size, not only the traced one
    dynamic = torch.export.export(folded, (X,), dynamic_shapes=({0: batch},)).module()
    probe = torch.randn(17, 3)
    assert torch.equal(dynamic(probe), folded(probe))


def test_onnx_export(widening, tmp_path):
    # torch 2.13's TorchScript exporter (dynamo=False) still needs the `onnx` package
    pytest.importorskip("onnx", reason="ONNX export needs the 'onnx' package (not installed)")
    scaled, X, states = widening
    folded = _hybrid(scaled, states, 3, constant=True).fold()
    path = tmp_path / "folded.onnx"
    torch.onnx.export(folded, (X,), str(path), dynamo=False)
    import onnx

    onnx.checker.check_model(onnx.load(str(path)))
    ort = pytest.importorskip("onnxruntime", reason="running the ONNX file needs onnxruntime")
    session = ort.InferenceSession(str(path))
    (got,) = session.run(None, {session.get_inputs()[0].name: X.numpy()})
    assert torch.allclose(torch.from_numpy(got), folded(X), rtol=1e-5, atol=1e-6)


def test_fold_refuses_what_it_cannot_fold(widening):
    scaled, _, states = widening
    observable = Polynomial(degree=2, n_delays=1).fit(states)
    dmd = DMD(rank=3).fit(observable.transform(states))
    hybrid = KoopmanHybrid.from_dmd(scaled, observable, dmd)
    with pytest.raises(TypeError, match=r"fold\(\) needs a TimeDelay observable; this hybrid "
                                        r"lifts with Polynomial\(degree=2"):
        hybrid.fold()
    with pytest.raises(TypeError, match=r"factored='yes' must be None \(choose by cost\), True "
                                        r"or False"):
        _hybrid(scaled, states, 1).fold(factored="yes")


def test_window_map_checks_shapes():
    with pytest.raises(ValueError, match=r"linear_map has shape \[7, 14\]; 2 states of width 7 "
                                         r"and the constant need \[w', 15\]"):
        window_map(torch.zeros(7, 14), n_states=2, width=4, padded_width=7, pad_value=0.0,
                   constant=True)
    with pytest.raises(ValueError, match=r"width=8 must be in 1..7 \(the padded width\)"):
        window_map(torch.zeros(7, 14), n_states=2, width=8, padded_width=7, pad_value=0.0,
                   constant=False)
    weight, bias = window_map(torch.arange(15.0).view(1, 15), n_states=2, width=4,
                              padded_width=7, pad_value=-1.0, constant=True)
    assert weight.tolist() == [[0, 1, 2, 3, 7, 8, 9, 10]]
    assert bias.tolist() == [-(4 + 5 + 6 + 11 + 12 + 13) + 14]
