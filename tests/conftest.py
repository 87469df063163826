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
