"""Guards of the claims a reader of koopnet's results relies on (project issue 14).

- Test data cannot move a selection: the clean protocol, ``reproduce mnist --quick`` and the
  study run again with the test labels (and, separately, the test inputs) scrambled select the
  same rows with the same settings and the same validation scores.
- The splits are disjoint and drawn from their documented seeds.
- Protocol wiring: clean rows use the exact roll-out on within-trajectory pairs, a paper row's
  operator is the full-rank fit on the concatenated series.
- Precision: the float64 override is a float64 product and survives a save/load round trip.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import koopnet.lab.protocols as protocols
import koopnet.lab.study as study_module
from koopnet.dmd import DMD
from koopnet.hybrid import KoopmanHybrid
from koopnet.io.datasets import Split, idx_splits, make_yinyang, yinyang_splits
from koopnet.io.serialize import load_hybrid, save_hybrid
from koopnet.lab.protocols import (
    load_protocol_data,
    run_experiment,
    scale_for_protocol,
    select,
    sweep_layer,
    train_base,
)
from koopnet.lab.recipes import default_config
from koopnet.observables import TimeDelay, snapshot_pairs
from koopnet.trajectories import collect_trajectories

SCRAMBLES = ("labels", "inputs")


def _scrambled(data, how: str):
    """``data`` with its test split's labels permuted or its inputs replaced by noise."""
    gen = torch.Generator().manual_seed(1234)  # never touches the global RNG the run uses
    test = data.test
    if how == "labels":
        test = Split(test.X, test.y[torch.randperm(len(test), generator=gen)])
    else:
        noise = torch.randn(test.X.shape, generator=gen, dtype=test.X.dtype)
        test = Split(noise * test.X.std() + test.X.mean(), test.y)
    return dataclasses.replace(data, test=test)


def _patched_loader(how: str):
    real = protocols.load_protocol_data
    return lambda config: _scrambled(real(config), how)


def _runs(run) -> dict:
    """{"clean": run(), "labels": run() with test labels scrambled, "inputs": ...}."""
    out = {"clean": run()}
    for how in SCRAMBLES:
        with pytest.MonkeyPatch.context() as mp:
            loader = _patched_loader(how)
            mp.setattr(protocols, "load_protocol_data", loader)
            mp.setattr(study_module, "load_protocol_data", loader)
            out[how] = run()
    return out


def _no_test(row):
    """A row (or list of rows) without its test scores: what a selection may depend on."""
    if isinstance(row, list):
        return [_no_test(r) for r in row]
    return {k: v for k, v in row.items() if not k.startswith("test")}


def _test_scores(rows) -> list:
    return [r["test_accuracy"] for r in rows]


@pytest.fixture(scope="module")
def yinyang_runs():
    config = default_config("yinyang", quick=True)
    return _runs(lambda: run_experiment(config, progress=False)[0])


@pytest.fixture(scope="module")
def mnist_runs(mnist_dir):
    config = default_config("mnist", quick=True, data_dir=str(mnist_dir))
    return _runs(lambda: run_experiment(config, progress=False)[0])


@pytest.fixture(scope="module")
def study_runs():
    return _runs(lambda: study_module.run_study("yinyang", seeds=[0], quick=True,
                                                progress=False)[0])


def _assert_same_selection(runs: dict) -> None:
    clean = runs["clean"]
    for how in SCRAMBLES:
        other = runs[how]
        # the scramble took effect: the test scores moved ...
        assert _test_scores(other["sweep"]) != _test_scores(clean["sweep"]), how
        # ... and nothing chosen or scored on validation did
        assert [r["val_accuracy"] for r in other["sweep"]] == [
            r["val_accuracy"] for r in clean["sweep"]], how
        assert _no_test(other["sweep"]) == _no_test(clean["sweep"]), how
        assert _no_test(other["selected"]) == _no_test(clean["selected"]), how
        assert _no_test(other["selected_per_layer"]) == _no_test(clean["selected_per_layer"])
        assert _no_test(other["scaled"]) == _no_test(clean["scaled"]), how
        assert other["original"]["val_accuracy"] == clean["original"]["val_accuracy"], how


def test_test_split_cannot_move_the_clean_selection(yinyang_runs):
    _assert_same_selection(yinyang_runs)
    assert len(yinyang_runs["clean"]["selected_per_layer"]) == 3


