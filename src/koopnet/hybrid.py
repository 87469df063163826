"""The Koopman hybrid: a network whose tail of the trajectory is one linear operator.

It runs the scaled network up to state s_h (the head and the first h inserted blocks), lifts the
states s_0..s_h into delay coordinates, advances them m = T-1-h steps with the fitted operator,
reads the last state back out as neurons, drops the padding and runs the rest of the original
network. Because every step is linear, the m steps collapse into one matrix
``linear_map = R V A~^m V^T`` [w', D] (R the read-out), so inference is a single GEMM.
As in the paper, the read-out is the real, un-activated predicted state.

The map is fitted and stored in float64 but applied in the network's own precision (float32
for a float32 network), as an ``nn.Linear`` would be: a float64 GEMM plus the casts made the
hybrid 2-3x slower for a rounding difference far below float32 activations' own. Set
``compute_dtype=torch.float64`` to apply it in double precision.
"""

from __future__ import annotations

import torch
from torch import nn

from koopnet._checks import check_int, check_width_preserving
from koopnet.dmd import DMD
from koopnet.observables import TimeDelay
from koopnet.scaling import ScaledMLP
from koopnet.trajectories import PAD_VALUE


class KoopmanHybrid(nn.Module):
    """Scaled network with steps h+1..T-1 of its trajectory replaced by a fitted linear operator.

    Shape: x [B, features] -> logits [B, classes]. Buffers: ``basis`` [D, R], ``operator``
    [R, R], ``readout`` [w', D] and ``linear_map`` [w', D] (all float64).
    ``compute_dtype``: precision of the map's GEMM; None = the states' dtype.
    """

    def __init__(self, scaled: ScaledMLP, observable: TimeDelay, dmd: DMD, *,
                 pad_value: float = PAD_VALUE, n_blocks: int | None = None,
                 compute_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.compute_dtype = compute_dtype
        h = check_int(observable.n_delays, "n_delays", low=0)
        check_width_preserving(scaled.inserts, scaled.width)
        # n_blocks: inserted blocks run before lifting (default h); more than h lets a
        # dictionary with fewer delays (e.g. plain DMD) start its roll-out later.
        blocks = h if n_blocks is None else check_int(n_blocks, "n_blocks", low=h)
        if blocks > scaled.n_states - 2:
            raise ValueError(f"n_delays={blocks} leaves no step to predict: the trajectory has "
                             f"T={scaled.n_states} states, so n_delays must be <= "
                             f"{scaled.n_states - 2}.")
        self.head, self.prefix, self.tail = scaled.head, scaled.inserts[:blocks], scaled.tail
        self.width, self.out_width = scaled.width, scaled.out_width
        self.observable, self.pad_value = observable, pad_value
        self.layer, self.n_delays, self.n_blocks = scaled.layer, h, blocks
        self.linear_steps = scaled.n_states - 1 - blocks
        readout = observable.readout(self.out_width).to(dmd.dtype)
        self.register_buffer("basis", dmd.basis_)
        self.register_buffer("operator", dmd.operator_)
        self.register_buffer("readout", readout)
        self.register_buffer("linear_map", dmd.transition(self.linear_steps, readout))

    @classmethod
    def from_buffers(cls, head: nn.Sequential, prefix: nn.Sequential, tail: nn.Sequential,
                     observable: TimeDelay, buffers: dict[str, torch.Tensor], *, layer: int,
                     width: int, out_width: int, linear_steps: int,
                     pad_value: float = PAD_VALUE) -> KoopmanHybrid:
        """Rebuild a hybrid from saved parts, without a DMD (see ``koopnet.api.load_hybrid``).

        ``buffers`` holds ``basis``, ``operator``, ``readout`` and ``linear_map``; ``observable``
        is a fitted TimeDelay.
        """
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.compute_dtype = None
        self.head, self.prefix, self.tail = head, prefix, tail
        self.width, self.out_width = width, out_width
        self.observable, self.pad_value = observable, pad_value
        self.layer, self.n_delays, self.n_blocks = layer, observable.n_delays_, len(prefix)
        self.linear_steps = linear_steps
        for name in ("basis", "operator", "readout", "linear_map"):
            self.register_buffer(name, buffers[name])
        return self

    @property
    def nonlinear_blocks(self) -> int:
        """Inserted nonlinear blocks still run (the first h of the N)."""
        return self.n_blocks

    @property
    def n_replacement_parameters(self) -> int:
        """Entries of the linear replacement as applied: the [w', D] map."""
        return self.linear_map.numel()

    def prefix_states(self, x: torch.Tensor) -> torch.Tensor:
        """States s_0..s_h of the scaled network. Shape: [B, features] -> [B, h+1, W_padded]."""
        state = self.head(x)
        states = [state]
        for block in self.prefix:
            state = block(state)
            states.append(state)
        states = torch.stack(states, dim=1)  # [B, h+1, W]
        pad = self.observable.n_features_in_ - states.shape[2]
        return nn.functional.pad(states, (0, pad), value=self.pad_value) if pad else states

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_states(self.prefix_states(x))

    def forward_states(self, states: torch.Tensor) -> torch.Tensor:
        """Logits from already computed states s_0..s_k (k >= h), e.g. a collected trajectory.

        Lets a sweep over h, rank and regularisation reuse one forward pass of the network.
        Shape: states [B, k+1, W] -> logits [B, classes].
        """
        states = states[:, self.n_blocks - self.n_delays: self.n_blocks + 1]  # [B, h+1, W]
        return self.forward_lifted(self.observable.transform(states)[:, -1])  # lifted [B, D]

    def forward_lifted(self, lifted: torch.Tensor) -> torch.Tensor:
        """Logits from the lifted state g_h, e.g. lifted once and scored by many fits.

        Shape: lifted [B, D] -> logits [B, classes].
        """
        dtype = self.compute_dtype or lifted.dtype
        predicted = lifted.to(dtype) @ self.linear_map.to(dtype).T  # [B, w']
        return self.tail(predicted.to(lifted.dtype))

    def extra_repr(self) -> str:
        return (f"layer={self.layer}, n_delays={self.n_delays}, linear_steps={self.linear_steps}, "
                f"rank={self.operator.shape[0]}")
