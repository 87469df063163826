"""A table of bad inputs to the Python API and the command line, each answered by one specific
message and never by a traceback from inside torch, numpy or safetensors.

API cases are pinned with ``pytest.raises(match=...)`` and checked for leaked internal wording;
CLI cases with ``main([...])``: a non-zero exit code and exactly one stderr line
``koopnet: error: ...`` matching the case's pattern. A second table pins inputs that look odd but
must work (float64/half models, Dropout, numpy scalars, small IDX sets).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import struct
import time

import numpy as np
import pytest
import safetensors.torch
import torch
from torch import nn

import koopnet
from koopnet.cli import main
from koopnet.dmd import DMD, PairStatistics
from koopnet.io.trajectories import fit_file
from koopnet.linearization import check_inputs, fit_hybrid, linearize
from koopnet.models import TrainConfig, build_mlp
from koopnet.spec import FitSpec

TINY = TrainConfig(epochs=2, batch_size=64)
# Words that only appear in errors raised deep inside torch/numpy/safetensors, never in koopnet's.
INTERNAL = (r"Traceback|mat1 and mat2|size mismatch|negative dimensions|object of type|"
            r"unsupported operand|has no attribute|not subscriptable|HeaderTooLarge|"
            r"invalid literal|can't convert|NoneType|range\(\) arg")

_IDX_NAMES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
              "t10k-labels-idx1-ubyte")


@functools.cache
def yinyang():
    return koopnet.make_yinyang(200, seed=1)


def X():
    return yinyang()[0].clone()


def Y():
    return yinyang()[1].clone()


def mlp(widths=(2, 6, 6, 2), activation="relu"):
    torch.manual_seed(0)
    return build_mlp(list(widths), activation)


def lin(**kwargs):
    """linearize with tiny defaults; a case overrides what it breaks."""
    args = dict(model=mlp(), layer=1, data=X(), n_inserted=2, n_delays=1,
                scaling_config=TINY)
    args.update(kwargs)
    return linearize(args.pop("model"), args.pop("layer"), args.pop("data"), **args)


class Residual(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.linear = nn.Linear(width, width)

    def forward(self, x):
        return x + self.linear(x)


def fitted_dmd():
    Xs = torch.randn(30, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    return DMD().fit_pairs(Xs, 0.5 * Xs)


def dict_loader():
    class Dicts(torch.utils.data.Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            return {"x": torch.zeros(2), "y": 0}

    return torch.utils.data.DataLoader(Dicts(), batch_size=4)


def scaled_model():
    from koopnet.scaling import scale_layer

    scaled, _ = scale_layer(mlp(), 1, X(), Y(), n_inserted=1, config=TINY, retries=0)
    return scaled


# ---------------------------------------------------------------------------------------------
# API: (call, exception type, message pattern)

API_CASES = {
    # the model
    "model not Sequential": (lambda: lin(model=nn.Linear(2, 2)), TypeError,
                             r"model must be an nn.Sequential MLP .* got Linear"),
    "residual block": (lambda: lin(model=nn.Sequential(nn.Linear(2, 6), nn.ReLU(), Residual(6),
                                                       nn.ReLU(), nn.Linear(6, 6), nn.ReLU(),
                                                       nn.Linear(6, 2))),
                       ValueError, r"model\[2\] is Residual where a Linear layer is needed"),
    "unknown activation": (lambda: lin(model=nn.Sequential(nn.Linear(2, 6), nn.Hardswish(),
                                                           nn.Linear(6, 6), nn.ReLU(),
                                                           nn.Linear(6, 2))),
                           ValueError, r"model\[1\] is Hardswish where an activation is needed"),
    "ends with activation": (lambda: lin(model=nn.Sequential(nn.Linear(2, 6), nn.ReLU(),
                                                             nn.Linear(6, 6), nn.ReLU())),
                             ValueError, r"ends with an activation \(model\[3\]\)"),
    "one hidden layer": (lambda: lin(model=mlp((2, 6, 2))), ValueError,
                         r"model has 1 hidden layer\(s\); linearising needs at least 2"),
    "nan weight": (lambda: lin(model=_nan_model()), ValueError,
                   r"model parameter '2.weight' contains 1 NaN"),
    "empty Sequential": (lambda: lin(model=nn.Sequential()), ValueError, r"model holds no layers"),
    # the layer
    "layer 0": (lambda: lin(layer=0), ValueError, r"layer=0 is out of range.*in 1\.\.1"),
    "layer too deep": (lambda: lin(layer=2), ValueError, r"layer=2 is out of range"),
    "layer a string": (lambda: lin(layer="1"), TypeError, r"layer='1' \(a string\) must be an"),
    "layer a float": (lambda: lin(layer=1.0), TypeError, r"layer=1\.0 must be an integer"),
    # the data
    "1-D data": (lambda: lin(data=X()[:, 0]), ValueError,
                 r"data has shape \(200,\); pass \[n_samples, n_features\]"),
    "0-D data": (lambda: lin(data=torch.tensor(1.0)), ValueError, r"data has shape \(\)"),
    "data a string": (lambda: lin(data="x.npy"), TypeError,
                      r"data must be a tensor or array; got str"),
    "data a dict": (lambda: lin(data={"x": X()}), TypeError, r"data must be a tensor or array"),
    "wrong width": (lambda: lin(data=torch.rand(20, 3)), ValueError,
                    r"data has 3 features per sample but the model's first layer expects 2"),
    "one sample": (lambda: lin(data=X()[:1]), ValueError, r"data has 1 sample; .*at least 2"),
    "empty data": (lambda: lin(data=torch.zeros(0, 2)), ValueError, r"data is empty"),
    "nan data": (lambda: lin(data=_with_nan()), ValueError,
                 r"data contains 1 NaN values \(first at index \(5, 1\)\)"),
    "inf data": (lambda: lin(data=X() * float("inf")), ValueError, r"data contains .*inf values"),
    "DataLoader of dicts": (lambda: lin(data=dict_loader()), TypeError,
                            r"yields dicts \(keys \['x', 'y'\]\).* tuples"),
    "empty DataLoader": (lambda: lin(data=torch.utils.data.DataLoader([])), ValueError,
                         r"yielded no batches"),
    # labels
    "labels beyond the outputs": (lambda: lin(labels=Y() + 5), ValueError,
                                  r"labels go up to 6 but the model has 2 outputs"),
    "negative labels": (lambda: lin(labels=Y() - 1), ValueError,
                        r"labels must be class indices >= 0; got -1"),
    "fractional labels": (lambda: lin(labels=Y() + 0.5), ValueError,
                          r"labels must be integer class indices; got fractional"),
    "labels too short": (lambda: lin(labels=Y()[:10]), ValueError,
                         r"labels has 10 entries but data has 200 samples"),
    "2-D labels": (lambda: lin(labels=Y()[:, None]), ValueError,
                   r"labels must have 1 dimensions; got shape \(200, 1\)"),
    # the other arguments
    "seed a string": (lambda: lin(seed="1"), TypeError,
                      r"seed='1' \(a string\) must be an integer"),
    "seed a float": (lambda: lin(seed=1.5), TypeError, r"seed=1\.5 must be an integer"),
    "make_yinyang negative seed": (lambda: koopnet.make_yinyang(5, seed=-1), ValueError,
                                   r"seed=-1 must be >= 0"),
    "n_inserted negative": (lambda: lin(n_inserted=-1), ValueError, r"n_inserted=-1 must be >= 0"),
    "n_delays too many": (lambda: lin(n_delays=5), ValueError,
                          r"n_delays=5 needs trajectories of at least 7 states; got T=4"),
    "n_delays negative": (lambda: lin(n_delays=-1), ValueError, r"n_delays=-1 must be >= 0"),
    "rank ambiguous": (lambda: lin(rank=1.5), ValueError, r"rank=1\.5 is ambiguous"),
    "rank negative": (lambda: lin(rank=-3), ValueError, r"rank=-3 is ambiguous"),
    "rank a string": (lambda: lin(rank="3"), TypeError, r"rank='3' must be None, an int"),
    "rank too big": (lambda: lin(rank=10_000), ValueError,
                     r"rank=10000 exceeds what the data supports"),
    "tikhonov negative": (lambda: lin(tikhonov=-1.0), ValueError,
                          r"tikhonov=-1\.0 must be a finite number >= 0"),
    "tikhonov nan": (lambda: lin(tikhonov=float("nan")), ValueError, r"tikhonov=nan must be"),
    "pairing unknown": (lambda: lin(pairing="pairs"), ValueError, r"pairing='pairs' must be"),
    "init unknown": (lambda: lin(init="zeros"), ValueError, r"init='zeros' must be 'he'"),
    "scaling_config a dict": (lambda: lin(scaling_config={"epochs": 2}), TypeError,
                              r"scaling_config must be a koopnet.TrainConfig; got dict"),
    "spec and keywords": (lambda: lin(spec=FitSpec(1)), ValueError,
                          r"pass either spec=FitSpec\(\.\.\.\) or the keywords \['n_delays'\]"),
    "spec a dict": (lambda: lin(n_delays=None, spec={"n_delays": 1}), TypeError,
                    r"spec must be a koopnet.FitSpec; got dict"),
    "fit_hybrid on a plain model": (lambda: fit_hybrid(mlp(), X(), n_delays=1), TypeError,
                                    r"scaled must be a ScaledMLP .*got Sequential"),
    "fit_hybrid wrong width": (lambda: fit_hybrid(scaled_model(), torch.rand(20, 3), n_delays=0),
                               ValueError, r"data has 3 features per sample"),
    "check_inputs of a DataLoader of dicts": (lambda: check_inputs(dict_loader()), TypeError,
                                              r"yields dicts"),
    # data sets
    "make_yinyang negative n": (lambda: koopnet.make_yinyang(-5, seed=0), ValueError,
                                r"n=-5 must be >= 1"),
    "make_yinyang fractional n": (lambda: koopnet.make_yinyang(2.5, seed=0), TypeError,
                                  r"n=2\.5 must be an integer"),
    "make_yinyang string seed": (lambda: koopnet.make_yinyang(5, seed="a"), TypeError,
                                 r"seed='a' \(a string\) must be an integer"),
    "make_yinyang 4 classes": (lambda: koopnet.make_yinyang(5, seed=0, n_classes=4), ValueError,
                               r"n_classes=4 must be 2 \(paper variant\) or 3"),
    # the DMD
    "unfitted predict": (lambda: DMD().predict(torch.zeros(2, 3)), koopnet.NotFittedError,
                         r"This DMD instance is not fitted yet; call fit"),
    "unfitted eigenvalues": (lambda: DMD().eigenvalues_, koopnet.NotFittedError,
                             r"not fitted yet"),
    "unfitted transition": (lambda: DMD().transition(1), koopnet.NotFittedError,
                            r"not fitted yet"),
    "predict negative steps": (lambda: fitted_dmd().predict(torch.zeros(2, 3), n_steps=-1),
                               ValueError, r"n_steps=-1 must be >= 0"),
    "predict float steps": (lambda: fitted_dmd().predict(torch.zeros(2, 3), n_steps=1.5),
                            TypeError, r"n_steps=1\.5 must be an integer"),
    "predict wrong width": (lambda: fitted_dmd().predict(torch.zeros(2, 4)), ValueError,
                            r"lifted has 4 features; this DMD was fitted on 3"),
    "fit_pairs shapes differ": (lambda: DMD().fit_pairs(torch.rand(5, 3), torch.rand(4, 3)),
                                ValueError, r"X and Y must have the same shape"),
    "fit wants 3-D": (lambda: DMD().fit(torch.rand(5, 3)), ValueError,
                      r"lifted must have 3 dimensions; got shape \(5, 3\)"),
    "fit on zeros": (lambda: DMD().fit_pairs(torch.zeros(5, 3), torch.zeros(5, 3)), ValueError,
                     r"the snapshot matrix is zero"),
    "statistics without pairs": (lambda: DMD().fit_statistics(
        PairStatistics(torch.zeros(3, 3), torch.zeros(3, 3), torch.zeros(3, 3), 0)),
        ValueError, r"stats holds no snapshot pairs"),
    "statistics overflow": (lambda: DMD().fit_statistics(PairStatistics.from_pairs(
        torch.rand(5, 3, dtype=torch.float64) * 1e200, torch.rand(5, 3, dtype=torch.float64))),
        ValueError, r"X\^T X contains .*inf.* overflow float64 when squared; rescale"),
    "DMD tikhonov negative": (lambda: DMD(tikhonov=-1).fit_pairs(torch.rand(5, 3),
                                                                 torch.rand(5, 3)),
                              ValueError, r"tikhonov=-1\.0 must be a finite number >= 0"),
    "fit_file with a learned observable": (
        lambda: fit_file("t.safetensors", FitSpec(1, observable_kind="learned")), ValueError,
        r"^fit_file fits delay coordinates only; FitSpec\(observable_kind='learned'\) trains "
        r"on whole trajectories, .*use koopnet\.fit_hybrid on a scaled model, or "
        r"observable_kind='delay'\.$"),
}


def _nan_model():
    model = mlp()
    with torch.no_grad():
        model[2].weight[0, 0] = float("nan")
    return model


def _with_nan():
    data = X()
    data[5, 1] = float("nan")
    return data


@pytest.mark.parametrize("case", API_CASES, ids=list(API_CASES))
def test_api_bad_input(case):
    call, kind, pattern = API_CASES[case]
    with pytest.raises(kind, match=pattern) as info:
        call()
    assert not re.search(INTERNAL, str(info.value)), str(info.value)


# ---------------------------------------------------------------------------------------------
# CLI: setup(tmp_path) -> argv, message pattern. Every case must fail with one stderr line.


def _write_idx(path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def make_idx(folder, n_train: int = 400, n_test: int = 60):
    """3 classes of 6x5 images (a bright class-specific row plus noise), as tests/test_mnist."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    arrays = []
    for n in (n_train, n_test):
        labels = rng.integers(0, 3, n)
        images = rng.integers(0, 60, (n, 6, 5))
        images[np.arange(n), 2 * labels] += 180
        arrays += [images, labels]
    for name, array in zip(_IDX_NAMES, arrays, strict=True):
        _write_idx(folder / name, array)
    return folder


