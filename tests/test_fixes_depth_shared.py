"""A block that runs at more than one position of the depth trajectory (one module registered
under two names, or called twice by the forward pass) is refused in one line that says so and
how to fix it, instead of calling the module 'not an nn.Module'."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from koopnet import linearize_depth
from koopnet.depth_states import collect_depth_states, resolve_blocks


class Residual(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.linear = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.tanh(self.linear(x))


class CallsTwice(nn.Module):
    """``b`` runs twice in forward; ``unused`` never runs."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c, self.unused = nn.Linear(4, 4), Residual(4), Residual(4), Residual(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(self.b(self.b(self.a(x))))


def shared_stack() -> nn.Sequential:
    """Blocks 1, 2, 3 with ``model[2] = model[1]``: one module at positions 1 and 2."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), Residual(4), Residual(4), Residual(4), nn.Linear(4, 2))
    model[2] = model[1]
    return model


X = torch.randn(20, 4, generator=torch.Generator().manual_seed(1))
SHARED = (r"^block '{name}' is one module registered under the names \['1', '2'\] \(shared\): "
          r"it runs wherever the forward pass calls any of them, .* give each position its own "
          r"module \(copy\.deepcopy\) or name a span without it\.$")


@pytest.mark.parametrize("blocks, name", [(["1", "2", "3"], "1"), (["2", "3"], "2"),
                                          (["1"], "1")])
def test_a_shared_block_is_named_as_shared(blocks, name):
    model = shared_stack()
    with pytest.raises(ValueError, match=SHARED.format(name=name)):
        resolve_blocks(model, blocks)
    with pytest.raises(ValueError, match=SHARED.format(name=name)):
        linearize_depth(model, blocks, X, n_delays=0)


def test_giving_each_position_its_own_module_is_the_fix():
    model = shared_stack()
    model[2] = copy.deepcopy(model[1])
    assert collect_depth_states(model, ["1", "2", "3"], X).shape == (20, 4, 4)
    assert collect_depth_states(shared_stack(), ["3"], X).shape == (20, 2, 4)  # span without it


def test_a_block_called_twice_by_forward_is_named():
    with pytest.raises(ValueError, match=r"^block 'b' ran 2 times in one forward pass \(the "
                                         r"forward pass calls this module more than once\); give "
                                         r"each call its own module \(copy\.deepcopy\) or name a "
                                         r"span of blocks that run once each\.$"):
        collect_depth_states(CallsTwice(), ["b", "c"], X)
    assert collect_depth_states(CallsTwice(), ["c"], X).shape == (20, 2, 4)


def test_a_block_that_never_runs_is_named():
    with pytest.raises(ValueError, match=r"^block 'unused' did not run in the model's forward "
                                         r"pass; name blocks that the forward pass calls\.$"):
        collect_depth_states(CallsTwice(), ["c", "unused"], X)
