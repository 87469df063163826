"""Shared pytest fixtures for koopnet's tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    """The read-only real MNIST (``<dir>/MNIST/raw/*.gz``), or skip when it is not there.

    Defaults to the ``shared/data`` folder beside the repository root (CI clones the repository
    next to ``shared/``); set ``KOOPNET_MNIST_DIR`` to point elsewhere.
    """
    default = Path(__file__).resolve().parents[2] / "shared" / "data"
    path = Path(os.environ.get("KOOPNET_MNIST_DIR") or default)
    if not path.is_dir():
        pytest.skip(
            f"real MNIST not found at '{path}'; set KOOPNET_MNIST_DIR to the folder holding it"
        )
    return path


@pytest.fixture
def interrupt_on_replace(monkeypatch):
    """``arm(n)``: the n-th ``os.replace`` in koopnet.io.artifacts raises KeyboardInterrupt, as a
    Ctrl-C between writing a temporary file and renaming it would. ``monkeypatch.undo()``
    disarms it."""
    from koopnet.io import artifacts

    def arm(on_call: int) -> None:
        real_replace, calls = os.replace, []

        def replace(src, dst):
            calls.append(dst)
            if len(calls) == on_call:
                raise KeyboardInterrupt
            real_replace(src, dst)

        monkeypatch.setattr(artifacts.os, "replace", replace)

    return arm


@pytest.fixture(autouse=True)
def _seed() -> None:
    """Every test starts from the same torch state, so results never depend on test order."""
    import torch

    torch.manual_seed(0)


@pytest.fixture
def linear_system():
    """Trajectories of x_{t+1} = A x_t with known eigenvalues (two real, one complex pair).

    Returns (A [4, 4], eigenvalues [4] complex, trajectories [B=20, T=15, W=4]), float64.
    """
    import torch

    eigenvalues = torch.tensor([0.9, 0.5, 0.7 + 0.2j, 0.7 - 0.2j], dtype=torch.complex128)
    block = torch.tensor([[0.9, 0, 0, 0], [0, 0.5, 0, 0], [0, 0, 0.7, -0.2], [0, 0, 0.2, 0.7]],
                         dtype=torch.float64)
    basis = torch.linalg.qr(torch.randn(4, 4, dtype=torch.float64))[0]
    A = basis @ block @ basis.T
    states = [torch.randn(20, 4, dtype=torch.float64)]
    for _ in range(14):
        states.append(states[-1] @ A.T)
    return A, eigenvalues, torch.stack(states, dim=1)


@pytest.fixture(scope="session")
def tiny_mlp():
    """A trained 2-8-6-4-3-2 ReLU MLP on 600 Yin-Yang points (seconds), with its data."""
    import torch

    from koopnet.io.datasets import make_yinyang
    from koopnet.models import TrainConfig, build_mlp, train_classifier

    torch.manual_seed(1)
    X, y = make_yinyang(600, seed=3)
    model = build_mlp([2, 8, 6, 4, 3, 2])
    train_classifier(model, X, y, TrainConfig(epochs=150, batch_size=200, lr=1e-2), seed=1)
    return model, X, y
