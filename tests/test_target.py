"""linearize(model, target=...) on submodules of any network, and Sequential MLPs with norms
through linearize(model, layer=k): tiny random models and data, seconds each."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

import koopnet
from koopnet.models import TrainConfig
from koopnet.submodule import KoopmanTarget

QUICK = TrainConfig(epochs=60, batch_size=64, lr=1e-2)


class Block(nn.Module):
    """Pre-norm residual block with a token-wise MLP: [B, L, d] -> [B, L, d]."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x):
        return x + self.mlp(self.norm(x))


class TokenNet(nn.Module):
    """Attention-free token model: [B, L, 3] -> [B, 2]."""

    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.embed = nn.Linear(3, d)
        self.blocks = nn.Sequential(Block(d), Block(d))
        self.head = nn.Linear(d, 2)

    def forward(self, x):
        return self.head(self.blocks(self.embed(x)).mean(1))


class Residual(nn.Module):
    """A residual MLP on vectors: [B, 4] -> [B, 3], the middle block's width changes."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 6)
        self.block = nn.Sequential(nn.Linear(6, 6), nn.Tanh())
        self.down = nn.Sequential(nn.Linear(6, 5), nn.SiLU())
        self.out = nn.Linear(5, 3)

    def forward(self, x):
        h = self.inp(x)
        return self.out(self.down(h + self.block(h)))


def token_net(dtype=torch.float32):
    torch.manual_seed(0)
    return TokenNet().to(dtype)


def tokens(n=48, dtype=torch.float32):
    return torch.randn(n, 5, 3, generator=torch.Generator().manual_seed(1), dtype=dtype)


def lin(model=None, data=None, **kwargs):
    kwargs = {"target": "blocks.1.mlp", "n_inserted": 3, "n_delays": 2,
              "scaling_config": QUICK, **kwargs}
    return koopnet.linearize(token_net() if model is None else model,
                             data=tokens() if data is None else data, **kwargs)


@pytest.mark.parametrize("target", ["blocks.1.mlp", "blocks.1", "blocks.0.norm"])
def test_token_targets_give_a_copy_close_to_the_scaled_model(target):
    model = token_net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    hybrid = lin(model, target=target)
    x = tokens(7)
    out, scaled = hybrid(x), hybrid.scaled(x)
    assert isinstance(hybrid, TokenNet) and hybrid is not model and not hybrid.training
    assert isinstance(hybrid.get_submodule(target), KoopmanTarget)
    assert not isinstance(model.get_submodule(target), KoopmanTarget)  # the input is untouched
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert out.shape == model(x).shape == (7, 2)
    # one linear step after h = N - 1 delays: the DMD pairs are nearly exact
    assert (out - scaled).abs().max() < 1e-3 * scaled.abs().max()
    assert not torch.equal(scaled, model(x))  # the inserts were trained, not skipped
    assert hybrid.n_inserted == 3 and hybrid.n_delays == 2 and hybrid.target_ == target
    assert hybrid.rank_ == hybrid.dmd_.operator_.shape[0] and hybrid.observable.n_delays_ == 2
    assert hybrid.scaling_error_ < 0.05


def test_vector_target_changing_width_and_its_activation_copied():
    torch.manual_seed(0)
    model = Residual()
    X = torch.randn(64, 4, generator=torch.Generator().manual_seed(2))
    hybrid = koopnet.linearize(model, target="down", data=X, n_inserted=4, n_delays=3,
                               scaling_config=QUICK)
    inserts = hybrid.scaled.get_submodule("down.inserts")
    assert type(inserts[0].body[1]) is nn.SiLU  # the first activation inside the target
    x = torch.randn(5, 4)
    assert hybrid(x).shape == (5, 3)
    assert torch.allclose(hybrid(x), hybrid.scaled(x), atol=1e-4)


def test_float64_and_bfloat16_models_run_in_their_dtype():
    hybrid = lin(token_net(torch.float64), data=tokens(dtype=torch.float64))
    x = tokens(4, torch.float64)
    assert hybrid(x).dtype == torch.float64
    assert (hybrid(x) - hybrid.scaled(x)).abs().max() < 1e-3 * hybrid.scaled(x).abs().max()
    half = lin(token_net(torch.bfloat16), data=tokens())
    assert half(tokens(4).bfloat16()).dtype == torch.bfloat16
    assert half.get_submodule("blocks.1.mlp").core.linear_map.dtype == torch.float64


def test_same_seed_same_model_and_one_log_line(caplog):
    with caplog.at_level(logging.INFO, logger="koopnet.linearization"):
        first = lin(scaling_config=None, n_inserted=2, n_delays=1)
    lines = [r.getMessage() for r in caplog.records if "scaling on" in r.getMessage()]
    assert lines == ["target 'blocks.1.mlp': scaling on 48 samples: up to 1000 AdamW steps "
                     "(1000 epochs of batch 48, lr 0.01)"]
    second = lin(n_inserted=2, n_delays=1, scaling_config=None)
    x = tokens(3)
    assert torch.equal(first(x), second(x))


def test_a_dataloader_of_x_y_pairs_gives_the_same_model():
    X = tokens()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, torch.zeros(48)),
                                         batch_size=16)
    x = tokens(3)
    assert torch.equal(lin(data=loader)(x), lin(data=X)(x))


class Twice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.f = nn.Linear(3, 3)

    def forward(self, x):
        return self.f(self.f(x))


class Tokens(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.out = nn.Linear(4, 2)

    def forward(self, ids):
        return self.out(self.embed(ids))


BAD = {
    "unknown name": (dict(target="blocks.9"), ValueError,
                     r"target 'blocks\.9' is not a submodule of the model; valid names include "
                     r"'embed', 'blocks', 'blocks\.0'"),
    "the model itself": (dict(target=""), ValueError, r"target='' is the model itself"),
    "a parameter": (dict(target="embed.weight"), TypeError,
                    r"target 'embed\.weight' is a Parameter, not an nn\.Module"),
    "not a string": (dict(target=3), TypeError, r"target must be a qualified module name"),
    "token ids": (dict(model=Tokens(), data=torch.randint(0, 10, (8, 3)), target="embed"),
                  TypeError, r"target 'embed' takes a torch\.int64 tensor of shape \[8, 3\]; "
                             r"the inserted blocks need floating-point inputs"),
    "data does not fit": (dict(data=torch.randn(8, 5, 4)), ValueError,
                          r"data of shape \[8, 5, 4\] does not fit the model: it raised "
                          r"RuntimeError"),
    "called twice": (dict(model=Twice(), data=torch.randn(8, 3), target="f"), ValueError,
                     r"target 'f' ran 2 times in one forward pass"),
    "no inserted block": (dict(n_inserted=0), ValueError, r"n_inserted=0 must be >= 1"),
    "too many delays": (dict(n_delays=3), ValueError,
                        r"n_delays=3 needs trajectories of at least 5 states; got T=4\. "
                        r".*n_inserted >= n_delays \+ 1"),
    "layer and target": (dict(layer=1), ValueError, r"pass exactly one of layer=k .* and "
                                                    r"target='name'"),
    "labels": (dict(labels=torch.zeros(48)), ValueError, r"labels judge a layer's scaling"),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_bad_targets_fail_with_one_line(case):
    kwargs, error, match = BAD[case]
    with pytest.raises(error, match=match) as info:
        lin(**kwargs)
    assert "\n" not in str(info.value)


def test_neither_layer_nor_target():
    with pytest.raises(ValueError, match=r"pass exactly one of layer=k"):
        koopnet.linearize(token_net(), data=tokens())


# ------------------------------------------------------------------ norms in Sequential MLPs


def norm_mlp(norm, activation=nn.GELU):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), norm(8), activation(), nn.Dropout(0.1),
                          nn.Linear(8, 8), norm(8), activation(), nn.Linear(8, 8), activation(),
                          nn.Linear(8, 2))
    model.train()
    model(torch.randn(32, 3))  # a BatchNorm gets running statistics of its own
    return model


@pytest.mark.parametrize("norm", [nn.LayerNorm, nn.BatchNorm1d])
def test_norm_mlps_go_through_layer_scaling_and_save_load(norm, tmp_path):
    model = norm_mlp(norm)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    X = torch.randn(64, 3, generator=torch.Generator().manual_seed(3))
    hybrid = koopnet.linearize(model, 1, X, n_inserted=3, n_delays=1, init="identity",
                               scaling_config=QUICK)
    assert model.training  # the user's model keeps its mode and its statistics
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    scaled = hybrid.scaled_
    assert [type(m) for m in scaled.replaced] == [nn.Linear, norm, nn.GELU]
    for key, value in scaled.replaced[1].state_dict().items():  # the frozen norm stayed frozen
        assert torch.equal(value, model[5].state_dict()[key])
    x = torch.randn(6, 3)
    assert torch.equal(hybrid.fold()(x), hybrid(x))
    koopnet.save_hybrid(hybrid, tmp_path)
    assert torch.equal(koopnet.load_hybrid(tmp_path)(x), hybrid(x))
    koopnet.save_scaled(scaled, tmp_path)
    assert torch.equal(koopnet.load_scaled(tmp_path)(x), scaled(x))


@pytest.mark.parametrize("activation", [nn.GELU, nn.SiLU, nn.Tanh,
                                        lambda: nn.LeakyReLU(0.37)])
def test_activations_are_copied_into_the_inserts(activation, tmp_path):
    model = norm_mlp(nn.LayerNorm, activation)
    hybrid = koopnet.linearize(model, 2, torch.randn(40, 3), n_inserted=2, n_delays=1,
                               scaling_config=TrainConfig(epochs=2, batch_size=40))
    inserted = hybrid.scaled_.inserts[0][1]
    assert type(inserted) is type(model[2])
    assert getattr(inserted, "negative_slope", None) == getattr(model[2], "negative_slope", None)
    koopnet.save_hybrid(hybrid, tmp_path)
    x = torch.randn(3, 3)
    assert torch.equal(koopnet.load_hybrid(tmp_path)(x), hybrid(x))


def test_norm_in_the_wrong_place_is_named():
    model = nn.Sequential(nn.Linear(3, 8), nn.GELU(), nn.LayerNorm(8), nn.Linear(8, 8),
                          nn.GELU(), nn.Linear(8, 2))
    with pytest.raises(ValueError, match=r"model\[2\] is LayerNorm where a Linear layer is "
                                         r"needed \(it follows the activation model\[1\]\)"):
        koopnet.linearize(model, 1, torch.randn(10, 3))
    ends = nn.Sequential(nn.Linear(3, 8), nn.GELU(), nn.Linear(8, 2), nn.LayerNorm(2))
    with pytest.raises(ValueError, match=r"model ends with a norm \(model\[3\]\)"):
        koopnet.linearize(ends, 1, torch.randn(10, 3))