def test_test_split_cannot_move_the_mnist_quick_selection(mnist_runs):
    _assert_same_selection(mnist_runs)


def test_test_split_cannot_move_the_study(study_runs):
    _assert_same_selection(study_runs)
    clean = study_runs["clean"]
    for how in SCRAMBLES:
        other = study_runs[how]
        assert _test_scores(other["comparison"]) != _test_scores(clean["comparison"]), how
        # every comparison row: the same chosen setting and validation score
        assert _no_test(other["comparison"]) == _no_test(clean["comparison"]), how
        assert _no_test(other["ablations"]) == _no_test(clean["ablations"]), how
        assert _no_test(other["baselines"]) == _no_test(clean["baselines"]), how
        assert other["study"]["decision_setting"] == clean["study"]["decision_setting"], how


def test_select_ignores_test_scores():
    """Rows tied on validation, linear steps and rank: the first wins, whatever the test says."""
    rows = [{"val_accuracy": 0.9, "linear_steps": 5, "rank_resolved": 3, "test_accuracy": t}
            for t in (0.1, 0.9, 0.5)]
    rows.append({"val_accuracy": 0.9, "linear_steps": 4, "rank_resolved": 3,
                 "test_accuracy": 1.0})
    assert select(rows) is rows[0]
    flipped = [{**r, "test_accuracy": 1 - r["test_accuracy"]} for r in rows]
    assert select(flipped) is flipped[0]


# -- splits ---------------------------------------------------------------------------------


def _rows(X: torch.Tensor) -> set[bytes]:
    return {row.numpy().tobytes() for row in X}


def _assert_disjoint(*splits: Split) -> None:
    seen: set[bytes] = set()
    for split in splits:
        rows = _rows(split.X)
        assert len(rows) == len(split), "duplicate points inside a split"
        assert not rows & seen, "a point sits in two splits"
        seen |= rows


def test_yinyang_splits_are_disjoint_and_from_their_documented_seeds():
    splits = yinyang_splits()
    for split, (n, seed) in zip((splits.train, splits.val, splits.test),
                                ((5000, 42), (2000, 41), (4000, 40)), strict=True):
        X, y = make_yinyang(n, seed)
        assert torch.equal(split.X, X) and torch.equal(split.y, y)
    _assert_disjoint(splits.train, splits.val, splits.test)
    data = load_protocol_data(default_config("yinyang"))
    assert data.val is splits.val or torch.equal(data.val.X, splits.val.X)
    assert torch.equal(data.test.X, splits.test.X) and torch.equal(data.trajectories.X,
                                                                   splits.train.X)


def test_paper_scaling_is_judged_off_the_test_set():
    data = load_protocol_data(default_config("yinyang", "paper"))
    pool_X, pool_y = make_yinyang(20000, 123)
    assert torch.equal(data.test.X, pool_X[:4000]) and torch.equal(data.test.y, pool_y[:4000])
    assert torch.equal(data.scaling.X, pool_X[:2000])  # the paper's choice: half of its test
    _assert_disjoint(data.scaling_judge, data.test)
    _assert_disjoint(data.scaling_judge, data.held_out)


def test_scale_for_protocol_judges_on_the_judge_split(monkeypatch):
    seen = {}

    def fake_scale_layer(model, layer, X, y, **kwargs):
        seen.update(kwargs)
        return None, None

    monkeypatch.setattr(protocols, "scale_layer", fake_scale_layer)
    config = default_config("yinyang", "paper")
    data = load_protocol_data(config)
    scale_for_protocol(config, None, data, 1)
    assert torch.equal(seen["judge"][0], data.scaling_judge.X)
    clean = default_config("yinyang")
    scale_for_protocol(clean, None, load_protocol_data(clean), 1)
    assert seen["judge"] is None


def test_mnist_splits_are_disjoint(mnist_dir):
    splits = idx_splits(str(mnist_dir), n_val=None, seed=0)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (55000, 5000, 10000)
    _assert_disjoint(splits.train, splits.val, splits.test)
    data = load_protocol_data(default_config("mnist", data_dir=str(mnist_dir)))
    assert torch.equal(data.val.X, splits.val.X) and torch.equal(data.test.X, splits.test.X)


# -- protocol wiring ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scaled_layer():
    """A quick clean base model, its scaled layer 1 and the clean data."""
    config = default_config("yinyang", quick=True)
    data = load_protocol_data(config)
    model = train_base(config, data, progress=False)
    scaled, _ = scale_for_protocol(config, model, data, 1)
    return config, data, scaled