def train_dir(tmp_path):
    """A tiny trained model folder (yinyang data, 2 epochs)."""
    out = tmp_path / "train"
    assert main(["--quiet", "train", "--dataset", "yinyang", "--widths", "2,6,6,2",
                 "--epochs", "2", "--batch-size", "512", "--out", str(out)]) == 0
    return out


def npy(tmp_path, name, array):
    path = tmp_path / name
    np.save(path, array)
    return str(path)


def _renamed_key(tmp_path):
    run = train_dir(tmp_path)
    meta = json.loads((run / "model.json").read_text())
    meta["config"]["architekture"] = meta["config"].pop("architecture")
    (run / "model.json").write_text(json.dumps(meta))
    return ["scale", str(run), "--layer", "1", "--out", str(tmp_path / "s")]


def _report(tmp_path, text):
    run = tmp_path / "run"
    run.mkdir()
    (run / "results.json").write_text(text)
    return ["report", str(run)]


def _safetensors(tmp_path, tensors):
    path = tmp_path / "t.safetensors"
    safetensors.torch.save_file(tensors, str(path))
    return str(path)


def _garbage(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"\x00\x01 not a real file")
    return str(path)


def _file(tmp_path):
    (tmp_path / "f").write_text("x")
    return str(tmp_path / "f")


