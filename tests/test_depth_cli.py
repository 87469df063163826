"""``koopnet depth-fit`` / ``depth-evaluate``: a depth hybrid of a user's own network, named by a
factory (tests/depth_factory.py) and a safetensors state dict; the saved hybrid reloads to the
in-memory one exactly, and each bad input is one error line."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch

from koopnet import linearize_depth
from koopnet.cli import main
from koopnet.io.artifacts import file_sha256
from koopnet.io.depth import build_model, load_depth_files, load_depth_hybrid, save_depth_hybrid

HERE = Path(__file__).resolve().parent
BLOCKS = "blocks.0,blocks.1,blocks.2,blocks.3"
INTERNAL = r"Traceback|size mismatch|Error\(s\) in loading|has no attribute|NoneType"


@pytest.fixture(autouse=True)
def _factory_importable(monkeypatch):
    monkeypatch.syspath_prepend(str(HERE))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """weights W (depth 4, width 6), inputs X [64, 4], labels y (the model's, 8 flipped)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(HERE))
        from depth_factory import write_tiny
    folder = tmp_path_factory.mktemp("depth_files")
    files = write_tiny(folder, seed=1, n=64)
    with torch.no_grad():
        y = files["model"](files["X_t"]).argmax(1)
    y[:8] = (y[:8] + 1) % 3
    np.save(folder / "y.npy", y.numpy())
    return {**files, "y": str(folder / "y.npy"), "y_t": y}


def _fit_args(files, out, *extra, factory="depth_factory:make_tiny"):
    return ["--quiet", "depth-fit", "--model-factory", factory, "--weights", files["W"],
            "--blocks", BLOCKS, "--data", files["X"], "--out", str(out), *extra]


@pytest.fixture(scope="module")
def fitted(files, tmp_path_factory):
    out = tmp_path_factory.mktemp("fits") / "fit"
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(HERE))
        assert main(_fit_args(files, out, "--n-delays", "2",
                              "--factory-kwargs", '{"depth": 4}')) == 0
    return out


def test_fit_writes_the_artifact_and_reloads_to_the_in_memory_hybrid(files, fitted):
    meta = json.loads((fitted / "depth_hybrid.json").read_text())
    config = meta["config"]
    assert config["factory"] == {"path": "depth_factory:make_tiny", "kwargs": {"depth": 4}}
    assert config["blocks"] == BLOCKS.split(",") and config["per_position"] is False
    assert (config["n_delays"], config["linear_steps"]) == (2, 2)
    assert meta["parents"]["weights"] == file_sha256(files["W"])
    assert meta["parents"]["data"] == file_sha256(files["X"])
    memory = linearize_depth(files["model"], BLOCKS.split(","), files["X_t"], n_delays=2)
    again = load_depth_hybrid(fitted)
    assert torch.equal(again.linear_map, memory.linear_map)
    with torch.no_grad():
        assert torch.equal(again(files["X_t"]), memory(files["X_t"]))
        assert not torch.equal(again(files["X_t"]), files["model"](files["X_t"]))


def test_evaluate_scores_original_and_hybrid(files, fitted, capsys):
    capsys.readouterr()
    assert main(["--quiet", "depth-evaluate", str(fitted), "--data", files["X"],
                 "--labels", files["y"]]) == 0
    line = json.loads(capsys.readouterr().out.strip())
    results = json.loads((fitted / "results.json").read_text())
    metrics = results["metrics"]
    assert line["metrics"] == metrics and metrics["metric"] == "accuracy"
    hybrid, model, _ = load_depth_files(fitted)
    with torch.no_grad():
        expect = {name: float((m(files["X_t"]).argmax(1) == files["y_t"]).double().mean())
                  for name, m in (("original", model), ("hybrid", hybrid))}
    assert metrics["original"] == 56 / 64
    assert (metrics["original"], metrics["hybrid"]) == (expect["original"], expect["hybrid"])
    assert metrics["relative_error"] > 0
    assert results["parents"]["weights"] == file_sha256(files["W"])


def test_evaluate_without_labels_gives_agreement(files, fitted, tmp_path, capsys):
    out = tmp_path / "eval"
    assert main(["--quiet", "depth-evaluate", str(fitted), "--data", files["X"],
                 "--out", str(out)]) == 0
    metrics = json.loads((out / "results.json").read_text())["metrics"]
    assert metrics["metric"] == "agreement_with_original" and metrics["original"] == 1.0
    assert 0.0 <= metrics["hybrid"] <= 1.0


