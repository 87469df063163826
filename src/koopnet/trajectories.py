"""Trajectories through depth: the states s_0..s_{T-1} of a scaled network, per input sample.

A state narrower than the widest one (the replaced layer's output when it shrinks the width) is
right-padded with ``pad_value`` (the paper uses -1) so all states stack into one tensor; the real
width of each state is kept in ``widths`` so read-out can drop the padding again.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from koopnet._checks import as_tensor, check_finite, check_int
from koopnet.models import model_device
from koopnet.scaling import ScaledMLP

PAD_VALUE = -1.0


@dataclass
class Trajectories:
    """Shape: states [B, T, W]; ``widths[t]`` is the unpadded width of state t."""

    states: torch.Tensor
    widths: list[int]
    pad_value: float = PAD_VALUE

    @property
    def n_states(self) -> int:
        return self.states.shape[1]

    def __len__(self) -> int:
        return self.states.shape[0]

    def subset(self, index) -> Trajectories:
        return Trajectories(self.states[index], self.widths, self.pad_value)

    def concatenated(self) -> torch.Tensor:
        """All trajectories end to end as one series, the paper's protocol. Shape: [1, B*T, W]."""
        return self.states.reshape(1, -1, self.states.shape[2])  # [1, B*T, W]


def pad_states(states: list[torch.Tensor], pad_value: float = PAD_VALUE) -> torch.Tensor:
    """Stack states of possibly different widths. Shape: T x [B, w_t] -> [B, T, max w_t]."""
    width = max(s.shape[1] for s in states)
    return torch.stack([nn.functional.pad(s, (0, width - s.shape[1]), value=pad_value)
                        for s in states], dim=1)  # [B, T, W]


@torch.no_grad()
def collect_trajectories(scaled: ScaledMLP, X: torch.Tensor, *, batch_size: int = 8192,
                         pad_value: float = PAD_VALUE) -> Trajectories:
    """Record every stage output of ``scaled`` with forward hooks, in eval mode, batched.

    ``X`` moves to the model's device, where the states stay.
    Shape: X [B, features] -> states [B, T = n_inserted + 2, W].
    """
    X = as_tensor(X, "X", ndim=2).to(model_device(scaled))
    batch_size = check_int(batch_size, "batch_size", low=1)
    expected = scaled.head[0].in_features
    if X.shape[1] != expected:
        raise ValueError(f"X has {X.shape[1]} features but the model expects {expected}.")
    scaled.eval()
    recorded: list[torch.Tensor] = []
    hooks = [stage.register_forward_hook(lambda _m, _i, out: recorded.append(out))
             for stage in scaled.stages]
    chunks = []
    try:
        for start in range(0, len(X), batch_size):
            recorded.clear()
            scaled(X[start:start + batch_size])
            chunks.append(pad_states(recorded, pad_value))
    finally:
        for hook in hooks:
            hook.remove()
    states = torch.cat(chunks)  # [B, T, W]
    check_finite(states, "trajectory states",
                 " Check the scaled model's training loss and the input scale.")
    widths = [s.shape[1] for s in recorded]
    return Trajectories(states, widths, pad_value)
