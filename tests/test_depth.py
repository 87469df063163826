"""Depth trajectories of residual stacks: collection, the fit and the DepthHybrid."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import koopnet
from koopnet import depth
from koopnet.depth import DepthHybrid, collect_depth_states, linearize_depth
from koopnet.depth_states import to_rows
from koopnet.spec import FitSpec


class LinearResidual(nn.Module):
    """x -> x + A x, exactly linear."""

    def __init__(self, A: torch.Tensor) -> None:
        super().__init__()
        self.lin = nn.Linear(A.shape[0], A.shape[0], bias=False)
        with torch.no_grad():
            self.lin.weight.copy_(A)

    def forward(self, x):
        return x + self.lin(x)


class GeluResidual(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm, self.lin = nn.LayerNorm(width), nn.Linear(width, width)

    def forward(self, x):
        return x + nn.functional.gelu(self.lin(self.norm(x)))


class ResMLP(nn.Module):
    def __init__(self, n_in: int, width: int, n_out: int, blocks: list[nn.Module]) -> None:
        super().__init__()
        self.embed = nn.Linear(n_in, width)
        self.blocks = nn.ModuleList(blocks)
        self.head = nn.Linear(width, n_out)

    def forward(self, x):
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


class Tokens(nn.Module):
    """A transformer-like stack over tokens: [B, L, 2] -> blocks on [B, L, d] -> mean -> head."""

    def __init__(self, d: int, blocks: list[nn.Module]) -> None:
        super().__init__()
        self.embed = nn.Linear(2, d)
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(d, 2)

    def forward(self, x):
        return self.head(self.blocks(self.embed(x)).mean(1))


class PreNorm(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.norm, self.lin = nn.LayerNorm(d), nn.Linear(d, d)

    def forward(self, x):
        return x + self.lin(self.norm(x))


def names(n: int, prefix: str = "blocks") -> list[str]:
    return [f"{prefix}.{i}" for i in range(n)]


def linear_resmlp(width: int = 6, n_blocks: int = 4) -> ResMLP:
    A = 0.2 * torch.randn(width, width, dtype=torch.float64)  # one A: autonomous dynamics
    return ResMLP(3, width, 2, [LinearResidual(A) for _ in range(n_blocks)]).double()


@pytest.fixture(scope="module")
def yinyang_resmlp():
    """A GELU residual MLP with LayerNorm, 4 blocks of width 16, trained briefly on Yin-Yang."""
    torch.manual_seed(2)
    X, y = koopnet.make_yinyang(400, seed=4)
    model = ResMLP(2, 16, 2, [GeluResidual(16) for _ in range(4)])
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(60):
        optimiser.zero_grad()
        nn.functional.cross_entropy(model(X), y).backward()
        optimiser.step()
    return model, X


@pytest.mark.parametrize("h", [0, 1, 2, 3])
def test_exactly_linear_blocks_are_reproduced_for_every_h(h):
    model = linear_resmlp()
    X = torch.randn(64, 3, dtype=torch.float64)
    hybrid = linearize_depth(model, names(4), X, n_delays=h)
    assert isinstance(hybrid, DepthHybrid) and hybrid.linear_steps == 4 - h
    x = torch.randn(20, 3, dtype=torch.float64)
    with torch.no_grad():
        assert torch.allclose(hybrid(x), model(x), atol=1e-8, rtol=0)
    assert hybrid.linear_map.dtype == torch.float64


def test_states_are_input_of_first_block_and_each_output():
    model = linear_resmlp()
    X = torch.randn(5, 3, dtype=torch.float64)
    states = collect_depth_states(model, names(4), X)
    assert states.shape == (5, 5, 6)
    with torch.no_grad():
        s = model.embed(X)
        assert torch.equal(states[:, 0], s)
        for t, block in enumerate(model.blocks, start=1):
            s = block(s)
            assert torch.equal(states[:, t], s)


def test_gelu_resmlp_on_yinyang(yinyang_resmlp):
    model, X = yinyang_resmlp
    model.train()  # the caller's mode is kept
    before = copy.deepcopy(model.state_dict())
    hybrid = linearize_depth(model, names(4), X, n_delays=3, rank=None)
    assert isinstance(hybrid, nn.Module) and model.training
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not model.blocks[0]._forward_hooks and not model.blocks[0]._forward_pre_hooks
    model.eval()
    with torch.no_grad():
        logits, reference = hybrid(X), model(X)
    assert logits.shape == reference.shape
    scale = reference.abs().max()
    assert (logits - reference).abs().max() < 0.01 * scale
    assert (logits.argmax(1) == reference.argmax(1)).float().mean() > 0.97
    # every h runs, with the model's output shape
    for h in range(3):
        assert linearize_depth(model, names(4), X, n_delays=h)(X[:3]).shape == (3, 2)


def test_float64_model_and_streamed_fit(yinyang_resmlp, monkeypatch):
    model = copy.deepcopy(yinyang_resmlp[0]).double()
    X = yinyang_resmlp[1]
    hybrid = linearize_depth(model, names(4), X, n_delays=2, tikhonov=1e-10)
    out = hybrid(X.double()[:4])
    assert out.dtype == torch.float64
    monkeypatch.setattr(depth, "_IN_MEMORY_BYTES", 0)  # the moments route gives the same map
    streamed = linearize_depth(model, names(4), X, n_delays=2, tikhonov=1e-10, batch_size=64)
    assert torch.allclose(streamed.linear_map, hybrid.linear_map, atol=1e-6)


def test_per_position_tokens():
    torch.manual_seed(3)
    model = Tokens(8, [PreNorm(8) for _ in range(3)])
    X = torch.randn(40, 5, 2)  # [n, L, 2]
    states = collect_depth_states(model, names(3), X, per_position=True)
    assert states.shape == (40 * 5, 4, 8)
    flat = collect_depth_states(model, names(3), X)
    assert flat.shape == (40, 4, 5 * 8)
    assert torch.equal(states.reshape(40, 5, 4, 8).transpose(1, 2).reshape(40, 4, 40), flat)
    hybrid = linearize_depth(model, names(3), X, n_delays=2, per_position=True)
    assert hybrid(X[:7]).shape == (7, 2)
    assert hybrid.linear_map.shape == (8, 8 * 3)
    with torch.no_grad():
        assert (hybrid(X) - model(X)).abs().max() < 0.1 * model(X).abs().max()


@pytest.mark.parametrize("kind", ["tokens", "maps"])
def test_per_position_is_exact_for_position_wise_linear_blocks(kind):
    A = 0.2 * torch.randn(4, 4, dtype=torch.float64)
    if kind == "tokens":  # [B, L, d]
        blocks = [LinearResidual(A) for _ in range(3)]
        model = nn.Sequential(nn.Linear(2, 4), *blocks, nn.Flatten(), nn.Linear(12, 2)).double()
        X = torch.randn(30, 3, 2, dtype=torch.float64)
    else:  # [B, C, H, W]: a 1x1 convolution is the same map at every pixel
        convs = [nn.Conv2d(4, 4, 1, bias=False) for _ in range(3)]
        for conv in convs:
            conv.weight.data.copy_(A.float()[:, :, None, None])
        blocks = [Residual(conv) for conv in convs]
        model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), *blocks, nn.Flatten(),
                              nn.Linear(4 * 5 * 5, 2)).double()
        X = torch.randn(30, 1, 5, 5, dtype=torch.float64)
    hybrid = linearize_depth(model, ["1", "2", "3"], X, n_delays=0, per_position=True)
    assert hybrid.linear_map.shape == (4, 4)
    with torch.no_grad():
        assert torch.allclose(hybrid(X), model(X), atol=1e-8, rtol=0)


class Residual(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return x + self.inner(x)


def test_hybrid_copies_and_runs_in_float32_and_float64(yinyang_resmlp):
    model, X = yinyang_resmlp
    hybrid = linearize_depth(model, names(4), X, n_delays=1)
    clone = copy.deepcopy(hybrid)
    assert clone._buffer is not hybrid._buffer
    assert torch.equal(clone(X[:5]), hybrid(X[:5]))
    assert hybrid(X[:5]).dtype == torch.float32
    assert hybrid.double()(X[:5].double()).dtype == torch.float64
    assert "n_delays=1, linear_steps=3" in repr(hybrid)
    keys = list(hybrid.state_dict())  # the model's own parameters, the map once
    assert [k for k in keys if "linear_map" in k] == ["model.blocks.3.linear_map"]
    assert "model.blocks.0.block.lin.weight" in keys and "model.head.weight" in keys


def test_bad_inputs_have_pinned_messages(yinyang_resmlp):
    model, X = yinyang_resmlp
    with pytest.raises(ValueError, match=r"block 'blocks\.9' is not a submodule of the model; "
                                         r"valid names include 'embed', 'blocks'"):
        linearize_depth(model, ["blocks.0", "blocks.9"], X)
    with pytest.raises(TypeError, match=r"block 'blocks\.0\.lin\.weight' is a Parameter, not "
                                        r"an nn\.Module"):
        linearize_depth(model, ["blocks.0.lin.weight"], X)
    with pytest.raises(TypeError, match=r"model must be a torch\.nn\.Module; got dict"):
        linearize_depth({}, names(2), X)
    with pytest.raises(TypeError, match=r"blocks must be a list of qualified module names"):
        linearize_depth(model, "blocks.0", X)
    with pytest.raises(ValueError, match=r"blocks names 'blocks\.1' more than once"):
        linearize_depth(model, ["blocks.0", "blocks.1", "blocks.1"], X)
    with pytest.raises(ValueError, match=r"blocks 'blocks\.0' and 'blocks\.2' are not "
                                         r"consecutive: the input of 'blocks\.2' is not"):
        linearize_depth(model, ["blocks.0", "blocks.2"], X, n_delays=0)
    with pytest.raises(ValueError, match=r"are not consecutive: they ran as \['blocks\.0', "
                                         r"'blocks\.1'\]"):
        linearize_depth(model, ["blocks.1", "blocks.0"], X, n_delays=0)
    with pytest.raises(ValueError, match=r"block 'embed' maps shape \[2, 2\] to \[2, 16\]; "
                                         r"depth trajectories need blocks that keep"):
        linearize_depth(model, ["embed", "blocks.0"], X, n_delays=0)
    with pytest.raises(ValueError, match=r"data of shape \[400, 5\] does not fit the model: on "
                                         r"2 samples it raised RuntimeError: .*samples first"):
        linearize_depth(model, names(4), torch.randn(400, 5))
    with pytest.raises(ValueError, match=r"n_delays=4 needs trajectories of at least 6 states; "
                                         r"got T=5\. Lower n_delays to <= 3 or name more blocks"):
        linearize_depth(model, names(4), X, n_delays=4)
    with pytest.raises(ValueError, match=r"spec\.pairing='concatenated': depth trajectories"):
        linearize_depth(model, names(4), X, spec=FitSpec(n_delays=1, pairing="concatenated"))
    with pytest.raises(ValueError, match=r"pass either spec=FitSpec\(\.\.\.\) or the keywords"):
        linearize_depth(model, names(4), X, spec=FitSpec(n_delays=1), rank=3)
    with pytest.raises(ValueError, match=r"rank=500 exceeds what the data supports"):
        linearize_depth(model, names(4), X, n_delays=1, rank=500)
    with pytest.raises(ValueError, match=r"data has shape \(1, 2\); pass at least 2 samples"):
        linearize_depth(model, names(4), X[:1])
    with pytest.raises(ValueError, match=r"per_position=True needs states of shape"):
        to_rows(torch.zeros(1, 2, 3, 4, 5), per_position=True)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_spec_is_used_as_given(yinyang_resmlp):
    model, X = yinyang_resmlp
    hybrid = linearize_depth(model, names(4), X, spec=FitSpec(n_delays=2, rank=5))
    assert hybrid.n_delays == 2 and hybrid.rank_ == 5 and not hybrid.dmd_.exact_rollout
    assert linearize_depth(model, names(4), X, n_delays=2).dmd_.exact_rollout


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_device_follows_the_model(yinyang_resmlp):
    model, X = yinyang_resmlp
    on_cpu = linearize_depth(model, names(4), X, n_delays=2)
    hybrid = linearize_depth(copy.deepcopy(model).cuda(), names(4), X, n_delays=2)
    assert hybrid.linear_map.device.type == "cuda"
    assert torch.allclose(hybrid.linear_map.cpu(), on_cpu.linear_map, atol=1e-6)
    with torch.no_grad():
        assert torch.allclose(hybrid(X.cuda()).cpu(), on_cpu(X), atol=1e-4)


def test_cached_cast_of_the_map_follows_edits_and_dtype(yinyang_resmlp):
    model, X = yinyang_resmlp
    hybrid = linearize_depth(model, [f"blocks.{i}" for i in range(len(model.blocks))], X,
                             n_delays=1)
    predict = next(m for m in hybrid.modules() if type(m).__name__ == "_Predict")
    before = hybrid(X[:16])
    assert torch.equal(hybrid(X[:16]), before)  # the cached cast gives the same logits
    with torch.no_grad():
        predict.linear_map.mul_(0.0)  # an in-place edit of the float64 map
    assert not torch.allclose(hybrid(X[:16]), before)
    predict.linear_map = torch.zeros_like(predict.linear_map)  # a replaced map
    zero = hybrid(X[:16])
    assert hybrid.double()(X[:16].double()).dtype == torch.float64
    torch.testing.assert_close(zero.double(), hybrid(X[:16].double()), atol=1e-5, rtol=1e-5)
