"""TrainConfig's learning-rate schedule and label smoothing: the defaults leave every existing
recipe bit-identical, "cosine" decays per batch to zero, bad values are refused."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch
from torch import nn

from koopnet.lab.recipes import CLEAN_MNIST_BASE, MNIST_RECIPE, YINYANG_RECIPE, default_config
from koopnet.models import TrainConfig, build_mlp, fit_minibatch, train_classifier


def _data(n=64):
    g = torch.Generator().manual_seed(0)
    X = torch.randn(n, 4, generator=g)
    return X, (X[:, 0] > 0).long()


def _trained(config, seed=0):
    X, y = _data()
    torch.manual_seed(seed)
    model = build_mlp([4, 8, 2])
    history = train_classifier(model, X, y, config, seed=seed)
    return model, history


def _lrs(config, monkeypatch):
    """The learning rate of every optimiser step."""
    seen = []
    step = torch.optim.AdamW.step

    def spy(self, *args, **kwargs):
        seen.append(self.param_groups[0]["lr"])
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", spy)
    X, y = _data()
    model = build_mlp([4, 8, 2])
    optimizers = []
    init = torch.optim.AdamW.__init__

    def keep(self, *args, **kwargs):
        init(self, *args, **kwargs)
        optimizers.append(self)

    monkeypatch.setattr(torch.optim.AdamW, "__init__", keep)
    fit_minibatch(model, nn.functional.cross_entropy, X, y, config, seed=0)
    return seen, optimizers[0].param_groups[0]["lr"]


def test_defaults_are_unchanged():
    config = TrainConfig()
    assert config.schedule is None and config.label_smoothing == 0.0
    assert MNIST_RECIPE.schedule is None and YINYANG_RECIPE.schedule is None
    assert default_config("mnist", "paper").base == MNIST_RECIPE


def test_no_schedule_is_bit_identical_to_an_explicit_none():
    config = TrainConfig(epochs=3, batch_size=16, lr=1e-2)
    a, ha = _trained(config)
    b, hb = _trained(dataclasses.replace(config, schedule=None, label_smoothing=0.0))
    assert ha == hb
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)


def test_constant_lr_without_schedule(monkeypatch):
    lrs, final = _lrs(TrainConfig(epochs=2, batch_size=16, lr=1e-2), monkeypatch)
    assert len(lrs) == 8 and set(lrs) == {1e-2} and final == 1e-2


def test_cosine_decays_per_batch_to_zero(monkeypatch):
    config = TrainConfig(epochs=3, batch_size=20, lr=1e-2, schedule="cosine")  # 4 batches/epoch
    lrs, final = _lrs(config, monkeypatch)
    assert len(lrs) == 12 and lrs[0] == pytest.approx(1e-2)
    assert all(a > b for a, b in itertools.pairwise(lrs))  # strictly decreasing
    assert lrs[6] == pytest.approx(0.5e-2)  # half way: cos(pi / 2)
    assert final == pytest.approx(0.0, abs=1e-12)  # lr * 0 after the last step


def test_onecycle_warms_up_then_decays(monkeypatch):
    config = TrainConfig(epochs=5, batch_size=16, lr=1e-2, schedule="onecycle")
    lrs, final = _lrs(config, monkeypatch)
    peak = lrs.index(max(lrs))
    assert len(lrs) == 20 and 0 < peak < 5 and max(lrs) == pytest.approx(1e-2)
    assert lrs[0] < 1e-3 and lrs[-1] < 1e-5 and final < 1e-3  # decays far below the start


def test_label_smoothing_is_torch_cross_entropy_with_smoothing():
    config = TrainConfig(epochs=2, batch_size=16, lr=1e-2, label_smoothing=0.1)
    model, history = _trained(config)
    X, y = _data()
    torch.manual_seed(0)
    reference = build_mlp([4, 8, 2])
    expected = fit_minibatch(
        reference, lambda z, t: nn.functional.cross_entropy(z, t, label_smoothing=0.1), X, y,
        config, seed=0)
    assert history == expected
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        assert torch.equal(p, q)
    _, plain = _trained(dataclasses.replace(config, label_smoothing=0.0))
    assert plain != history


def test_bad_schedule_values_are_refused():
    with pytest.raises(ValueError, match=r"schedule='linear' must be 'cosine' or 'onecycle'"):
        TrainConfig(schedule="linear")
    with pytest.raises(ValueError, match=r"both set the learning rate; pass plateau_patience"):
        TrainConfig(schedule="cosine", plateau_patience=2)
    with pytest.raises(ValueError, match=r"label_smoothing=1.0 must be in \[0, 1\)"):
        TrainConfig(label_smoothing=1.0)


def test_clean_mnist_uses_the_validation_chosen_recipe():
    assert default_config("mnist").base == CLEAN_MNIST_BASE
    assert default_config("idx:/nowhere").base == CLEAN_MNIST_BASE
    assert default_config("mnist", "paper").base == MNIST_RECIPE
    quick = default_config("mnist", quick=True).base
    assert quick.schedule == CLEAN_MNIST_BASE.schedule and quick.epochs < CLEAN_MNIST_BASE.epochs
