"""Spectral editing: mode removal and scaling, subspaces, attribution and forgetting a class."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from koopnet import DepthHybrid, KoopmanHybrid, linearize_depth, load_hybrid, save_hybrid
from koopnet.dmd import PairStatistics
from koopnet.editing import (
    abs_below,
    edit_modes,
    mode_attribution,
    mode_groups,
    near_frequency,
    resdmd_residuals,
    spectrum,
)
from koopnet.forgetting import forget_class
from koopnet.observables import TimeDelay

EIGENVALUES = [0.9, 0.5, -0.3]  # plus the pair 0.6 e^{+-i pi/4}


def _operator(seed: int = 0) -> torch.Tensor:
    """A real diagonalisable 5x5 operator with known eigenvalues (one complex pair)."""
    g = torch.Generator().manual_seed(seed)
    r, t = 0.6, math.pi / 4
    block = torch.zeros(5, 5, dtype=torch.float64)
    block[:3, :3] = torch.diag(torch.tensor(EIGENVALUES, dtype=torch.float64))
    block[3:, 3:] = r * torch.tensor([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]])
    S = torch.randn(5, 5, generator=g, dtype=torch.float64) + 3 * torch.eye(5)
    return S @ block @ torch.linalg.inv(S)


def _hybrid(operator: torch.Tensor, steps: int = 3, width: int = 7, seed: int = 0):
    """A hand-built hybrid: Linear head, no prefix, delay-0 lifting, projected roll-out."""
    torch.manual_seed(seed)
    observable = TimeDelay(0).fit(torch.zeros(1, 1, width))
    basis = torch.linalg.qr(torch.randn(width, len(operator), dtype=torch.float64))[0]
    readout = observable.readout(width)
    linear_map = readout @ basis @ torch.linalg.matrix_power(operator, steps) @ basis.T
    head = nn.Sequential(nn.Linear(2, width), nn.ReLU())
    tail = nn.Sequential(nn.Linear(width, 3))
    return KoopmanHybrid(head, nn.Sequential(), tail, observable, basis=basis,
                         operator=operator.clone(), readout=readout, linear_map=linear_map,
                         width=width, linear_steps=steps).eval()


def _sorted(values: torch.Tensor) -> list[complex]:
    return sorted((complex(round(v.real, 6), round(abs(v.imag), 6)) for v in values.tolist()),
                  key=lambda z: (z.real, z.imag))


def _index_of(hybrid, value: float) -> int:
    eigenvalues = spectrum(hybrid)[0]
    return int((eigenvalues - value).abs().argmin())


def test_removing_no_mode_is_the_identity():
    hybrid = _hybrid(_operator())
    for edited in (edit_modes(hybrid, remove=[]), edit_modes(hybrid, scale={}),
                   edit_modes(hybrid, where=abs_below(0.0))):
        assert torch.equal(edited.linear_map, hybrid.linear_map)
        assert torch.equal(edited.operator, hybrid.operator)
        assert edited is not hybrid and edited.tail is not hybrid.tail


def test_removing_a_mode_removes_exactly_its_eigenvalue_and_leaves_the_input():
    hybrid = _hybrid(_operator())
    before = {k: v.clone() for k, v in hybrid.state_dict().items()}
    edited = edit_modes(hybrid, remove=_index_of(hybrid, 0.5))
    assert _sorted(spectrum(edited)[0]) == _sorted(torch.tensor(
        [0.9, 0.0, -0.3, 0.6 * complex(math.cos(math.pi / 4), math.sin(math.pi / 4)),
         0.6 * complex(math.cos(math.pi / 4), -math.sin(math.pi / 4))]))
    # the map is the edited operator rolled out (projected roll-out: R V A'^m V^T)
    rolled = edited.readout @ edited.basis @ torch.linalg.matrix_power(edited.operator, 3) \
        @ edited.basis.T
    torch.testing.assert_close(edited.linear_map, rolled, rtol=0, atol=1e-12)
    for key, value in hybrid.state_dict().items():
        assert torch.equal(value, before[key])


def test_scaling_a_mode_scales_its_eigenvalue():
    hybrid = _hybrid(_operator())
    edited = edit_modes(hybrid, scale={_index_of(hybrid, 0.9): 0.5})
    assert _sorted(spectrum(edited)[0])[-1] == complex(0.5, 0.0)  # 0.9 -> 0.45 < 0.5
    assert any(abs(v - 0.45) < 1e-9 for v in spectrum(edited)[0].real.tolist())


def test_conjugate_pairs_go_together_and_the_operator_stays_real():
    hybrid = _hybrid(_operator())
    eigenvalues = spectrum(hybrid)[0]
    pair = [g for g in mode_groups(eigenvalues) if len(g) == 2]
    assert len(pair) == 1
    edited = edit_modes(hybrid, remove=pair[0][0])  # one half of the pair
    assert edited.operator.dtype == torch.float64 and not edited.operator.is_complex()
    assert _sorted(spectrum(edited)[0]) == _sorted(torch.tensor([0.9, 0.5, -0.3, 0.0, 0.0]))
    region = edit_modes(hybrid, where=near_frequency(math.pi / 4, 0.01))
    torch.testing.assert_close(region.linear_map, edited.linear_map, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match=r"complex-conjugate pair but were given different"):
        edit_modes(hybrid, scale={pair[0][0]: 0.5, pair[0][1]: 0.2})


def test_subspace_projects_directions_out_of_the_starting_state():
    hybrid = _hybrid(_operator())
    direction = hybrid.basis[:, :1]
    edited = edit_modes(hybrid, subspace=direction)
    torch.testing.assert_close(edited.linear_map @ direction,
                               torch.zeros(len(edited.linear_map), 1, dtype=torch.float64),
                               rtol=0, atol=1e-12)


def test_an_edited_hybrid_saves_and_loads_bit_identically(tmp_path):
    hybrid = _hybrid(_operator())
    edited = edit_modes(hybrid, remove=_index_of(hybrid, -0.3))
    save_hybrid(edited, tmp_path)
    loaded = load_hybrid(tmp_path)
    for key, value in edited.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)
    x = torch.randn(20, 2)
    assert torch.equal(loaded(x), edited(x))
    # a loaded hybrid is edited from its buffers alone, as the original was
    again = edit_modes(loaded, remove=_index_of(loaded, 0.9))
    direct = edit_modes(edited, remove=_index_of(edited, 0.9))
    torch.testing.assert_close(again.linear_map, direct.linear_map, rtol=0, atol=1e-12)


def test_depth_hybrid_edits_keep_its_dmd_consistent():
    torch.manual_seed(0)

    class Residual(nn.Module):
        def __init__(self, width):
            super().__init__()
            self.f = nn.Sequential(nn.Linear(width, width), nn.Tanh())

        def forward(self, x):
            return x + 0.3 * self.f(x)

    model = nn.Sequential(nn.Linear(2, 6), *[Residual(6) for _ in range(5)], nn.Linear(6, 2))
    hybrid = linearize_depth(model, [str(i) for i in range(1, 6)], torch.randn(200, 2),
                             n_delays=1)
    old = hybrid.linear_map.clone()
    old_operator, old_modes = hybrid.dmd_.operator_.clone(), hybrid.dmd_.modes_.clone()
    eigenvalues = spectrum(hybrid)[0]
    edited = edit_modes(hybrid, remove=int(eigenvalues.abs().argmin()))
    assert isinstance(edited, DepthHybrid)
    assert torch.equal(hybrid.linear_map, old)
    assert torch.equal(hybrid.dmd_.operator_, old_operator)
    assert torch.equal(hybrid.dmd_.modes_, old_modes)
    assert len(_sorted(edited.dmd_.eigenvalues_)) == len(eigenvalues)
    torch.testing.assert_close(edited.dmd_.eigenvalues_.abs().min(),
                               torch.tensor(0.0, dtype=torch.float64), rtol=0, atol=1e-10)
    readout = hybrid.observable.readout(hybrid.observable.n_features_in_)
    torch.testing.assert_close(edited.dmd_.transition(edited.linear_steps, readout),
                               edited.linear_map, rtol=0, atol=1e-10)
    assert edited(torch.randn(4, 2)).shape == (4, 2)


def test_bad_arguments_are_refused():
    hybrid = _hybrid(_operator())
    with pytest.raises(ValueError, match=r"edit_modes needs remove=, scale=, where= or subspace="):
        edit_modes(hybrid)
    with pytest.raises(ValueError, match=r"pass subspace= alone"):
        edit_modes(hybrid, remove=0, subspace=hybrid.basis[:, :1])
    with pytest.raises(ValueError, match=r"remove index=7 must be <= 4"):
        edit_modes(hybrid, remove=[7])
    with pytest.raises(TypeError, match=r"scale=0.5 must be a mapping"):
        edit_modes(hybrid, scale=0.5)
    with pytest.raises(ValueError, match=r"mode 0 is both removed and scaled"):
        edit_modes(hybrid, remove=0, scale={0: 0.5})
    with pytest.raises(TypeError, match=r"where='small' must be a callable"):
        edit_modes(hybrid, where="small")
    with pytest.raises(ValueError, match=r"must return a boolean mask of shape \[5\]"):
        edit_modes(hybrid, where=lambda lam: lam.abs())
    with pytest.raises(ValueError, match=r"subspace has shape \[3, 1\]; it must be \[D, k\]"):
        edit_modes(hybrid, subspace=torch.ones(3, 1))
    with pytest.raises(TypeError, match=r"hybrid must be a koopnet KoopmanHybrid or DepthHybrid"):
        edit_modes(nn.Linear(2, 2), remove=0)
    with pytest.raises(ValueError, match=r"theta=4.0 must be an angle in \[0, pi\]"):
        near_frequency(4.0, 0.1)


def _blobs(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    centres = torch.tensor([[0.0, 2.0], [2.0, -1.0], [-2.0, -1.0]])
    y = torch.arange(n) % 3
    return centres[y] + 0.5 * torch.randn(n, 2, generator=g), y


def _trained_hybrid():
    """Identity roll-out on fixed random ReLU features, with a logistic tail fitted to blobs."""
    width = 16
    torch.manual_seed(0)
    observable = TimeDelay(0).fit(torch.zeros(1, 1, width))
    eye = torch.eye(width, dtype=torch.float64)
    hybrid = KoopmanHybrid(nn.Sequential(nn.Linear(2, width), nn.ReLU()), nn.Sequential(),
                           nn.Sequential(nn.Linear(width, 3)), observable, basis=eye,
                           operator=eye.clone(), readout=eye.clone(), linear_map=eye.clone(),
                           width=width, linear_steps=1)
    X, y = _blobs(600, 1)
    opt = torch.optim.Adam(hybrid.tail.parameters(), lr=0.05)
    for _ in range(200):
        opt.zero_grad()
        nn.functional.cross_entropy(hybrid(X), y).backward()
        opt.step()
    return hybrid.eval(), X, y


def test_forget_class_drops_the_class_and_keeps_the_others():
    hybrid, X, y = _trained_hybrid()
    Xt, yt = _blobs(600, 2)

    def per_class(net):
        with torch.no_grad():
            predicted = net(Xt).argmax(1)
        return [float((predicted[yt == k] == k).float().mean()) for k in range(3)]

    before = per_class(hybrid)
    assert min(before) > 0.95
    edited = forget_class(hybrid, 2, X, y)
    after = per_class(edited)
    assert after[2] < 0.2 and min(after[:2]) > 0.9
    assert per_class(hybrid) == before  # input untouched
    with pytest.raises(ValueError, match=r"class_index=3 must be <= 2"):
        forget_class(hybrid, 3, X, y)
    with pytest.raises(ValueError, match=r"needs samples of class 2 and of the other classes"):
        forget_class(hybrid, 2, X[y != 2], y[y != 2])


def test_mode_attribution_and_residuals():
    hybrid, X, y = _trained_hybrid()
    stats = PairStatistics.from_pairs(torch.randn(50, 16, dtype=torch.float64),
                                      torch.randn(50, 16, dtype=torch.float64))
    result = mode_attribution(hybrid, X, y, stats=stats)
    assert result["logit_drop"].shape == (16, 3) and result["accuracy_drop"].shape == (16, 3)
    assert result["residual"].shape == (16,) and bool(torch.isfinite(result["residual"]).all())
    # with an exact operator on pairs Y = X, every residual is |1 - lambda| = 0
    Xp = torch.randn(40, 16, dtype=torch.float64)
    torch.testing.assert_close(resdmd_residuals(hybrid, PairStatistics.from_pairs(Xp, Xp)),
                               torch.zeros(16, dtype=torch.float64), rtol=0, atol=1e-6)


def test_cli_edit_writes_a_hybrid_folder(tmp_path, capsys):
    from koopnet.cli.main import main

    hybrid = _hybrid(_operator())
    save_hybrid(hybrid, tmp_path / "fit")
    index = _index_of(hybrid, 0.5)
    assert main(["edit", str(tmp_path / "fit"), "--remove-modes", str(index),
                 "--out", str(tmp_path / "edited")]) == 0
    edited = load_hybrid(tmp_path / "edited")
    torch.testing.assert_close(edited.linear_map, edit_modes(hybrid, remove=index).linear_map,
                               rtol=0, atol=1e-12)
    assert main(["edit", str(tmp_path / "edited"), "--abs-below", "0.7",
                 "--out", str(tmp_path / "small")]) == 0
    assert _sorted(spectrum(load_hybrid(tmp_path / "small"))[0]) == _sorted(
        torch.tensor([0.9, 0.0, 0.0, 0.0, 0.0]))
    capsys.readouterr()
    assert main(["edit", str(tmp_path / "fit"), "--forget-class", "1",
                 "--out", str(tmp_path / "forgot")]) == 2
    assert "records no data set" in capsys.readouterr().err
    assert main(["edit", str(tmp_path / "fit"), "--remove-modes", "a,b", "--out",
                 str(tmp_path / "bad")]) == 2
    assert "--remove-modes 'a,b' must be comma-separated integers" in capsys.readouterr().err


def test_mode_attribution_figure():
    import matplotlib.pyplot as plt

    from koopnet.lab.figures import plot_mode_attribution

    hybrid, X, y = _trained_hybrid()
    fig = plot_mode_attribution(mode_attribution(hybrid, X, y), title="modes", top=3)
    assert len(fig.axes[0].patches) == 9 and fig.axes[0].get_title() == "modes"
    plt.close(fig)
