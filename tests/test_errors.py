"""Bad input gets one clear error naming the problem and the fix, and never corrupts anything.

API errors are pinned with ``pytest.raises(match=...)``; CLI errors by their single stderr line
``koopnet: error: ...`` and exit code 2. Property tests cover the delay embedding and DMD shapes
and the delay / rank limits over random sizes.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import safetensors.torch
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import koopnet
from koopnet.cli import main
from koopnet.dmd import DMD
from koopnet.io.artifacts import ArtifactError
from koopnet.io.serialize import save_model
from koopnet.linearization import _check_spec, fit_hybrid, linearize
from koopnet.models import TrainConfig, build_mlp
from koopnet.observables import TimeDelay
from koopnet.scaling import ScaledMLP
from koopnet.spec import FitSpec

TINY = TrainConfig(epochs=2, batch_size=64)


def mlp(widths=(5, 6, 6, 5, 2), activation="relu") -> nn.Sequential:
    torch.manual_seed(0)
    return build_mlp(list(widths), activation)


def data(n: int = 20, width: int = 5) -> torch.Tensor:
    return torch.randn(n, width, generator=torch.Generator().manual_seed(1))


def with_nan() -> torch.Tensor:
    X = data()
    X[3, 1] = float("nan")
    return X


def with_inf() -> torch.Tensor:
    X = data()
    X[4, 0] = float("inf")
    return X


def nan_weight() -> nn.Sequential:
    model = mlp()
    with torch.no_grad():
        model[2].weight[0, 0] = float("nan")
    return model


def exploding() -> nn.Sequential:
    model = mlp()
    with torch.no_grad():
        model[0].weight.mul_(1e30)  # finite weights, but x @ W^T overflows float32
        model[0].weight[:, 0] = 3e38
    return model


def missing_activation() -> nn.Sequential:
    return nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 6), nn.Linear(6, 6), nn.ReLU(),
                         nn.Linear(6, 2))


API_CASES = {
    "nan in data": (dict(data=with_nan()),
                    r"data contains 1 NaN values \(first at index \(3, 1\)\)"),
    "inf in data": (dict(data=with_inf()),
                    r"data contains 1 inf values \(first at index \(4, 0\)\)"),
    "nan in weights": (dict(model=nan_weight()),
                       r"model parameter '2.weight' contains 1 NaN values .* retrain"),
    "inf activations": (dict(model=exploding(), data=data() + 10),
                        r"activations of model\[0\] \(Linear\) contains .*inf values.* Rescale"),
    "delays >= trajectory length": (
        dict(n_delays=7, n_inserted=5),
        r"n_delays=7 needs trajectories of at least 9 states; got T=7\. Lower n_delays to <= 5 "
        r"or insert more blocks \(n_inserted >= n_delays\)"),
    "rank too large": (dict(rank=500, n_delays=2, n_inserted=3),
                       r"rank=500 exceeds what the data supports: min\(D=18, pairs=40\)=18\. "
                       r"Lower rank to <= 18"),
    "rank ambiguous": (dict(rank=2.0), r"rank=2.0 is ambiguous"),
    "empty data": (dict(data=torch.empty(0, 5)), r"data is empty \(shape \(0, 5\)\)"),
    "single sample": (dict(data=data(1)), r"data has 1 sample; koopnet needs at least 2"),
    "wrong input width": (dict(data=data(20, 3)),
                          r"data has 3 features per sample but the model's first layer expects 5"
                          r"; pass inputs of width 5"),
    "wrong data rank": (dict(data=torch.randn(5)),
                        r"data has shape \(5,\); pass \[n_samples, n_features\]"),
    "layer out of range": (dict(layer=3), r"layer=3 is out of range: this model has 3 hidden "
                                          r"layers, so layer must be in 1\.\.2"),
    "layer zero": (dict(layer=0), r"layer=0 is out of range"),
    "layer not an int": (dict(layer=1.5), r"layer=1.5 must be an integer"),
    "no activation after layer": (
        dict(model=missing_activation()),
        r"model\[3\] is Linear where an activation is needed after the Linear model\[2\]; "
        r"supported activations are"),
    "unsupported activation": (
        dict(model=nn.Sequential(nn.Linear(5, 6), nn.Hardswish(), nn.Linear(6, 6), nn.ReLU(),
                                 nn.Linear(6, 2))),
        r"model\[1\] is Hardswish where an activation is needed after the Linear model\[0\]"),
    "too shallow": (dict(model=mlp((5, 6, 2))), r"model has 1 hidden layer\(s\); linearising "
                                                r"needs at least 2"),
    "not a Sequential": (dict(model=nn.Linear(5, 2)), r"model must be an nn.Sequential MLP"),
    "labels length": (dict(labels=torch.zeros(7, dtype=torch.long)),
                      r"labels has 7 entries but data has 20 samples"),
    "negative n_inserted": (dict(n_inserted=-1), r"n_inserted=-1 must be >= 0"),
}


@pytest.mark.parametrize("case", list(API_CASES))
def test_linearize_rejects_bad_input(case):
    overrides, message = API_CASES[case]
    kwargs = dict(model=mlp(), layer=1, data=data(), n_inserted=3, n_delays=1,
                  scaling_config=TINY)
    kwargs.update(overrides)
    with pytest.raises((ValueError, TypeError), match=message):
        linearize(**kwargs)


def test_width_changing_insert_is_refused():
    """Inserted blocks must keep the width: otherwise the states are no trajectory."""
    model = mlp()
    head, replaced, tail = nn.Sequential(*model[:2]), nn.Sequential(*model[2:4]), model[4:]
    inserts = nn.Sequential(nn.Sequential(nn.Linear(6, 7), nn.ReLU()))
    scaled = ScaledMLP(head, inserts, replaced, tail, layer=1)
    message = (r"inserted block 0 maps width 6 -> 7; inserted blocks must preserve the width "
               r"\(6 -> 6\)")
    with pytest.raises(ValueError, match=message):
        fit_hybrid(scaled, data(), n_delays=0)
    delay = TimeDelay(0).fit(torch.zeros(1, 3, 6))
    with pytest.raises(ValueError, match=message):
        koopnet.KoopmanHybrid.from_dmd(scaled, delay, DMD())


# --------------------------------------------------------------------------------------------
# Command line: one line on stderr, exit code 2


def cli_error(capsys, argv: list[str]) -> str:
    code = main(["--quiet", *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("koopnet: error: "), err
    return err[0]


@pytest.fixture
def user_model(tmp_path):
    """A user's own model files: weights, config, inputs and labels."""
    model = mlp()
    safetensors.torch.save_file(model.state_dict(), str(tmp_path / "w.safetensors"))
    (tmp_path / "m.json").write_text('{"widths": [5, 6, 6, 5, 2], "activation": "relu"}')
    np.save(tmp_path / "X.npy", data(40).numpy())
    np.save(tmp_path / "y.npy", (data(40)[:, 0] > 0).long().numpy())
    return tmp_path


