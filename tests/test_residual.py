"""Residual-MLP depth reproduction: the quick run on real MNIST (selection made on validation),
the least-squares baseline against torch.linalg.lstsq, and exactly linear blocks."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from koopnet.cli import main
from koopnet.io.datasets import Split
from koopnet.lab import residual, residual_run
from koopnet.lab.residual import AffineMap, ResidualMLP, affine_fit, rebuild, sweep_spans

_KEYS = ("span", "method", "n_delays", "rank", "tikhonov", "ridge", "val_accuracy")


def test_quick_reproduction_selects_on_validation(mnist_dir, tmp_path, monkeypatch):
    out = tmp_path / "run"
    argv = ["--quiet", "reproduce", "resmlp-mnist", "--quick", "--data-dir", str(mnist_dir),
            "--out", str(out)]
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["kind"] == "depth" and [o["seed"] for o in results["original"]] == [0]
    assert {(r["span"], r["method"]) for r in results["rows"]} == {
        (k, m) for k in range(1, 5) for m in residual_run.METHODS
        if m != "learned lifting" or k == 1}  # quick: a lifting of the last block only
    assert len(results["profile"]) == 10  # every contiguous span of 4 blocks
    assert (out / "accuracy_vs_replaced_blocks.png").stat().st_size > 0
    assert "| 3 | delay DMD |" in (out / "report.md").read_text()

    real_splits = residual_run.idx_splits

    def scrambled(*args, **kwargs):
        splits = real_splits(*args, **kwargs)
        order = torch.randperm(len(splits.test.y), generator=torch.Generator().manual_seed(9))
        splits.test.y = splits.test.y[order]
        return splits

    monkeypatch.setattr(residual_run, "idx_splits", scrambled)
    again = residual_run.run_depth(residual_run.depth_config(quick=True,
                                                             data_dir=str(mnist_dir)))
    assert [[r[k] for k in _KEYS] for r in again["rows"]] == [
        [r[k] for k in _KEYS] for r in results["rows"]]
    assert max(r["test_accuracy"] for r in again["rows"]) < 0.2  # the scramble took effect


def test_least_squares_map_is_lstsq():
    X, Y = torch.randn(300, 7, dtype=torch.float64), torch.randn(300, 5, dtype=torch.float64)
    weight, bias = affine_fit(X, Y)
    direct = torch.linalg.lstsq(torch.cat([X, torch.ones(300, 1, dtype=X.dtype)], 1), Y)
    torch.testing.assert_close(weight, direct.solution[:-1].T, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(bias, direct.solution[-1], atol=1e-12, rtol=1e-10)
    ridged, _ = affine_fit(X, Y, ridge=1e-1)
    assert ridged.norm() < weight.norm()  # the penalty shrinks the map


class _LinearBlock(nn.Module):
    """x -> x + A x + b, exactly affine."""

    def __init__(self, width: int, generator: torch.Generator) -> None:
        super().__init__()
        self.lin = nn.Linear(width, width)
        with torch.no_grad():
            self.lin.weight.copy_(0.3 * torch.randn(width, width, generator=generator))

    def forward(self, x):
        return x + self.lin(x)


def test_exactly_linear_blocks_give_exact_replacements():
    generator = torch.Generator().manual_seed(0)
    model = ResidualMLP(n_in=5, width=6, n_blocks=4, n_out=3)
    block = _LinearBlock(6, generator)  # one map at every depth: a time-invariant system,
    for i in range(4):  # which a single DMD operator describes exactly
        model.blocks[i] = copy.deepcopy(block)  # distinct modules, equal weights
    model = model.double().eval()
    X = torch.randn(400, 5, dtype=torch.float64, generator=generator)
    states = residual.depth_states(model, X)
    grid = {"delays": None, "ranks": (None,), "tikhonovs": (0.0,), "ridges": (),
            "lifting_spans": (2, 4), "lifting_ratio": 1, "lifting_steps": 3, "seed": 0}
    val = Split(X[:50], model(X[:50]).argmax(1))
    rows, models = sweep_spans(model, states, val, grid)
    assert {r["method"] for r in rows} == {"identity", "least squares", "delay DMD",
                                           "learned lifting"}
    lifted = [r for r in rows if r["method"] == "learned lifting"]
    assert [r["span"] for r in lifted] == [2, 4]
    # psi: Linear 6 -> 6 -> 6 (W features) costs one block's two 6 x 6 maps
    assert all(r["nonlinear_macs"] == r["block_macs"] == 72 for r in lifted)
    expected = model(X[:50])
    for row in rows:
        if row["method"] == "identity":
            continue
        got = rebuild(model, states, row)(X[:50])
        # every setting is exact here, so the kept (first best) model gives the same logits
        torch.testing.assert_close(models[row["span"], row["method"]](X[:50]), got)
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6,
                                   msg=f"{row['method']} span {row['span']}")
        assert row["val_accuracy"] == 1.0
    assert isinstance(rebuild(model, states, rows[1]).blocks[3], AffineMap)


def _run(seeds, **config):
    return {"kind": "depth", "schema": 1, "experiment": "resmlp-mnist", "architecture": {},
            "config": {"seeds": seeds, "width": 8, **config},
            "original": [{"seed": s, "test_accuracy": 0.9} for s in seeds],
            **{key: [{"seed": s, "key": key} for s in seeds]
               for key in ("rows", "profile", "sweep")},
            "environment": {"seconds": 1.0}, "summary": []}


def test_merge_depth_results_concatenates_disjoint_seeds_in_seed_order():
    merged = residual_run.merge_depth_results([_run([1]), _run([0, 2])])
    assert merged["config"]["seeds"] == [0, 1, 2]
    for key in ("original", "rows", "profile", "sweep"):
        assert [r["seed"] for r in merged[key]] == [0, 1, 2]
    assert len(merged["environment"]["runs"]) == 2 and "summary" not in merged
    with pytest.raises(ValueError, match=r"runs share seeds \[1\]"):
        residual_run.merge_depth_results([_run([1]), _run([1, 2])])
    with pytest.raises(ValueError, match=r"runs differ in config \['width'\]"):
        residual_run.merge_depth_results([_run([0]), _run([1], width=16)])