TRAIN = ["train", "--dataset", "yinyang", "--epochs", "2"]

CLI_CASES = {
    # train
    "train batch size 0": (lambda t: [*TRAIN, "--batch-size", "0", "--out", str(t / "o")],
                           r"batch_size=0 must be >= 1"),
    "train epochs 0": (lambda t: ["train", "--dataset", "yinyang", "--epochs", "0",
                                  "--out", str(t / "o")], r"epochs=0 must be >= 1"),
    "train negative lr": (lambda t: [*TRAIN, "--lr", "-1", "--out", str(t / "o")],
                          r"lr=-1\.0 must be a finite number > 0"),
    "train nan lr": (lambda t: [*TRAIN, "--lr", "nan", "--out", str(t / "o")],
                     r"lr=nan must be a finite number > 0"),
    "train unknown data set": (lambda t: ["train", "--dataset", "cifar", "--out", str(t / "o")],
                               r"unknown data source 'cifar'"),
    "train missing npy": (lambda t: ["train", "--dataset", str(t / "x.npy"),
                                     "--out", str(t / "o")], r"data file '.*x\.npy' does not"),
    "train npy without labels": (lambda t: ["train", "--dataset",
                                            npy(t, "x.npy", np.zeros((5, 2), np.float32)),
                                            "--out", str(t / "o")],
                                 r"training needs labels; .*Pass --labels"),
    "train pickled npy": (lambda t: ["train", "--dataset",
                                     npy(t, "x.npy", np.array([{}, 1], dtype=object)),
                                     "--out", str(t / "o")], r"holds Python objects \(pickle\)"),
    "train corrupt npy": (lambda t: ["train", "--dataset", _garbage(t, "x.npy"),
                                     "--out", str(t / "o")], r"x\.npy' is not a valid \.npy"),
    "train corrupt safetensors": (lambda t: ["train", "--dataset", _garbage(t, "x.safetensors"),
                                             "--out", str(t / "o")],
                                  r"x\.safetensors' is not a valid safetensors file"),
    "train safetensors without X": (lambda t: ["train", "--dataset",
                                               _safetensors(t, {"inputs": torch.zeros(4, 2)}),
                                               "--out", str(t / "o")],
                                    r"has no tensor 'X' \(it holds \['inputs'\]\)"),
    "train labels with a named set": (lambda t: [*TRAIN, "--labels", "y.npy", "--out",
                                                 str(t / "o")], r"--labels is for file data"),
    "train widths wrong input": (lambda t: [*TRAIN, "--widths", "3,6,2", "--out", str(t / "o")],
                                 r"--widths starts with 3 but the data has 2 features"),
    "train widths too few outputs": (lambda t: ["train", "--dataset", "yinyang3", "--widths",
                                                "4,6,2", "--out", str(t / "o")],
                                     r"--widths ends with 2 outputs but the labels have 3"),
    "train widths not integers": (lambda t: [*TRAIN, "--widths", "2,a,2", "--out", str(t / "o")],
                                  r"--widths '2,a,2' must be comma-separated integers"),
    "train unknown activation": (lambda t: [*TRAIN, "--activation", "swish",
                                            "--out", str(t / "o")],
                                 r"activation='swish' is not supported"),
    "train epochs not a number": (lambda t: [*TRAIN, "--epochs", "many", "--out", str(t / "o")],
                                  r"argument --epochs: invalid int value: 'many'"),
    "train missing idx folder": (lambda t: ["train", "--dataset", f"idx:{t / 'none'}",
                                            "--out", str(t / "o")],
                                 r"MNIST-format files not found under"),
    "train n-val too big": (lambda t: ["train", "--dataset", f"idx:{make_idx(t / 'idx')}",
                                       "--n-val", "400", "--out", str(t / "o")],
                            r"n_val=400 must be in \[0, 400\) for 'idx'.*smaller --n-val"),
    "train n-val on yinyang": (lambda t: [*TRAIN, "--n-val", "10", "--out", str(t / "o")],
                               r"--n-val is for idx:PATH and mnist"),
    "out empty": (lambda t: [*TRAIN, "--out", ""], r"the output folder is empty \(--out ''\)"),
    "out below a file": (lambda t: [*TRAIN, "--out", str(t / "f" / "o")] if _file(t) else [],
                         r"output folder '.*f/o' lies below the file"),
    "out is a file": (lambda t: [*TRAIN, "--out", _file(t)], r"output folder '.*f' is a file"),
    "no command": (lambda t: [], r"the following arguments are required: command"),
    "unknown command": (lambda t: ["trian"], r"invalid choice: 'trian'"),
    # scale
    "scale renamed key": (_renamed_key, r"model\.json' was edited after it was written"),
    "scale no model": (lambda t: ["scale", "--layer", "1", "--out", str(t / "o")],
                       r"pass either a train folder"),
    "scale missing folder": (lambda t: ["scale", str(t / "none"), "--layer", "1",
                                        "--out", str(t / "o")], r"'.*none' is not a folder"),
    "scale not a train folder": (lambda t: ["scale", str(t), "--layer", "1",
                                            "--out", str(t / "o")], r"holds no model\.json"),
    "scale layer 0": (lambda t: ["scale", str(train_dir(t)), "--layer", "0",
                                 "--out", str(t / "o")], r"layer=0 is out of range"),
    "scale negative n-inserted": (lambda t: ["scale", str(train_dir(t)), "--layer", "1",
                                             "--n-inserted", "-1", "--out", str(t / "o")],
                                  r"n_inserted=-1 must be >= 0"),
    "scale epochs 0": (lambda t: ["scale", str(train_dir(t)), "--layer", "1", "--epochs", "0",
                                  "--out", str(t / "o")], r"epochs=0 must be >= 1"),
    "scale model without config": (lambda t: ["scale", "--model", "w.safetensors", "--layer",
                                              "1", "--out", str(t / "o")],
                                   r"--model needs --config model\.json"),
    "scale wrong data width": (lambda t: ["scale", str(train_dir(t)), "--layer", "1", "--data",
                                          "yinyang3", "--out", str(t / "o")],
                               r"data has 4 features per sample but the model's first layer"),
    # fit
    "fit safetensors without states": (lambda t: ["fit", "--trajectories",
                                                  _safetensors(t, {"x": torch.zeros(2, 3, 2)}),
                                                  "--n-delays", "1", "--out", str(t / "o")],
                                       r"t\.safetensors' has no tensor 'states'"),
    "fit missing trajectories": (lambda t: ["fit", "--trajectories", str(t / "no.safetensors"),
                                            "--n-delays", "1", "--out", str(t / "o")],
                                 r"no\.safetensors"),
    "fit corrupt trajectories": (lambda t: ["fit", "--trajectories",
                                            _garbage(t, "g.safetensors"), "--n-delays", "1",
                                            "--out", str(t / "o")],
                                 r"g\.safetensors' is not a valid safetensors file"),
    "fit neither input": (lambda t: ["fit", "--n-delays", "1", "--out", str(t / "o")],
                          r"needs either a scale-stage folder"),
    "fit negative delays": (lambda t: ["fit", "--trajectories",
                                       _safetensors(t, {"states": torch.rand(4, 3, 2)}),
                                       "--n-delays", "-1", "--out", str(t / "o")],
                            r"n_delays=-1 must be >= 0"),
    "fit bad rank": (lambda t: ["fit", "--trajectories", "t.safetensors", "--n-delays", "1",
                                "--rank", "lots", "--out", str(t / "o")],
                     r"--rank 'lots' is not none, an int or a float"),
    # report
    "report no results": (lambda t: ["report", str(t)], r"no results\.json in"),
    "report invalid JSON": (lambda t: _report(t, "{not json"),
                            r"results\.json' is not valid JSON \(line 1"),
    "report missing keys": (lambda t: _report(t, json.dumps({"schema": 1})),
                            r"results\.json' lacks the key 'dataset'"),
    "report a list": (lambda t: _report(t, "[1, 2]"), r"results\.json' holds a list"),
    "report newer schema": (lambda t: _report(t, json.dumps({"schema": 9})),
                            r"results\.json' has schema 9; this koopnet reads 1"),
    "report evaluation without metrics": (lambda t: _report(t, json.dumps({"stage": "evaluate"})),
                                          r"results\.json' lacks the key"),
    # study / reproduce / evaluate
    "study zero seeds": (lambda t: ["study", "yinyang", "--seeds", "0", "--out", str(t / "o")],
                         r"--seeds=0 must be >= 1"),
    "study unknown data set": (lambda t: ["study", "mnist", "--out", str(t / "o")],
                               r"'mnist'.*yinyang"),
    "reproduce unknown data set": (lambda t: ["reproduce", "cifar", "--out", str(t / "o")],
                                   r"unknown dataset 'cifar'"),
    "reproduce mnist on another set": (lambda t: ["reproduce", "mnist", "--quick", "--data-dir",
                                                  str(make_idx(t / "fake")),
                                                  "--out", str(t / "o")],
                                       r"is not MNIST's train-images.*pass idx:.*fake "
                                       r"instead of mnist"),
    "evaluate missing folder": (lambda t: ["evaluate", str(t / "none"), "--out", str(t / "o")],
                                r"'.*none' is not a folder"),
}