def _same_map(a: DMD, b: DMD, steps: int) -> bool:
    """Operators compared through their basis-free k-step maps (V's signs are arbitrary)."""
    ma, mb = a.transition(steps), b.transition(steps)
    return bool(torch.allclose(ma, mb, rtol=1e-6, atol=1e-6 * float(mb.abs().max())))


def test_clean_rows_use_the_exact_rollout_on_within_trajectory_pairs(scaled_layer,
                                                                      yinyang_runs):
    config, data, scaled = scaled_layer
    assert config.exact_rollout and config.pairing == "trajectory"
    assert {(r["pairing"], r["exact_rollout"]) for r in yinyang_runs["clean"]["sweep"]} == {
        ("trajectory", True)}
    rows, fits = sweep_layer(config, scaled, data, progress=False)
    states = collect_trajectories(scaled, data.trajectories.X).states
    checked = 0
    for index, row in enumerate(rows):
        dmd, hybrid = fits[index]
        assert dmd.exact_rollout and (row["pairing"], row["exact_rollout"]) == (
            "trajectory", True)
        if row["tikhonov"] == 0.0:
            continue  # undamped: the sweep's Gram route and the SVD differ in tiny modes
        # the sweep resolves the rank on the Gram spectrum; refit the SVD with the rank it kept
        lifted = TimeDelay(row["n_delays"], constant=row["constant"]).fit_transform(states)
        direct = DMD(row["rank_resolved"], tikhonov=row["tikhonov"],
                     exact_rollout=True).fit(lifted)
        assert _same_map(dmd, direct, hybrid.linear_steps), row
        checked += 1
    assert checked >= len(rows) // 4


def test_paper_row_is_the_concatenated_full_rank_fit(scaled_layer):
    _, data, scaled = scaled_layer
    config = dataclasses.replace(default_config("yinyang", "paper", quick=True),
                                 delays=(1, 5), trajectory_counts=(300,))
    assert (config.pairing, config.exact_rollout) == ("concatenated", False)
    rows, fits = sweep_layer(config, scaled, data, progress=False)
    assert [r["n_delays"] for r in rows] == [1, 5]
    series = collect_trajectories(scaled, data.trajectories.X).subset(slice(0, 300))
    for index, row in enumerate(rows):
        dmd, hybrid = fits[index]
        assert (row["pairing"], row["exact_rollout"], row["trajectories"]) == (
            "concatenated", False, 300)
        lifted = TimeDelay(row["n_delays"]).fit_transform(series.concatenated())
        direct = DMD(None).fit_pairs(*snapshot_pairs(lifted))
        windows = DMD(None).fit(TimeDelay(row["n_delays"]).fit_transform(series.states))
        assert direct.rank_ == dmd.rank_ and not dmd.exact_rollout
        assert _same_map(dmd, direct, hybrid.linear_steps), row
        assert not _same_map(windows, direct, hybrid.linear_steps)  # the check can tell


# -- precision ------------------------------------------------------------------------------


def test_float64_override_is_a_float64_product_and_round_trips(scaled_layer, tmp_path):
    _, data, scaled = scaled_layer
    states = collect_trajectories(scaled, data.trajectories.X).states
    observable = TimeDelay(2, constant=True).fit(states)
    dmd = DMD(0.9999, exact_rollout=True).fit(observable.transform(states))
    fast = KoopmanHybrid.from_dmd(scaled, observable, dmd)
    double = KoopmanHybrid.from_dmd(scaled, observable, dmd, compute_dtype=torch.float64)
    x = data.val.X
    with torch.no_grad():
        lifted = observable.transform(double.prefix_states(x))[:, -1]
        manual = double.tail((lifted.double() @ double.linear_map.double().T).float())
        out64, out32 = double(x), fast(x)
    assert out64.dtype == torch.float32
    assert torch.equal(out64, manual)
    assert not torch.equal(out64, out32)
    save_hybrid(double, tmp_path)
    save_hybrid(fast, tmp_path, "fast")
    loaded, loaded_fast = load_hybrid(tmp_path), load_hybrid(tmp_path, "fast")
    assert loaded.compute_dtype == torch.float64 and loaded_fast.compute_dtype is None
    with torch.no_grad():
        assert torch.equal(loaded(x), out64)
        assert torch.equal(loaded_fast(x), out32)
