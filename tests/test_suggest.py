"""`koopnet suggest`: a layer and h from closed-form scores, with a named calibration."""

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from koopnet.cli.main import main
from koopnet.lab.predict import (
    BUILTIN_CALIBRATION,
    BUILTIN_CALIBRATIONS,
    FIRST_ORDER_BOUND,
    calibrated_threshold,
    drop_scores,
    layer_cells,
)

N_INSERTED = 3  # T = 5 states: h = 0..3 on each layer


@pytest.fixture(scope="module")
def scale_dirs(tmp_path_factory):
    """Layers 1 and 2 of one tiny Yin-Yang MLP, each scaled (seconds)."""
    root = tmp_path_factory.mktemp("suggest")
    assert main(["--quiet", "train", "--dataset", "yinyang", "--widths", "2,6,6,6,2",
                 "--epochs", "2", "--batch-size", "512", "--out", str(root / "train")]) == 0
    for layer in (1, 2):
        assert main(["--quiet", "scale", str(root / "train"), "--layer", str(layer),
                     "--n-inserted", str(N_INSERTED), "--epochs", "30", "--init", "identity",
                     "--out", str(root / f"scale{layer}")]) == 0
    return root


def _suggest(capsys, *args):
    code = main(["--quiet", "suggest", *map(str, args)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    lines = captured.out.strip().splitlines()
    assert len(lines) == 1
    return json.loads(lines[0])


def _calibration(tmp_path, cells, name="calibration.json"):
    path = tmp_path / name
    path.write_text(json.dumps({"seeds": [7], "commit": "abc", "cells": cells}))
    return path


def test_default_is_the_flip_score_under_its_first_order_bound(scale_dirs, capsys):
    out = _suggest(capsys, scale_dirs / "scale1", scale_dirs / "scale2", "--tolerance", "1")
    assert out["score"] == "flip" and out["threshold"] == 0.01  # the tolerance: no calibration
    assert out["calibration"]["source"].startswith("first-order bound")
    cells = out["cells"]
    passing = [c for c in cells if c["flip"] <= 0.01]
    expected = (min(passing, key=lambda c: (c["h"], c["flip"])) if passing
                else min(cells, key=lambda c: c["flip"]))
    assert (out["layer"], out["h"]) == (expected["layer"], expected["h"])
    yinyang = _suggest(capsys, scale_dirs / "scale1", "--calibration", "yinyang")
    assert yinyang["threshold"] == BUILTIN_CALIBRATIONS["flip"]["thresholds"][0.005]
    with pytest.raises(ValueError, match="first-order bound thresholds the flip score, not "):
        calibrated_threshold(FIRST_ORDER_BOUND, "residual", 0.005)


def test_suggest_on_scale_folders_follows_the_builtin_calibration(scale_dirs, capsys):
    out = _suggest(capsys, scale_dirs / "scale1", scale_dirs / "scale2", "--score", "residual")
    assert out["calibration"]["source"].startswith("built-in: clean Yin-Yang seeds 0-2")
    assert out["calibration"]["tolerance"] == 0.005 and out["tolerance_points"] == 0.5
    assert out["threshold"] == BUILTIN_CALIBRATION["thresholds"][0.005]
    cells = out["cells"]
    assert sorted((c["layer"], c["h"]) for c in cells) == [
        (layer, h) for layer in (1, 2) for h in range(N_INSERTED + 1)]
    # the proposal: the smallest h under the threshold (ties: the lower score), else the lowest
    passing = [c for c in cells if c["residual"] <= out["threshold"]]
    expected = (min(passing, key=lambda c: (c["h"], c["residual"])) if passing
                else min(cells, key=lambda c: c["residual"]))
    assert (out["layer"], out["h"]) == (expected["layer"], expected["h"])
    assert out["under_threshold"] == bool(passing)
    assert out["linear_steps"] == N_INSERTED + 1 - out["h"]
    assert [s["layer"] for s in out["sources"]] == [1, 2]


def test_calibration_file_sets_the_threshold(scale_dirs, capsys, tmp_path):
    cells = [{"residual": 0.5, "drop": 0.001}, {"residual": 0.7, "drop": 0.02},
             {"residual": 0.9, "drop": 0.004}]
    path = _calibration(tmp_path, cells)
    out = _suggest(capsys, scale_dirs / "scale1", "--score", "residual", "--calibration", path)
    # 0.7 failed a 0.5-point tolerance, so 0.9 is not admitted either: threshold 0.5
    assert out["threshold"] == 0.5 and out["calibration"]["n_cells"] == 3
    assert str(path) in out["calibration"]["source"] and "seeds [7]" in out["calibration"]["source"]
    loose = _suggest(capsys, scale_dirs / "scale1", "--score", "residual", "--calibration", path,
                     "--tolerance", "2.5")
    assert loose["threshold"] == 0.9  # nothing failed 2.5 points
    strict = _calibration(tmp_path, [{"residual": 0.0, "drop": 0.5}], "strict.json")
    none = _suggest(capsys, scale_dirs / "scale1", "--score", "residual", "--calibration",
                    strict)
    assert none["threshold"] is None and none["under_threshold"] is False  # -inf: no cell passes
    assert none["value"] == min(c["residual"] for c in none["cells"])


def test_rollout_score_needs_a_calibration_with_rollout_cells(scale_dirs, capsys, tmp_path):
    path = _calibration(tmp_path, [{"rollout": 1e9, "drop": 0.0}])
    out = _suggest(capsys, scale_dirs / "scale2", "--score", "rollout", "--calibration", path)
    assert out["score"] == "rollout" and out["h"] == 0  # everything passes: most linear steps


def test_layer_cells_are_the_drop_scores_of_every_h():
    states = torch.randn(30, 5, 3, dtype=torch.float64).cumsum(1)
    cells = layer_cells(states[:20], states[20:], 4, out_width=2)
    assert [c["h"] for c in cells] == [0, 1, 2, 3]
    assert [c["linear_steps"] for c in cells] == [4, 3, 2, 1]
    assert cells[2]["residual"] == drop_scores(states[:20], states[20:], 2,
                                               out_width=2)["residual"]


def test_builtin_calibration_uses_the_largest_tolerance_not_above_the_asked_one():
    threshold, record = calibrated_threshold(BUILTIN_CALIBRATION, "residual", 0.015)
    assert record["tolerance"] == 0.01 and threshold == BUILTIN_CALIBRATION["thresholds"][0.01]
    with pytest.raises(ValueError, match="below the smallest one the built-in"):
        calibrated_threshold(BUILTIN_CALIBRATION, "residual", 0.001)


# ---------------------------------------------------------------- a reproduce folder


def _quick_results(tmp_path, **changes):
    """A reproduce folder whose results.json records the quick clean Yin-Yang recipe."""
    from koopnet.lab.recipes import default_config

    config = json.loads(json.dumps(dataclasses.asdict(default_config("yinyang", quick=True))))
    config.update(changes)
    folder = tmp_path / "run"
    folder.mkdir()
    rows = [{"layer": layer, "n_delays": h, "val_accuracy": 0.8 + 0.01 * h}
            for layer in (1, 2, 3) for h in range(11)]
    (folder / "results.json").write_text(json.dumps({
        "config": config, "original": {"val_accuracy": 0.9}, "sweep": rows}))
    return folder


def test_reproduce_folder_rebuilds_its_networks_and_shows_its_sweep(tiny_mlp, monkeypatch,
                                                                    tmp_path, capsys):
    """The rebuild itself is koopnet reproduce's own code; here it is stubbed with a tiny
    trained MLP so the test runs in seconds."""
    from koopnet.lab import protocols
    from koopnet.lab.recipes import default_config
    from koopnet.scaling import scale_layer

    model, X, y = tiny_mlp
    recipe = dataclasses.replace(default_config("yinyang", quick=True).scaling,
                                 epochs=1, lr=1e-12)
    monkeypatch.setattr(protocols, "train_base", lambda config, data, progress: model)
    monkeypatch.setattr("koopnet.models.accuracy", lambda *args: 0.9)

    def scale(config, m, data, layer, progress):
        scaled, report = scale_layer(m, layer, X, y, n_inserted=10, config=recipe,
                                     init="identity")
        return scaled, dataclasses.replace(report, ok=layer != 2)  # layer 2 "failed"

    monkeypatch.setattr(protocols, "scale_for_protocol", scale)
    out = _suggest(capsys, _quick_results(tmp_path))
    assert out["sources"] == [{"folder": str((tmp_path / "run").resolve()), "rebuilt": True,
                               "same_base_model": True, "failed_layers": [2]}]
    assert sorted({c["layer"] for c in out["cells"]}) == [1, 3] and len(out["cells"]) == 2 * 11
    validated = out["run_validated"]  # the run's own row at the proposal, shown beside it
    assert math.isclose(validated["val_accuracy"], 0.8 + 0.01 * out["h"])
    assert math.isclose(validated["drop_points"], 100 * (0.9 - validated["val_accuracy"]))


# ---------------------------------------------------------------- bad input: one line each


BAD = {
    "missing folder": (lambda d, t: [t / "none"], "is not a folder; pass output folders of "
                                                  "`koopnet scale`"),
    "not a stage folder": (lambda d, t: [t], "holds no scaled.json: pass output folders of "
                                             "`koopnet scale` or one of `koopnet reproduce`"),
    "same layer twice": (lambda d, t: [d / "scale1", d / "scale1"],
                         "two scale folders scale the same layer (layers [1, 1])"),
    "negative tolerance": (lambda d, t: [d / "scale1", "--tolerance", "-1"],
                           "--tolerance -1.0 must be a number of accuracy points >= 0"),
    "tolerance below the built-in": (lambda d, t: [d / "scale1", "--score", "residual",
                                                   "--tolerance", "0.1"],
                                     "tolerance 0.1 point is below the smallest one"),
    "rollout without calibration": (lambda d, t: [d / "scale1", "--score", "rollout"],
                                    "scores 'residual', not 'rollout'; pass a calibration file"),
    "unknown score": (lambda d, t: [d / "scale1", "--score", "r2"],
                      "argument --score: invalid choice: 'r2'"),
    "calibration not json": (lambda d, t: [d / "scale1", "--calibration", _text(t, "{")],
                             "is not JSON"),
    "calibration without cells": (lambda d, t: [d / "scale1", "--calibration",
                                                _text(t, '{"x": 1}')], "holds no list 'cells'"),
    "calibration lacks the score": (lambda d, t: [d / "scale1", "--calibration",
                                                  _text(t, '{"cells": [{"drop": 0}]}')],
                                    "has no cells with both 'flip' and 'drop'"),
    "max samples": (lambda d, t: [d / "scale1", "--max-samples", "0"],
                    "--max-samples 0 must be >= 1"),
    "paper protocol run": (lambda d, t: [_quick_results(t, protocol="paper")],
                           "is a paper-protocol run, whose 'validation' set is its test set"),
    "changed recipe": (lambda d, t: [_quick_results(t, n_inserted=7)],
                       "is not one this koopnet version has"),
    "run and scale folders": (lambda d, t: [_quick_results(t), d / "scale1"],
                              "pass one koopnet reproduce folder alone, or scale folders"),
}


def _text(tmp_path, text):
    path = tmp_path / "calibration.json"
    path.write_text(text)
    return path


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_one_clear_line(case, scale_dirs, tmp_path, capsys):
    make, message = BAD[case]
    code = main(["--quiet", "suggest", *map(str, make(scale_dirs, tmp_path))])
    captured = capsys.readouterr()
    assert code == 2 and captured.out == ""
    assert captured.err.startswith("koopnet: error: ") and message in captured.err
    assert len(captured.err.strip().splitlines()) == 1


def test_a_setting_added_after_the_run_must_hold_its_default():
    from koopnet.cli.suggest import _agrees

    default = {"a": 1, "base": {"lr": 0.1, "schedule": None}}
    current = {"a": 2, "base": {"lr": 0.1, "schedule": None}}
    assert _agrees({"a": 2, "base": {"lr": 0.1}}, current, default)  # schedule: default
    assert not _agrees({"a": 2, "base": {"lr": 0.1}}, {**current, "base": {
        "lr": 0.1, "schedule": "cosine"}}, default)  # a new setting that changes the run
    assert not _agrees({"a": 2, "base": {"lr": 0.2}}, current, default)
    assert not _agrees({"a": 2, "old": 1, "base": {"lr": 0.1}}, current, default)


def test_builtin_calibrations_are_the_committed_measurements():
    """The thresholds written into koopnet.lab.predict are those benchmarks/predict_drop.py
    measured (its results file), not numbers typed in beside them."""
    results = Path(__file__).resolve().parents[1] / "benchmarks/results/predict_drop.json"
    measured = json.loads(results.read_text())["builtin_thresholds"]
    assert set(measured) == set(BUILTIN_CALIBRATIONS)
    for score, calibration in BUILTIN_CALIBRATIONS.items():
        assert calibration["score"] == score
        assert {float(k): v for k, v in measured[score].items()} == calibration["thresholds"]


def test_a_run_with_learned_observables_rebuilds_its_recipe(tmp_path):
    from koopnet.cli.suggest import _rebuilt_config
    from koopnet.lab.recipes import default_config

    config = default_config("yinyang", quick=True, observables=("delay", "learned"))
    folder = tmp_path / "learned"
    folder.mkdir()
    (folder / "results.json").write_text(json.dumps(
        {"config": json.loads(json.dumps(dataclasses.asdict(config)))}))
    results = json.loads((folder / "results.json").read_text())
    assert _rebuilt_config(results, folder) == config