@pytest.mark.parametrize("case", CLI_CASES, ids=list(CLI_CASES))
def test_cli_bad_input(case, tmp_path, capsys):
    setup, pattern = CLI_CASES[case]
    argv = setup(tmp_path)
    capsys.readouterr()
    code = main(["--quiet", *argv])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code != 0
    assert len(lines) == 1, err
    assert lines[0].startswith("koopnet: error: "), err
    assert re.search(pattern, lines[0]), lines[0]
    assert not re.search(INTERNAL, lines[0]), lines[0]


# ---------------------------------------------------------------------------------------------
# Accepted inputs that used to fail or give a wrong result.


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_linearize_keeps_the_model_dtype(dtype):
    model = mlp().to(dtype)
    hybrid = lin(model=model, data=X().to(dtype))
    assert hybrid.dmd_.operator_.dtype == torch.float64  # fitted in float64
    out = hybrid(X()[:8].to(dtype))
    assert out.dtype == dtype and out.shape == (8, 2) and bool(torch.isfinite(out).all())


def test_dropout_in_the_model_is_allowed():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 6), nn.ReLU(), nn.Dropout(0.5), nn.Linear(6, 6), nn.ReLU(),
                          nn.Linear(6, 2))
    assert lin(model=model)(X()[:4]).shape == (4, 2)