def test_moved_weights_are_accepted_changed_weights_refused(files, fitted, tmp_path, capsys):
    moved = tmp_path / "moved.safetensors"
    moved.write_bytes(Path(files["W"]).read_bytes())
    out = tmp_path / "eval"
    args = ["--quiet", "depth-evaluate", str(fitted), "--data", files["X"], "--out", str(out)]
    assert main([*args, "--weights", str(moved)]) == 0
    state = files["model"].state_dict()
    state["head.bias"] = state["head.bias"] + 1
    safetensors.torch.save_file(state, moved)
    capsys.readouterr()
    assert main([*args, "--force", "--weights", str(moved)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "is not the weights file this depth hybrid was fitted" in err


def test_save_refuses_weights_the_hybrid_was_not_fitted_on(files, tmp_path):
    model = build_model("depth_factory:make_tiny", files["W"])
    hybrid = linearize_depth(model, BLOCKS.split(","), files["X_t"])
    torch.manual_seed(5)
    other = tmp_path / "other.safetensors"
    safetensors.torch.save_file(build_model("depth_factory:make_tiny", files["W"]).state_dict()
                                | {"embed.bias": torch.zeros(6)}, other)
    with pytest.raises(ValueError, match="does not hold the weights this hybrid was fitted on"):
        save_depth_hybrid(hybrid, tmp_path / "h", factory="depth_factory:make_tiny",
                          weights=other)
    path = save_depth_hybrid(hybrid, tmp_path / "h", factory="depth_factory:make_tiny",
                             weights=files["W"])
    with torch.no_grad():
        assert torch.equal(load_depth_hybrid(path.parent)(files["X_t"]), hybrid(files["X_t"]))


def test_an_edited_hybrid_reloads_with_its_edited_map(files, tmp_path):
    from koopnet.editing import edit_modes

    model = build_model("depth_factory:make_tiny", files["W"])
    hybrid = linearize_depth(model, BLOCKS.split(","), files["X_t"], n_delays=2)
    edited = edit_modes(hybrid, remove=[0])
    path = save_depth_hybrid(edited, tmp_path / "h", factory="depth_factory:make_tiny",
                             weights=files["W"])
    again = load_depth_hybrid(path.parent)
    with torch.no_grad():
        assert torch.equal(again(files["X_t"]), edited(files["X_t"]))
        assert not torch.equal(again(files["X_t"]), hybrid(files["X_t"]))


@pytest.mark.parametrize(("factory", "kwargs", "width"), [
    ("koopnet.lab.residual:ResidualMLP", {"n_in": 4, "width": 8, "n_blocks": 3, "n_out": 3}, 4),
    ("koopnet.lab.vit:ViT", {"width": 8, "depth": 3, "heads": 2, "mlp_ratio": 1}, 784),
])
def test_builtin_architectures_work_as_factories(factory, kwargs, width, tmp_path):
    from koopnet.io.depth import import_factory

    torch.manual_seed(0)
    model = import_factory(factory)(**kwargs)
    weights = tmp_path / "w.safetensors"
    safetensors.torch.save_file(model.state_dict(), weights)
    X = torch.randn(16, width)
    safetensors.torch.save_file({"X": X}, tmp_path / "X.safetensors")
    out = tmp_path / "fit"
    assert main(["--quiet", "depth-fit", "--model-factory", factory, "--factory-kwargs",
                 json.dumps(kwargs), "--weights", str(weights), "--blocks",
                 "blocks.0,blocks.1,blocks.2", "--data", str(tmp_path / "X.safetensors"),
                 "--per-position", "--out", str(out)]) == 0
    memory = linearize_depth(model.eval(), ["blocks.0", "blocks.1", "blocks.2"], X,
                             per_position=True)
    with torch.no_grad():
        assert torch.equal(load_depth_hybrid(out)(X), memory(X))


def _bad_npy(files, tmp_path):
    np.save(tmp_path / "X5.npy", np.zeros((8, 5), dtype=np.float32))
    return str(tmp_path / "X5.npy")


def _pickled(files, tmp_path):
    torch.save(files["model"].state_dict(), tmp_path / "w.safetensors")
    return str(tmp_path / "w.safetensors")


FIT_CASES = {
    "module missing": (["--model-factory", "no_such_pkg_koopnet:make"], "cannot be imported"),
    "name missing": (["--model-factory", "depth_factory:nope"], "defines no 'nope'"),
    "not callable": (["--model-factory", "depth_factory:NOT_CALLABLE"], "is a int, not a call"),
    "not a module": (["--model-factory", "depth_factory:make_dict"],
                     "returned a dict, not a torch.nn.Module"),
    "factory raises": (["--model-factory", "depth_factory:make_failing"],
                       "raised RuntimeError: the factory broke"),
    "no colon": (["--model-factory", "make_tiny"], "not of the form package.module:function"),
    "kwargs not JSON": (["--factory-kwargs", "{depth"], "is not valid JSON"),
    "kwargs rejected": (["--factory-kwargs", '{"layers": 3}'], "raised TypeError"),
    "fewer blocks": (["--factory-kwargs", '{"depth": 3}'],
                     r"unexpected tensors \['blocks.3.fc1.bias', 'blocks.3.fc1.weight'"),
    "other width": (["--factory-kwargs", '{"width": 5}'], "has shape .*needs .*factory-kwargs"),
    "unknown block": (["--blocks", "blocks.0,blocks.9"], "block 'blocks.9' is not a submodule"),
    "weights missing": (["--weights", "nope.safetensors"],
                        "weights file 'nope.safetensors' does not exist"),
    "too many delays": (["--n-delays", "5"], "n_delays=5 needs trajectories of at least 7"),
    "data missing": (["--data", "missing.npy"], "data file 'missing.npy' does not exist"),
    "data shape": (["--data", _bad_npy], r"data of shape \[8, 5\] does not fit the model"),
    "pickled weights": (["--weights", _pickled], "koopnet never unpickles"),
}


def _set_flag(args: list[str], flag: str, value: str) -> None:
    if flag in args:
        args[args.index(flag) + 1] = value
    else:
        args += [flag, value]


def _one_line_error(args: list[str], pattern: str, capsys) -> str:
    """The command exits 2 with one stderr line matching ``pattern``; returns the line."""
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("koopnet: error:"), err
    assert re.search(pattern, err), err
    return err


@pytest.mark.parametrize("case", FIT_CASES, ids=list(FIT_CASES))
def test_fit_bad_input_is_one_line(case, files, tmp_path, capsys):
    extra, pattern = FIT_CASES[case]
    extra = [e(files, tmp_path) if callable(e) else e for e in extra]
    args = _fit_args(files, tmp_path / "out")
    for flag, value in zip(extra[::2], extra[1::2], strict=True):
        _set_flag(args, flag, value)
    err = _one_line_error(args, pattern, capsys)
    assert not re.search(INTERNAL, err), err
    assert not (tmp_path / "out").exists()


def test_evaluate_refuses_a_model_without_one_output_tensor(files, tmp_path, capsys):
    out = tmp_path / "fit"
    assert main(_fit_args(files, out, factory="depth_factory:TupleOut")) == 0
    capsys.readouterr()
    assert main(["--quiet", "depth-evaluate", str(out), "--data", files["X"]]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "the model returns a tuple, not a tensor" in err, err


def test_prints_of_the_users_code_go_to_stderr(files, tmp_path, capsys):
    capsys.readouterr()
    assert main(_fit_args(files, tmp_path / "fit", factory="depth_factory:make_noisy")) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["linear_steps"] == 3
    assert "building the model" in captured.err  # once for the fit, once for the save check


@pytest.mark.parametrize(("extra", "pattern"), [
    (["--data", "X7"], r"data of shape \[8, 7\] does not fit the model"),
    (["--labels", "short"], "labels has 3 entries but data 'X.npy' has 64 samples"),
    (["--batch-size", "0"], "--batch-size"),
])
def test_evaluate_bad_input_is_one_line(extra, pattern, files, fitted, tmp_path, capsys):
    np.save(tmp_path / "X7.npy", np.zeros((8, 7), dtype=np.float32))
    np.save(tmp_path / "short.npy", np.zeros(3, dtype=np.int64))
    names = {"X7": str(tmp_path / "X7.npy"), "short": str(tmp_path / "short.npy")}
    args = ["--quiet", "depth-evaluate", str(fitted), "--data", files["X"], "--out",
            str(tmp_path / "eval")]
    _set_flag(args, extra[0], names.get(extra[1], extra[1]))
    _one_line_error(args, pattern, capsys)


def test_console_script_imports_from_the_current_folder_logs_to_stderr(files, tmp_path):
    """The installed ``koopnet`` finds ./depth_factory.py (the cwd is not on its sys.path by
    itself); stdout is one JSON line, the logs go to stderr and --quiet silences them."""
    script = Path(sys.executable).with_name("koopnet")
    if not script.is_file():
        pytest.skip("the koopnet console script is not installed next to this Python")
    env = {**os.environ, "PYTHONPATH": "", "OMP_NUM_THREADS": "1"}
    args = [str(script), "depth-fit", *_fit_args(files, tmp_path / "fit")[2:]]
    run = subprocess.run(args, cwd=HERE, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["linear_steps"] == 3 and run.stdout.count("\n") == 1
    assert "fitting a depth hybrid over 4 blocks on 64 samples" in run.stderr
    quiet = subprocess.run([str(script), "--quiet", *args[1:], "--force"], cwd=HERE, env=env,
                           capture_output=True, text=True, timeout=120)
    assert quiet.returncode == 0 and quiet.stderr == "", quiet.stderr


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fit_and_evaluate_on_cuda_score_as_on_the_cpu(files, fitted, tmp_path, capsys):
    out = tmp_path / "fit"
    assert main(_fit_args(files, out, "--n-delays", "2", "--device", "cuda")) == 0
    config = json.loads((out / "depth_hybrid.json").read_text())["config"]
    assert config["device"].startswith("cuda")
    scores = []
    for folder, device in ((fitted, "cpu"), (out, "cuda")):
        assert main(["--quiet", "depth-evaluate", str(folder), "--data", files["X"], "--labels",
                     files["y"], "--out", str(tmp_path / device), "--device", device]) == 0
        scores.append(json.loads((tmp_path / device / "results.json").read_text())["metrics"])
    assert scores[0]["original"] == scores[1]["original"]
    assert abs(scores[0]["hybrid"] - scores[1]["hybrid"]) <= 2 / 64