def scale_args(folder, out="scale", **extra) -> list[str]:
    args = ["scale", "--model", str(folder / extra.pop("model", "w.safetensors")),
            "--config", str(folder / extra.pop("config", "m.json")),
            "--data", str(folder / extra.pop("data", "X.npy")), "--layer", "1",
            "--n-inserted", "3", "--epochs", "2", "--out", str(folder / out)]
    return args + [item for key, value in extra.items() for item in (f"--{key}", value)]


def test_truncated_weights_are_refused(capsys, user_model):
    blob = (user_model / "w.safetensors").read_bytes()
    (user_model / "w.safetensors").write_bytes(blob[: len(blob) // 2])
    err = cli_error(capsys, scale_args(user_model))
    assert "w.safetensors' is not a valid safetensors file" in err and "re-export it" in err
    assert not (user_model / "scale").exists()  # nothing was written


def test_pickled_weights_are_refused(capsys, user_model):
    torch.save(mlp().state_dict(), user_model / "w.pt")
    err = cli_error(capsys, scale_args(user_model, model="w.pt"))
    assert "looks like a pickle (torch.save); koopnet never unpickles" in err


def test_weights_that_do_not_fit_the_config(capsys, user_model):
    (user_model / "m.json").write_text('{"widths": [3, 6, 6, 5, 2], "activation": "relu"}')
    err = cli_error(capsys, scale_args(user_model))
    assert "tensor '0.weight' has shape [6, 5], but the architecture needs [6, 3]" in err


def test_config_that_describes_no_model(capsys, user_model):
    (user_model / "m.json").write_text('{"layers": 3}')
    assert "describes no model" in cli_error(capsys, scale_args(user_model))
    (user_model / "m.json").write_text("{not json")
    assert "m.json' is not valid JSON" in cli_error(capsys, scale_args(user_model))


def test_pickled_npy_is_refused(capsys, user_model):
    np.save(user_model / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    err = cli_error(capsys, scale_args(user_model, data="obj.npy"))
    assert "holds Python objects (pickle), which koopnet refuses" in err


def test_nan_in_a_data_file(capsys, user_model):
    X = data(40).numpy()
    X[2, 2] = np.nan
    np.save(user_model / "bad.npy", X)
    err = cli_error(capsys, scale_args(user_model, data="bad.npy"))
    assert "data 'bad.npy' contains 1 NaN values (first at index (2, 2))" in err


def test_wrong_width_data_file(capsys, user_model):
    np.save(user_model / "narrow.npy", data(40, 4).numpy())
    err = cli_error(capsys, scale_args(user_model, data="narrow.npy"))
    assert "data has 4 features per sample but the model's first layer expects 5" in err


def test_layer_out_of_range_on_the_cli(capsys, user_model):
    args = scale_args(user_model)
    args[args.index("--layer") + 1] = "4"
    assert "layer=4 is out of range" in cli_error(capsys, args)


def fit_args(scale_dir, out, *extra) -> list[str]:
    return ["fit", str(scale_dir), *(extra or ("--n-delays", "1")), "--out", str(out)]


@pytest.fixture
def scale_dir(user_model):
    assert main(["--quiet", *scale_args(user_model, labels=str(user_model / "y.npy"))]) == 0
    return user_model / "scale"


def test_existing_output_folder_is_refused_without_force(capsys, user_model, scale_dir):
    err = cli_error(capsys, scale_args(user_model))
    assert "already exists and is not empty; pass --force to write into it" in err
    assert main(["--quiet", *scale_args(user_model), "--force"]) == 0


def test_fit_stage_errors(capsys, scale_dir, tmp_path):
    err = cli_error(capsys, fit_args(scale_dir, tmp_path / "f", "--n-delays", "5"))
    assert "n_delays=5 needs trajectories of at least 7 states; got T=5" in err
    err = cli_error(capsys, ["fit", str(scale_dir), "--n-delays", "1", "--rank", "999",
                             "--out", str(tmp_path / "f")])
    assert "rank=999 exceeds what the data supports: min(D=12, pairs=120)=12" in err
    err = cli_error(capsys, ["fit", "--n-delays", "1", "--out", str(tmp_path / "f")])
    assert "needs either a scale-stage folder" in err
    err = cli_error(capsys, ["fit", str(tmp_path), "--n-delays", "1", "--out", str(tmp_path / "f")])
    assert "holds no scaled.json: it is not the output of `koopnet scale`" in err
    assert not (tmp_path / "f").exists() or not any((tmp_path / "f").iterdir())


def test_changed_inputs_are_detected(capsys, user_model, scale_dir, tmp_path):
    np.save(user_model / "X.npy", data(40).numpy() + 1)
    err = cli_error(capsys, fit_args(scale_dir, tmp_path / "f"))
    assert "X.npy' changed since the scale stage recorded it" in err


def test_altered_parent_is_detected(capsys, user_model, scale_dir, tmp_path):
    assert main(["--quiet", "fit", str(scale_dir), "--n-delays", "1", "--out",
                 str(tmp_path / "fit")]) == 0
    scaled = koopnet.load_scaled(scale_dir)
    koopnet.save_scaled(scaled, scale_dir, metadata={"edited": True})  # same weights, same hash
    assert main(["--quiet", "evaluate", str(tmp_path / "fit"), "--out", str(tmp_path / "e")]) == 0
    with torch.no_grad():
        scaled.inserts[0][0].weight[0, 0] += 1.0
    koopnet.save_scaled(scaled, scale_dir)
    capsys.readouterr()
    err = cli_error(capsys, ["evaluate", str(tmp_path / "fit"), "--out", str(tmp_path / "e2")])
    assert "scaled.safetensors' changed since" in err and "re-run koopnet fit" in err


def test_corrupt_and_too_new_artifacts(capsys, scale_dir, tmp_path):
    meta = json.loads((scale_dir / "scaled.json").read_text())
    version, meta["format_version"] = meta["format_version"], 99
    (scale_dir / "scaled.json").write_text(json.dumps(meta))
    err = cli_error(capsys, fit_args(scale_dir, tmp_path / "f"))
    assert "has format_version 99; this koopnet reads versions <= 2" in err
    meta["format_version"] = version
    (scale_dir / "scaled.json").write_text(json.dumps(meta))
    blob = (scale_dir / "scaled.safetensors").read_bytes()
    (scale_dir / "scaled.safetensors").write_bytes(blob[:-10])
    err = cli_error(capsys, fit_args(scale_dir, tmp_path / "f"))
    assert "does not match the hash recorded" in err
    with pytest.raises(ArtifactError, match="does not match the hash recorded"):
        koopnet.load_scaled(scale_dir)


def test_train_needs_matching_widths(capsys, tmp_path):
    X = data(30)
    labels = (X[:, 0] > 0).long()
    safetensors.torch.save_file({"X": X, "y": labels}, str(tmp_path / "d.safetensors"))
    err = cli_error(capsys, ["train", "--dataset", str(tmp_path / "d.safetensors"), "--widths",
                             "4,6,2", "--out", str(tmp_path / "t")])
    assert "--widths starts with 4 but the data has 5 features; start the widths with 5" in err
    np.save(tmp_path / "X.npy", X.numpy())
    err = cli_error(capsys, ["train", "--dataset", str(tmp_path / "X.npy"), "--out",
                             str(tmp_path / "t")])
    assert "training needs labels" in err


# --------------------------------------------------------------------------------------------
# Ctrl-C in the middle of a stage


def test_ctrl_c_during_a_forced_rewrite_keeps_the_earlier_artifact(
        capsys, monkeypatch, interrupt_on_replace, user_model, scale_dir):
    before = {p.name: p.read_bytes() for p in scale_dir.iterdir()}
    probe = data(8)
    with torch.no_grad():
        reference = koopnet.load_scaled(scale_dir)(probe)
    interrupt_on_replace(on_call=1)
    code = main(["--quiet", *scale_args(user_model, seed="7"), "--force"])
    monkeypatch.undo()
    assert code == 130 and "interrupted" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in scale_dir.iterdir()} == before  # no temp files left
    with torch.no_grad():
        assert torch.equal(koopnet.load_scaled(scale_dir)(probe), reference)


def test_ctrl_c_during_the_second_save_of_fit(capsys, monkeypatch, interrupt_on_replace,
                                              scale_dir, tmp_path):
    """fit stages dmd.* then hybrid.* in a hidden sibling folder; Ctrl-C on the hybrid's files
    leaves the scale folder loadable and no fit folder at all (nothing half-written)."""
    interrupt_on_replace(on_call=4)  # dmd: 3 renames; the 4th is the hybrid's
    code = main(["--quiet", "fit", str(scale_dir), "--n-delays", "1", "--out",
                 str(tmp_path / "fit")])
    monkeypatch.undo()
    assert code == 130
    capsys.readouterr()
    assert koopnet.load_scaled(scale_dir) is not None
    assert not (tmp_path / "fit").exists() and list(tmp_path.glob(".fit.*")) == []
    err = cli_error(capsys, ["evaluate", str(tmp_path / "fit"), "--out", str(tmp_path / "e")])
    assert "is not a folder; pass the output folder of `koopnet fit`" in err


# --------------------------------------------------------------------------------------------
# Properties over random sizes

sizes = st.tuples(st.integers(1, 4), st.integers(1, 8), st.integers(1, 4))  # B, T, W


@settings(max_examples=40, deadline=None)
@given(sizes=sizes, h=st.integers(0, 9), constant=st.booleans())
def test_delay_embedding_shapes_and_order(sizes, h, constant):
    B, T, W = sizes
    states = torch.randn(B, T, W, dtype=torch.float64)
    delay = TimeDelay(h, constant=constant).fit(states)
    if h >= T:
        with pytest.raises(ValueError, match=rf"n_delays={h} needs trajectories of at least "
                                             rf"{h + 1} states; got T={T}"):
            delay.transform(states)
        return
    lifted = delay.transform(states)
    assert lifted.shape == (B, T - h, W * (h + 1) + int(constant))
    for lag in range(h + 1):  # block `lag` of row t is the state lag steps back: newest first
        assert torch.equal(lifted[:, :, lag * W:(lag + 1) * W], states[:, h - lag:T - lag])
    if constant:
        assert torch.equal(lifted[:, :, -1], torch.ones(B, T - h, dtype=torch.float64))


@settings(max_examples=40, deadline=None)
@given(sizes=sizes, h=st.integers(0, 3), rank=st.integers(1, 30), constant=st.booleans())
def test_dmd_shapes_and_the_rank_limit(sizes, h, rank, constant):
    B, T, W = sizes
    T += 1  # at least 2 states
    if h > T - 2:
        h = T - 2
    g = torch.Generator().manual_seed(B * 100 + T * 10 + W)
    lifted = TimeDelay(h, constant=constant).fit_transform(
        torch.randn(B, T, W, generator=g, dtype=torch.float64))
    D, pairs = lifted.shape[2], B * (T - 1 - h)
    try:  # the API's early check agrees with what DMD itself accepts
        _check_spec(FitSpec(h, rank, constant=constant), T, W, B)
        early = None
    except ValueError as err:
        early = err
    if rank > min(D, pairs):
        assert early is not None and "exceeds what the data supports" in str(early)
        with pytest.raises(ValueError, match=rf"rank={rank} exceeds what the data supports: "
                                             rf"min\(D={D}, pairs={pairs}\)={min(D, pairs)}"):
            DMD(rank).fit(lifted)
        return
    assert early is None
    dmd = DMD(rank).fit(lifted)
    R = dmd.rank_
    assert 1 <= R <= rank
    assert dmd.basis_.shape == (D, R) and dmd.operator_.shape == (R, R)
    assert dmd.eigenvalues_.shape == (R,) and dmd.modes_.shape == (D, R)
    assert dmd.predict(lifted[:, 0], n_steps=2).shape == (B, D)
    assert dmd.transition(3).shape == (D, D)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(0, 1), width=st.integers(1, 6))
def test_too_few_samples_are_refused(n, width):
    message = r"data is empty" if n == 0 else r"data has 1 sample; koopnet needs at least 2"
    with pytest.raises(ValueError, match=message):
        linearize(mlp((width, 4, 4, 2)), 1, torch.randn(n, width), n_inserted=2, n_delays=1)


def test_save_model_refuses_unknown_modules(tmp_path):
    model = nn.Sequential(nn.Linear(2, 3), nn.Dropout(), nn.Linear(3, 2))
    with pytest.raises(TypeError, match=r"model\[1\] is Dropout; koopnet saves nn.Sequential"):
        save_model(model, tmp_path)
    assert list(tmp_path.iterdir()) == []
