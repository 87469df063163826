
"""MNIST and MNIST-format sets: `reproduce idx:PATH` on a tiny synthetic IDX folder, the paper
protocol's data (raw-pixel trajectories, clipped rank), the paper-grid report, and a quick run on
real MNIST (skipped when ../shared/data is absent)."""

from __future__ import annotations

import dataclasses
import json
import struct

import numpy as np
import pytest
import torch

from koopnet.cli import main
from koopnet.dmd import DMD
from koopnet.lab.paper import PAPER_MNIST_DELAYS, PAPER_MNIST_GRID
from koopnet.lab.protocols import _paper_rank, load_protocol_data, run_experiment
from koopnet.lab.recipes import default_config
from koopnet.lab.report import paper_grid_section, render_report

_NAMES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
          "t10k-labels-idx1-ubyte")


def _write_idx(path, array: np.ndarray) -> None:
    """uint8 IDX written with struct, independent of koopnet's reader."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


@pytest.fixture(scope="module")
def tiny_idx(tmp_path_factory):
    """3 classes of 6x5 images (a bright class-specific row plus noise), 200 train / 60 test."""
    folder = tmp_path_factory.mktemp("idx")
    rng = np.random.default_rng(0)
    arrays = []
    for n in (200, 60):
        labels = rng.integers(0, 3, n)
        images = rng.integers(0, 60, (n, 6, 5))
        images[np.arange(n), 2 * labels] += 180  # class k lights up row 2k
        arrays += [images, labels]
    for name, array in zip(_NAMES, arrays, strict=True):
        _write_idx(folder / name, array)
    return folder


def test_reproduce_idx_quick_uses_the_data_shape(tiny_idx, tmp_path):
    out = tmp_path / "run"
    assert main(["--quiet", "reproduce", f"idx:{tiny_idx}", "--quick", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["dataset"] == f"idx:{tiny_idx}" and results["protocol"] == "clean"
    assert results["config"]["widths"][1:-1] == [256, 128, 64, 32]  # MNIST architecture
    assert results["original"]["test_accuracy"] > 0.9  # the rows separate the classes
    assert results["sweep"] and results["selected"]["val_accuracy"] == max(
        r["val_accuracy"] for r in results["sweep"])
    assert "protocol `clean`" in (out / "report.md").read_text()


def test_paper_protocol_on_idx_uses_raw_pixels_and_clips_rank(tiny_idx):
    config = default_config(f"idx:{tiny_idx}", "paper", quick=True)
    assert config.raw_pixel_trajectories and config.ranks == (500,)
    data = load_protocol_data(config)
    assert len(data.base) == 200 and len(data.trajectories) == 100  # the 50/50 pool split
    assert data.trajectories.X.max() > 200 and data.trajectories.X.min() >= 0  # raw 0..255
    assert data.test.X.max() < 3.0  # normalised (max (1 - 0.1307) / 0.3081 = 2.82)
    config = dataclasses.replace(config, raw_pixel_trajectories=False)
    assert load_protocol_data(config).trajectories.X.max() < 3.0
    results, _ = run_experiment(config, progress=False)
    for row in results["sweep"]:
        pairs = 12 * row["trajectories"] - row["n_delays"] - 1
        assert row["rank"] == 500
        assert row["rank_resolved"] <= min(pairs, 64 * (row["n_delays"] + 1))  # layer 3: W=64
    assert "selection_note" in results and "no validation split" in results["selection_note"]


def test_paper_rank_clips_ints_only():
    shape = (11, 65)  # (pairs, lifted dimension)
    assert _paper_rank(500, shape) == 11 and _paper_rank(5, shape) == 5
    assert _paper_rank(None, shape) is None and _paper_rank(0.99, shape) == 0.99
    assert _paper_rank(0, shape) == 0


def test_paper_grid_is_the_published_table():
    assert len(PAPER_MNIST_GRID) == 3 * 4 * 10
    assert PAPER_MNIST_GRID[(3, 500, 10)] == 0.958 and PAPER_MNIST_GRID[(1, 1, 1)] == 0.1028
    assert max(PAPER_MNIST_GRID.values()) == PAPER_MNIST_GRID[(3, 500, 7)] == 0.9591


def _fake_results(dataset="mnist", protocol="paper", offset=0.01):
    sweep = [{"layer": layer, "trajectories": m, "n_delays": h, "rank": 500, "rank_resolved": 500,
              "tikhonov": 0.0, "constant": False, "linear_steps": 11 - h, "nonlinear_blocks": h,
              "val_accuracy": value + offset, "test_accuracy": value + offset}
             for (layer, m, h), value in PAPER_MNIST_GRID.items() if (layer, m, h) != (1, 1, 1)]
    return {"dataset": dataset, "protocol": protocol, "seed": 0, "sweep": sweep,
            "original": {"val_accuracy": 0.975, "test_accuracy": 0.975}, "scaled": [],
            "selected": None}


def test_report_prints_our_grid_next_to_the_papers():
    lines = paper_grid_section(_fake_results())
    table = [line for line in lines if line.startswith("| 3 | 500 |")]
    assert len(table) == 1
    cells = table[0].strip("| ").split(" | ")[2:]
    assert len(cells) == len(PAPER_MNIST_DELAYS)
    assert cells[-1] == "96.80 vs 95.80 (+1.00)"  # ours, the paper's, the difference
    assert "| 1 | 1 | – vs 10.28 |" in "\n".join(lines)  # a missing cell still shows the paper's
    assert "Headline cell (layer 3, M=500, h=10): ours 96.80% vs the paper's 95.80%" in "\n".join(
        lines)
    assert "## Paper grid: ours vs the paper" in render_report(_fake_results())
    assert paper_grid_section(_fake_results(protocol="clean")) == []
    assert paper_grid_section(_fake_results(dataset="yinyang")) == []


def test_quick_reproduction_on_real_mnist(mnist_dir):
    config = default_config("mnist", quick=True, data_dir=str(mnist_dir))
    results, _ = run_experiment(config, progress=False)
    original = results["original"]["test_accuracy"]
    scaled = results["scaled"][0]["test_accuracy"]
    selected = results["selected"]
    assert original > 0.9, original  # 160 AdamW steps on 5k images
    assert scaled > original - 0.05, (scaled, original)
    assert selected["test_accuracy"] > 0.8, selected  # the hybrid is far from chance (0.1)
    # layer 3, h in {1, 5, 10}, rank in {None, 0.9999}, no Tikhonov, constant on: 6 rows
    assert [(r["layer"], r["n_delays"], r["rank"]) for r in results["sweep"]] == [
        (3, h, rank) for h in (1, 5, 10) for rank in (None, 0.9999)]


def test_exact_rollout_is_the_least_squares_step_operator():
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(40, 5, dtype=torch.float64, generator=gen)
    Y = torch.randn(40, 5, dtype=torch.float64, generator=gen)
    dmd = DMD(rank=3, exact_rollout=True).fit_pairs(X, Y)
    K = torch.linalg.lstsq(X @ dmd.basis_, Y).solution.T @ dmd.basis_.T  # Y ~ (X V) B, K = B^T V^T
    assert torch.allclose(dmd.transition(1), K, atol=1e-10)  # float64, well conditioned
    assert torch.allclose(dmd.transition(3), K @ K @ K, atol=1e-10)
    assert torch.allclose(dmd.predict(X[:4], 2), X[:4] @ (K @ K).T, atol=1e-10)
    projected = DMD(rank=3).fit_pairs(X, Y)
    assert not torch.allclose(projected.transition(1), K)  # the paper's stays in span(V)