def test_leaky_relu_slope_is_kept():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 6), nn.LeakyReLU(0.2), nn.Linear(6, 6), nn.LeakyReLU(0.2),
                          nn.Linear(6, 2))
    hybrid = lin(model=model)
    assert hybrid.scaled_.inserts[0][1].negative_slope == 0.2


def test_numpy_scalars_work_end_to_end():
    hybrid = lin(rank=np.float32(0.99), n_delays=np.int64(1), n_inserted=np.int64(2),
                 seed=np.int64(1))
    assert isinstance(hybrid.dmd_.rank, float) and hybrid(X()[:3]).shape == (3, 2)
    assert lin(rank=np.int64(3)).dmd_.rank_ <= 3


def test_tuple_dataloader_is_accepted():
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X(), Y()), batch_size=64)
    assert lin(data=loader)(X()[:2]).shape == (2, 2)


def test_dmd_on_huge_finite_data_is_right_or_refused():
    g = torch.Generator().manual_seed(0)
    Xs = torch.randn(40, 3, dtype=torch.float64, generator=g)
    A = torch.diag(torch.tensor([0.5, 0.9, -0.3], dtype=torch.float64))
    try:
        dmd = DMD().fit_pairs(Xs * 1e200, (Xs @ A) * 1e200)
    except ValueError as err:
        assert re.search(r"overflow|rescale", str(err))
        return
    assert bool(torch.isfinite(dmd.operator_).all())
    assert sorted(dmd.eigenvalues_.real.tolist()) == pytest.approx([-0.3, 0.5, 0.9], abs=1e-8)


