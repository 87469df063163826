"""Factories for tests/test_depth_cli.py, imported by ``--model-factory depth_factory:...``
(the tests put this folder on sys.path): a tiny residual classifier and broken factories."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import safetensors.torch
import torch
from torch import nn


class Block(nn.Module):
    """x + W2 tanh(W1 x): a width-preserving residual block."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, width), nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 0.5 * self.fc2(torch.tanh(self.fc1(x)))


class TinyResidual(nn.Module):
    """Linear n_in -> width, ``depth`` residual blocks, Linear head. [n, n_in] -> [n, n_out]."""

    def __init__(self, n_in: int = 4, width: int = 6, depth: int = 4, n_out: int = 3) -> None:
        super().__init__()
        self.embed = nn.Linear(n_in, width)
        self.blocks = nn.ModuleList([Block(width) for _ in range(depth)])
        self.head = nn.Linear(width, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def make_tiny(depth: int = 4, width: int = 6) -> TinyResidual:
    """A factory function, as a user's package would define one."""
    return TinyResidual(width=width, depth=depth)


def make_noisy(**kwargs) -> TinyResidual:
    """Prints while building, as research code does; koopnet's stdout must stay one line."""
    print("building the model")
    return make_tiny(**kwargs)


class TupleOut(TinyResidual):
    """Returns (logits, features), as many research models do."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return super().forward(x), x


def make_dict(**_) -> dict:
    """Returns something that is not an nn.Module."""
    return {"not": "a module"}


def make_failing(**_) -> nn.Module:
    raise RuntimeError("the factory broke")


NOT_CALLABLE = 42


def write_tiny(folder: Path, *, seed: int, n: int) -> dict:
    """A seeded tiny classifier and inputs X [n, 4], saved as folder/w.safetensors and
    folder/X.npy (the files the depth CLI reads); returns the paths and the objects."""
    torch.manual_seed(seed)
    model = make_tiny().eval()
    X = torch.randn(n, 4)
    safetensors.torch.save_file(model.state_dict(), folder / "w.safetensors")
    np.save(folder / "X.npy", X.numpy())
    return {"dir": folder, "model": model, "X_t": X, "W": str(folder / "w.safetensors"),
            "X": str(folder / "X.npy")}
