import matplotlib
import pytest
import torch

from koopnet.lab import figures as plots


def _labelled(fig):
    axes = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    assert axes
    for ax in axes:
        assert ax.get_xlabel() and ax.get_ylabel(), ax.get_title()
    return axes


def _eig(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.complex(torch.randn(n, generator=g), torch.randn(n, generator=g)).to(
        torch.complex128) * 0.5


def test_eigenvalue_grid_has_one_panel_per_setting_and_a_title():
    keys = ["M50_h1", "M50_h10", "M500_h1", "M500_h10"]
    eig = {k: _eig(6, i) for i, k in enumerate(keys)}
    res = {k: torch.rand(6, dtype=torch.float64) for k in keys}
    fig = plots.plot_eigenvalue_grid(eig, res, title="yinyang layer 1")
    axes = _labelled(fig)
    assert len(axes) == 4 and axes[1].get_title() == "M=50, h=10, rank 6"
    assert fig.get_suptitle() == "yinyang layer 1"
    plots.plot_eigenvalue_grid(eig)  # residuals optional


def test_line_and_image_plots_return_labelled_figures(tmp_path):
    rsv = {1: torch.randn(7, 24), 10: torch.randn(7, 24)}
    sv = {"delay": torch.tensor([1.0, 0.1, 1e-3]), "rbf": torch.tensor([1.0, 0.5])}
    modes = torch.randn(4, 5, dtype=torch.complex128)
    figures = [
        plots.plot_right_singular_vectors(rsv, title="rsv"),
        plots.plot_singular_value_decay(sv, title="sv"),
        plots.plot_modes_on_neurons(modes, _eig(5, 0), torch.rand(5), title="modes"),
        plots.plot_decision_boundaries(torch.linspace(0, 1, 5),
                                       {"a": torch.zeros(5, 5), "b": torch.ones(5, 5)},
                                       torch.rand(10, 2), torch.randint(0, 2, (10,)), title="db"),
    ]
    for fig in figures:
        assert isinstance(fig, matplotlib.figure.Figure)
        _labelled(fig)
    written = plots.save_figure(figures[0], tmp_path / "rsv", pdf=True)
    assert [p[-4:] for p in written] == [".png", ".pdf"]


def test_accuracy_vs_linear_steps_aggregates_seeds():
    rows = [{"layer": layer, "observable": o, "linear_steps": s, "test_accuracy": acc}
            for layer in (1, 2) for o in ("delay", "ridge-free") for s in (1, 6)
            for acc in (0.8, 0.9)]
    baselines = [{"layer": 1, "method": "ridge", "test_accuracy": 0.95},
                 {"layer": None, "method": "original network", "test_accuracy": 0.99}]
    fig = plots.plot_accuracy_vs_linear_steps(rows, baselines, title="acc")
    axes = _labelled(fig)
    assert len(axes) == 2
    line = axes[0].lines[0]
    assert list(line.get_ydata()) == pytest.approx([85.0, 85.0])  # mean over the two seeds


def test_given_axes_are_used():
    fig, ax = matplotlib.pyplot.subplots()
    assert plots.plot_singular_value_decay({"x": torch.tensor([1.0, 0.5])}, ax) is fig