def test_train_on_a_small_idx_set_scales_the_validation_split(tmp_path, capsys, caplog):
    caplog.set_level(logging.INFO, logger="koopnet")
    folder = make_idx(tmp_path / "idx")
    out = tmp_path / "o"
    code = main(["train", "--dataset", f"idx:{folder}", "--widths", "30,8,8,3", "--epochs", "2",
                 "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    assert "validation split of 40" in caplog.text
    meta = json.loads((out / "model.json").read_text())["config"]
    assert "val_accuracy" in meta["metrics"]
    out2 = tmp_path / "o2"
    assert main(["--quiet", "train", "--dataset", f"idx:{folder}", "--widths", "30,8,8,3",
                 "--epochs", "2", "--n-val", "100", "--out", str(out2)]) == 0
    record = json.loads((out2 / "model.json").read_text())["config"]["data"]
    assert record["n_val"] == 100
    # the next stage reloads the same split
    assert main(["--quiet", "scale", str(out2), "--layer", "1", "--n-inserted", "1",
                 "--epochs", "1", "--out", str(tmp_path / "s")]) in (0, 1)


def test_out_below_a_file_fails_before_any_work(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    clock = time.perf_counter()
    code = main(["--quiet", "train", "--dataset", "yinyang", "--out", str(tmp_path / "f" / "o")])
    assert code != 0 and time.perf_counter() - clock < 1.0


def test_unwritable_out_is_refused(tmp_path, capsys):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        if os.access(parent, os.W_OK):
            pytest.skip("running as root: chmod 0o555 does not block writes here")
        code = main(["--quiet", *TRAIN, "--out", str(parent / "o")])
        err = capsys.readouterr().err
        assert code != 0 and re.search(r"cannot be written", err) and err.count("\n") == 1
    finally:
        parent.chmod(0o755)


def test_failed_validation_leaves_no_folder(tmp_path, capsys):
    out = tmp_path / "new"
    assert main(["--quiet", *TRAIN, "--widths", "3,6,2", "--out", str(out)]) != 0
    assert not out.exists()
    assert main(["--quiet", "scale", str(train_dir(tmp_path)), "--layer", "5",
                 "--out", str(out)]) != 0
    assert not out.exists()


def test_scale_exits_nonzero_when_scaling_failed(tmp_path, capsys, monkeypatch):
    from koopnet import scaling

    real = scaling.scale_layer

    def failing(*args, **kwargs):
        scaled, report = real(*args, **kwargs)
        report.ok = False
        return scaled, report

    run = train_dir(tmp_path)
    monkeypatch.setattr("koopnet.cli.stages.scale_layer", failing)
    capsys.readouterr()
    code = main(["--quiet", "scale", str(run), "--layer", "1", "--n-inserted", "1", "--epochs",
                 "1", "--out", str(tmp_path / "s")])
    captured = capsys.readouterr()
    assert code == 1
    assert json.loads(captured.out)["scaling_ok"] is False
    assert re.search(r"koopnet: error: scaling .* failed", captured.err)
    assert len(captured.err.strip().splitlines()) == 1


def test_reproduce_idx_records_the_trained_widths(tmp_path):
    from koopnet.lab.protocols import run_experiment
    from koopnet.lab.recipes import default_config

    folder = make_idx(tmp_path / "idx", n_train=200)
    config = dataclasses_replace(default_config(f"idx:{folder}", quick=True), layers=(3,),
                                 delays=(1,), ranks=(None,))
    results, _ = run_experiment(config, progress=False)
    assert results["config"]["widths"][0] == 30 and results["config"]["widths"][-1] == 3


def dataclasses_replace(config, **changes):
    import dataclasses

    return dataclasses.replace(config, **changes)



# ---------------------------------------------------------------------------------------------
# linearize(model, target=...): any submodule; the same one-line rule


class _TokenBlock(nn.Module):
    """[B, L, 4] -> [B, 2] through a LayerNorm and a token-wise MLP."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4)
        self.mlp = nn.Sequential(nn.Linear(4, 4), nn.GELU())
        self.out = nn.Linear(4, 2)

    def forward(self, x):
        return self.out(self.mlp(self.norm(x)).mean(1))


def lin_target(**kwargs):
    torch.manual_seed(0)
    kwargs = {"model": _TokenBlock(), "target": "mlp", "data": torch.randn(8, 3, 4),
              "n_inserted": 2, "n_delays": 1, "scaling_config": TINY, **kwargs}
    return linearize(**kwargs)


TARGET_CASES = {
    "unknown target": (lambda: lin_target(target="mlp.5"), ValueError,
                       r"target 'mlp\.5' is not a submodule of the model; valid names include "
                       r"'norm', 'mlp', 'mlp\.0'"),
    "target is the model": (lambda: lin_target(target=""), ValueError,
                            r"target='' is the model itself; name one of its submodules"),
    "target not a module": (lambda: lin_target(target="norm.weight"), TypeError,
                            r"target 'norm\.weight' is a Parameter, not an nn\.Module"),
    "target takes ints": (lambda: lin_target(model=nn.Sequential(nn.Embedding(5, 4),
                                                                 nn.Linear(4, 2)),
                                             target="0", data=torch.randint(0, 5, (8, 3))),
                          TypeError, r"target '0' takes a torch\.int64 tensor of shape \[8, 3\]"),
    "data does not fit": (lambda: lin_target(data=torch.randn(8, 3, 5)), ValueError,
                          r"data of shape \[8, 3, 5\] does not fit the model: it raised "
                          r"RuntimeError: .*Pass inputs \[n, \.\.\.\] shaped as the model takes"),
    "no inserted block": (lambda: lin_target(n_inserted=0), ValueError,
                          r"n_inserted=0 must be >= 1"),
    "layer and target": (lambda: lin_target(layer=1), ValueError,
                         r"pass exactly one of layer=k \(a hidden layer of a Sequential MLP\) "
                         r"and target='name'"),
    "model not a module": (lambda: lin_target(model=lambda x: x), TypeError,
                           r"model must be a torch\.nn\.Module; got function"),
}


@pytest.mark.parametrize("case", TARGET_CASES, ids=list(TARGET_CASES))
def test_target_bad_input(case):
    call, kind, pattern = TARGET_CASES[case]
    with pytest.raises(kind, match=pattern) as info:
        call()
    assert "\n" not in str(info.value)
    assert not re.search(INTERNAL, str(info.value)), str(info.value)
