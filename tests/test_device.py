"""The device follows the model: every tensor koopnet creates is placed deliberately.

There is no GPU on the development machine, so device bugs (a factory call that silently lands
on the CPU while the model is on CUDA) cannot show as errors here. Instead the entry points run
under :class:`FactoryAudit`, a ``TorchFunctionMode`` that records every tensor factory called
from koopnet's own source (directly, or through the constructor of a torch module such as
``nn.Linear``) without an explicit ``device=``. Tensors derived from an input (``new_ones``,
``zeros_like``, ``.to(x.device)``) are not factories and need nothing. A draw from a CPU
``torch.Generator`` is spelled ``device="cpu"`` and then moved, so it passes the audit and
keeps the CPU results identical. On a machine with CUDA the same tests also run with the model
on the GPU and compare against the CPU run.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

import koopnet
from koopnet import LearnedObservable, TrainConfig, edit_modes, fit_hybrid, linearize
from koopnet import depth as depth_module
from koopnet.cli.main import main
from koopnet.depth import linearize_depth
from koopnet.dmd import DMD, PairStatistics
from koopnet.editing import mode_attribution
from koopnet.forgetting import forget_class
from koopnet.lab.devices import resolve_device
from koopnet.lab.protocols import environment
from koopnet.models import build_mlp
from koopnet.observables import Polynomial, RandomFourier, TimeDelay
from koopnet.streaming import SeriesMoments, TrajectoryMoments, fit_series, series_statistics

FACTORIES = frozenset({"eye", "zeros", "ones", "empty", "arange", "tensor", "randn", "rand",
                       "randint", "randperm", "linspace", "full", "normal"})
KOOPNET = Path(koopnet.__file__).resolve().parent
TORCH_NN = Path(nn.__file__).resolve().parent / "modules"

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


class FactoryAudit(TorchFunctionMode):
    """Records factory calls made from files under ``root`` without an explicit device.

    A call counts as made from ``root`` when its caller is there, or when its caller is the
    ``__init__`` of a torch module (``nn.Linear`` draws its weights with ``torch.empty``)
    constructed from there. ``misses`` holds ``"file:line factory"`` strings.
    """

    def __init__(self, root: Path = KOOPNET) -> None:
        super().__init__()
        self.root, self.misses = root, []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") in FACTORIES and kwargs.get("device") is None:
            site = self._site(sys._getframe(1))
            if site is not None:
                self.misses.append(f"{site} {func.__name__}")
        return func(*args, **kwargs)

    def _site(self, frame) -> str | None:
        while frame is not None and frame.f_code.co_name == "__init__" and \
                Path(frame.f_code.co_filename).resolve().is_relative_to(TORCH_NN):
            frame = frame.f_back  # nn.Linear(...) and the module classes it builds on
        path = Path(frame.f_code.co_filename).resolve() if frame is not None else None
        if path is None or not path.is_relative_to(self.root):
            return None
        return f"{path.relative_to(self.root)}:{frame.f_lineno}"


@pytest.fixture
def audit():
    """A :class:`FactoryAudit` for ``with audit:`` around koopnet calls (models and data are
    built outside it); the test fails listing every factory call without a device."""
    mode = FactoryAudit()
    yield mode
    assert not mode.misses, ("tensors created without an explicit device (pass device= of "
                             f"the data they meet): {sorted(set(mode.misses))}")


def test_the_audit_catches_a_factory_without_device(tmp_path):
    here = Path(__file__).resolve().parent
    x = torch.ones(2)
    with FactoryAudit(root=here) as mode:
        torch.eye(2, device=x.device)
        x.new_zeros(3)
        nn.Linear(2, 2, device=x.device)
    assert mode.misses == []
    with FactoryAudit(root=here) as mode:
        torch.eye(2)
        nn.Linear(2, 2)
    assert [m.split()[1] for m in mode.misses] == ["eye", "empty", "empty"]
    with FactoryAudit(root=tmp_path) as mode:  # calls from elsewhere are not koopnet's
        torch.eye(2)
    assert mode.misses == []


# ----------------------------------------------------------------------------- entry points


class _Residual(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm, self.lin = nn.LayerNorm(width), nn.Linear(width, width)

    def forward(self, x):
        return x + nn.functional.gelu(self.lin(self.norm(x)))


def _resmlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(2, 8), *[_Residual(8) for _ in range(4)], nn.Linear(8, 3))


def _mlp(device: str) -> nn.Module:
    torch.manual_seed(0)
    return build_mlp([2, 6, 6, 3], "tanh").to(device)


def _linearize(model: nn.Module, X: torch.Tensor):
    return linearize(model, layer=1, data=X, n_inserted=3, n_delays=1, constant=True,
                     scaling_config=TrainConfig(epochs=2, batch_size=60))


def _check_on(tensor: torch.Tensor, device: str) -> None:
    assert tensor.device.type == torch.device(device).type


@pytest.mark.parametrize("device", DEVICES)
def test_linearize_fit_hybrid_and_fold(device, audit):
    model, X = _mlp(device), torch.rand(60, 2)
    with audit:
        hybrid = _linearize(model, X)
        refit = fit_hybrid(hybrid.scaled_, X, n_delays=2, pairing="concatenated")
        folded = hybrid.fold(factored=True)
        with torch.no_grad():
            logits = hybrid(X.to(device))
            refit_logits, folded_logits = refit(X.to(device)), folded(X.to(device))
    for tensor in (hybrid.basis, hybrid.operator, hybrid.readout, hybrid.linear_map, logits,
                   refit_logits, folded_logits):
        _check_on(tensor, device)
    scale = float(logits.abs().max())  # float32 rounding of a barely trained, large map
    assert torch.allclose(folded_logits, logits, atol=1e-4 * scale)
    if device != "cpu":  # the same hybrid as on the CPU, up to floating point
        with torch.no_grad():
            on_cpu = _linearize(_mlp("cpu"), X)(X)
            assert torch.allclose(logits.cpu(), on_cpu, atol=1e-4 * scale)


@pytest.mark.parametrize("device", DEVICES)
def test_edits_attribution_and_forgetting(device, audit):
    hybrid, X = _linearize(_mlp(device), torch.rand(60, 2)), torch.rand(60, 2)
    y = torch.arange(len(X)) % 3
    D = hybrid.linear_map.shape[1]
    stats = PairStatistics.from_pairs(torch.randn(20, D), torch.randn(20, D))
    with audit:
        edited = edit_modes(hybrid, remove=[0])
        projected = edit_modes(hybrid, subspace=torch.ones(D))
        table = mode_attribution(hybrid, X.to(device), y.to(device), stats=stats)
        forgotten = forget_class(hybrid, 0, X.to(device), y.to(device))
        with torch.no_grad():
            outputs = [new(X.to(device)) for new in (edited, projected, forgotten)]
    for new, out in zip((edited, projected, forgotten), outputs, strict=True):
        for tensor in (new.linear_map, new.operator, out):
            _check_on(tensor, device)
    assert table["logit_drop"].shape[1] == 3 and not table["residual"].isnan().any()


@pytest.mark.parametrize("streamed", [False, True])
@pytest.mark.parametrize("device", DEVICES)
def test_linearize_depth(device, streamed, audit, monkeypatch):
    if streamed:  # the trajectory-moments route of large states
        monkeypatch.setattr(depth_module, "_IN_MEMORY_BYTES", 0)
    model, X, names = _resmlp().to(device), torch.randn(64, 2), ["1", "2", "3", "4"]
    with audit:
        hybrid = linearize_depth(model, names, X, n_delays=1, constant=True)
        edited = edit_modes(hybrid, remove=[0])
        with torch.no_grad():
            outputs = [hybrid(X.to(device)), edited(X.to(device))]
    for tensor in (hybrid.linear_map, edited.linear_map, *outputs):
        _check_on(tensor, device)
    if device != "cpu":
        on_cpu = linearize_depth(_resmlp(), names, X, n_delays=1, constant=True)
        with torch.no_grad():
            assert torch.allclose(outputs[0].cpu(), on_cpu(X), atol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_observables_and_streaming_keep_the_states_device(device, audit):
    states = torch.randn(6, 5, 3, device=device)
    observables = (TimeDelay(1, constant=True), Polynomial(2, 1, constant=True),
                   RandomFourier(4, 1, constant=True), RandomFourier(4, 1, include_state=False),
                   LearnedObservable(1, latent_dims=2, n_steps=3, batch_size=4, constant=True))
    with audit:
        for observable in observables:
            lifted = observable.fit_transform(states)
            dmd = DMD().fit(lifted)
            for tensor in (lifted, observable.readout(), dmd.transition(1),
                           dmd.transition(2, observable.readout())):
                _check_on(tensor, device)
            _check_on(dmd.predict(lifted[:, 0].cpu()), "cpu")  # back on the caller's device
        moments = TrajectoryMoments(5, 3, device=device).update(states)
        series = states.reshape(-1, 3)
        series_moments = SeriesMoments(3, 2, device=device).update(series)
        fitted = fit_series(DMD(), series, 1, constant=True, moments=series_moments)
        results = [moments.pair_statistics(1, constant=True).xx,
                   series_moments.pair_statistics(1, constant=True).yx, fitted.basis_,
                   series_statistics([states], 1, constant=True).xx]
    for tensor in results:
        _check_on(tensor, device)


# ----------------------------------------------------------------------------- --device


@pytest.mark.parametrize(("name", "message"), [
    ("gpu", r"--device gpu: not a device koopnet runs on; pass one of cpu, cuda, cuda:N or auto"),
    ("cuda:x", r"--device cuda:x: not a device"),
])
def test_resolve_device_refuses_unknown_names(name, message):
    with pytest.raises(ValueError, match=message):
        resolve_device(name)


def test_resolve_device_cpu_auto_and_absent_cuda(monkeypatch):
    assert resolve_device("CPU") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ValueError, match=r"--device cuda: CUDA is not available on this "
                                         r"machine; use --device cpu"):
        resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match=r"--device cuda:3: this machine has 1 CUDA device"):
        resolve_device("cuda:3")


@pytest.mark.parametrize("argv", [
    ["train", "--dataset", "yinyang"], ["reproduce", "yinyang", "--quick"],
    ["study", "yinyang", "--quick"], ["evaluate", "FIT"], ["fit", "SCALE", "--n-delays", "1"],
])
def test_cli_refuses_an_absent_device_in_one_line(argv, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main([*argv, "--out", str(tmp_path / "out"), "--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("koopnet: error: --device cuda: CUDA is not available on this machine; use "
                   "--device cpu (or auto).")
    assert not (tmp_path / "out").exists()


def test_cli_records_the_device(tmp_path, capsys):
    out = tmp_path / "model"
    assert main(["--quiet", "train", "--dataset", "yinyang", "--epochs", "1", "--out",
                 str(out), "--device", "cpu"]) == 0
    assert json.loads((out / "model.json").read_text())["config"]["device"] == "cpu"
    assert environment("cpu")["device"] == "cpu"


def _staged(root: Path, device: str) -> dict:
    """train -> scale -> fit -> evaluate on ``device``; the evaluate metrics and devices."""
    steps = [["train", "--dataset", "yinyang", "--widths", "2,8,6,3", "--epochs", "20"],
             ["scale", str(root / "train"), "--layer", "1", "--n-inserted", "2", "--epochs",
              "30", "--init", "identity"],
             ["fit", str(root / "scale"), "--n-delays", "1"],
             ["evaluate", str(root / "fit")]]
    for step, name in zip(steps, ("train", "scale", "fit", "eval"), strict=True):
        assert main(["--quiet", *step, "--out", str(root / name), "--device", device]) == 0
    recorded = [json.loads((root / name / f"{kind}.json").read_text())["config"]["device"]
                for name, kind in (("train", "model"), ("scale", "scaled"), ("fit", "hybrid"))]
    results = json.loads((root / "eval" / "results.json").read_text())
    return {"metrics": results["metrics"],
            "devices": [*recorded, results["environment"]["device"]]}


@pytest.mark.parametrize("device", DEVICES)
def test_staged_commands_run_on_the_device(device, tmp_path, capsys):
    run = _staged(tmp_path / device, device)
    assert [torch.device(d).type for d in run["devices"]] == [device] * 4
    if device != "cpu":  # the same network and hybrid as on the CPU, up to rounding
        on_cpu = _staged(tmp_path / "cpu", "cpu")["metrics"]
        for split, scores in run["metrics"].items():
            for model in ("original", "scaled", "hybrid"):
                assert abs(scores[model] - on_cpu[split][model]) <= 0.01


@pytest.mark.parametrize("device", DEVICES)
def test_linearize_a_named_submodule(device, audit):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(),
                          nn.Linear(6, 2)).to(device)
    X = torch.randn(48, 3)
    with audit:
        hybrid = linearize(model, target="2", data=X, n_inserted=3, n_delays=2,
                           scaling_config=TrainConfig(epochs=3, batch_size=48))
        with torch.no_grad():
            out = hybrid(X.to(device))
    _check_on(out, device)
    _check_on(hybrid.dmd_.basis_, device)
