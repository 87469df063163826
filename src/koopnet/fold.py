"""Plain-torch pieces of a folded hybrid: the delay window, one linear map and the precision casts.

A :class:`koopnet.KoopmanHybrid` lifts the states s_{k-h}..s_k into delay coordinates
g = [s_k, s_{k-1}, ..., s_{k-h}, (1)] (each state padded to the observable's width) and applies one
matrix ``linear_map`` [w', D] to g. :meth:`koopnet.KoopmanHybrid.fold` rebuilds that as an
``nn.Sequential`` of standard modules, so it can be exported (``torch.export``, ONNX) and run
without koopnet. A plain Sequential passes one tensor from module to module, but g needs every
state of the window, not only the last, so :class:`DelayWindow` runs the h blocks itself and hands
on the concatenated window [s_k, ..., s_{k-h}].

The map is applied to the real neurons only: the padding entries and the constant observable
are constants of every sample, so their columns are folded into the bias (:func:`window_map`),
which shrinks the GEMM from D to (h+1) w inputs. A learned observable appends psi's output to g
(g = [delay vector, psi(z), (1)]): psi is nonlinear, so it cannot be folded into the map;
:class:`LearnedLift` computes it from the window and hands on [window, psi(z)], and the map keeps
psi's columns as inputs. Nothing here imports the rest of koopnet.
"""

from __future__ import annotations

import torch
from torch import nn


class DelayWindow(nn.Module):
    """Runs ``blocks`` in turn and returns every state of the run, newest first.

    Shape: s [B, w] -> [s_h, s_{h-1}, ..., s] concatenated, [B, (h+1) w] with h = len(blocks).
    """

    def __init__(self, blocks: list[nn.Module]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, state: torch.Tensor) -> torch.Tensor:
        states = [state]
        for block in self.blocks:
            state = block(state)
            states.append(state)
        return torch.cat(states[::-1], dim=1)


class Cast(nn.Module):
    """Casts its input to ``dtype`` (the map's compute precision and back)."""

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        self.dtype = dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.dtype)

    def extra_repr(self) -> str:
        return str(self.dtype)


class LearnedLift(nn.Module):
    """[window] -> [window, psi((z - mean) / std)], the lifting of a learned observable.

    z is the first len(``mean``) entries of the padded delay vector (each state of the window
    padded from ``width`` to ``padded_width`` with ``pad_value``, as the hybrid pads it); psi
    runs in the dtype of ``mean`` and its output is cast back to the window's.
    Shape: window [B, n_states * width] -> [B, n_states * width + r].
    """

    def __init__(self, psi: nn.Module, mean: torch.Tensor, std: torch.Tensor, *, n_states: int,
                 width: int, padded_width: int, pad_value: float) -> None:
        super().__init__()
        self.psi = psi
        self.register_buffer("mean", mean.detach().clone())
        self.register_buffer("std", std.detach().clone())
        self.n_states, self.width, self.padded_width = n_states, width, padded_width
        self.pad_value = pad_value

    def forward(self, window: torch.Tensor) -> torch.Tensor:
        delay = window
        if self.padded_width > self.width:
            states = window.reshape(len(window), self.n_states, self.width)
            delay = nn.functional.pad(states, (0, self.padded_width - self.width),
                                      value=self.pad_value).flatten(1)
        inputs = delay[:, :self.mean.shape[0]].to(self.mean.dtype)
        latent = self.psi((inputs - self.mean) / self.std)
        return torch.cat([window, latent.to(window.dtype)], dim=1)


def window_map(linear_map: torch.Tensor, *, n_states: int, width: int, padded_width: int,
               pad_value: float, constant: bool,
               n_latent: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The map restricted to the real neurons of the window, with the constant columns as a bias.

    ``linear_map`` [w', D] acts on g = [s_k (padded), ..., s_{k-h} (padded), (psi), (1)], D =
    ``padded_width`` * ``n_states`` (+ ``n_latent``) (+1). Padding entries always hold
    ``pad_value`` and the constant observable always 1, so their columns add the same vector to
    every sample: the bias. The ``n_latent`` columns of a learned psi stay inputs of the map.
    Computed in float64. Shape: -> weight [w', n_states * width + n_latent], bias [w'].
    """
    M = linear_map.to(torch.float64)
    states = padded_width * n_states
    expected = states + n_latent + int(constant)
    if M.ndim != 2 or M.shape[1] != expected:
        raise ValueError(f"linear_map has shape {list(M.shape)}; {n_states} states of width "
                         f"{padded_width}{f', {n_latent} latent' if n_latent else ''}"
                         f"{' and the constant' if constant else ''} need [w', {expected}].")
    if not 0 < width <= padded_width:
        raise ValueError(f"width={width} must be in 1..{padded_width} (the padded width).")
    blocks = M[:, :states].reshape(len(M), n_states, padded_width)
    weight = blocks[:, :, :width].reshape(len(M), n_states * width)
    bias = pad_value * blocks[:, :, width:].sum(dim=(1, 2))
    if constant:
        bias = bias + M[:, -1]
    return torch.cat([weight, M[:, states:states + n_latent]], dim=1), bias


def numerical_rank(matrix: torch.Tensor) -> tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank of ``matrix`` (singular values above max(shape) * eps * s_max) and its float64 SVD."""
    U, S, Vh = torch.linalg.svd(matrix.to(torch.float64), full_matrices=False)
    if not len(S) or float(S[0]) == 0.0:
        return 0, U, S, Vh
    tol = max(matrix.shape) * torch.finfo(torch.float64).eps * float(S[0])
    return int((S > tol).sum()), U, S, Vh


def linear_layers(weight: torch.Tensor, bias: torch.Tensor, *, factored: bool | None = None,
                  dtype: torch.dtype = torch.float32, device=None) -> nn.Module:
    """``x @ weight.T + bias`` as one ``nn.Linear``, or factored as Linear(n, r) -> Linear(r, m).

    ``factored=None`` factors when the map's numerical rank r makes it cheaper, i.e.
    r (n + m) < n m multiply-adds; True always factors (r >= 1), False never does. The factors
    come from the float64 SVD weight = U S V^T with only the numerically nonzero singular values
    kept (first layer S V^T, second U and the bias), so the factored map equals the dense one
    up to rounding. Shape: weight [m, n], bias [m].
    """
    m, n = weight.shape
    rank, U, S, Vh = numerical_rank(weight)
    if factored is None:
        factored = rank * (n + m) < n * m
    if not factored:
        layer = nn.Linear(n, m, dtype=dtype, device=device)
        with torch.no_grad():
            layer.weight.copy_(weight)
            layer.bias.copy_(bias)
        return layer
    rank = max(rank, 1)
    down = nn.Linear(n, rank, bias=False, dtype=dtype, device=device)
    up = nn.Linear(rank, m, dtype=dtype, device=device)
    with torch.no_grad():
        down.weight.copy_(S[:rank, None] * Vh[:rank])
        up.weight.copy_(U[:, :rank])
        up.bias.copy_(bias)
    return nn.Sequential(down, up)


def multiply_adds(module: nn.Module) -> int:
    """Multiply-adds per sample of the ``nn.Linear`` layers in ``module`` (in * out each);
    elementwise work (activations, biases, casts, concatenation) is not counted."""
    return sum(m.in_features * m.out_features for m in module.modules()
               if isinstance(m, nn.Linear))
