"""A user's float64 or half-precision weights go through ``koopnet scale``, ``fit`` and
``evaluate``: data files are read as float32, so every stage casts the inputs to the model's
precision (half models are scaled in float32, as :func:`koopnet.linearize` does); weights of
mixed precision are refused in one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import safetensors.torch
import torch

from koopnet.cli import main
from koopnet.cli.stages import stage_evaluate, stage_fit, stage_scale
from koopnet.io.serialize import load_with_meta
from koopnet.models import build_mlp, model_dtype
from koopnet.spec import FitSpec


def user_files(folder, dtype: torch.dtype) -> dict:
    """weights (in ``dtype``), config and a float64 .npy of 40 inputs for a 3-5-5-2 tanh MLP."""
    torch.manual_seed(0)
    state = build_mlp([3, 5, 5, 2], "tanh").state_dict()
    safetensors.torch.save_file({k: v.to(dtype) for k, v in state.items()},
                                str(folder / "w.safetensors"))
    (folder / "m.json").write_text(json.dumps({"widths": [3, 5, 5, 2], "activation": "tanh"}))
    np.save(folder / "X.npy", np.random.default_rng(0).normal(size=(40, 3)))
    return {"model": str(folder / "w.safetensors"), "config": str(folder / "m.json"),
            "data": str(folder / "X.npy")}


@pytest.mark.parametrize("dtype, scaled_dtype", [(torch.float64, torch.float64),
                                                 (torch.float16, torch.float32)])
def test_scale_fit_evaluate_a_model_saved_in_another_precision(tmp_path, dtype, scaled_dtype):
    files = user_files(tmp_path, dtype)
    stage_scale(tmp_path / "scale", **files, layer=1, n_inserted=3, epochs=2)
    scaled, _ = load_with_meta(tmp_path / "scale", "scaled")
    assert model_dtype(scaled) == scaled_dtype
    stage_fit(tmp_path / "fit", scale_dir=tmp_path / "scale", spec=FitSpec(1))
    path = stage_evaluate(tmp_path / "eval", fit_dir=tmp_path / "fit")
    metrics = json.loads(path.read_text())["metrics"]["data"]
    assert metrics["n"] == 40 and metrics["original"] == 1.0  # agreement with itself


def test_weights_of_mixed_precision_are_refused_in_one_line(tmp_path, capsys):
    files = user_files(tmp_path, torch.float64)
    state = safetensors.torch.load_file(files["model"])
    state["0.bias"] = state["0.bias"].float()
    safetensors.torch.save_file(state, files["model"])
    code = main(["--quiet", "scale", "--model", files["model"], "--config", files["config"],
                 "--data", files["data"], "--layer", "1", "--out", str(tmp_path / "o")])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(lines) == 1
    assert lines[0] == ("koopnet: error: the model's parameters mix the dtypes ['float32', "
                        "'float64']; save them in one precision (e.g. model.double() or "
                        "model.float() before export).")
