"""Streaming DMD statistics for every number of delays from one pass over the trajectories.

With the stacked trajectory vector v = [s_0, ..., s_{T-1}, 1] (length T*W + 1), the running sum
M = sum_b v v^T holds every inner product between any two states of the same sample. A lifted
delay vector g_t = [s_t, ..., s_{t-h}] (and the constant) is a fixed selection of v's blocks, so
for each h the DMD Gram matrices  X^T X = sum_t sum_b g_t g_t^T  and  Y^T X  are sums of
sub-blocks of M over t = h..T-2. One pass therefore serves every h <= T-2, every rank and every
Tikhonov value (they all work from the same X^T X); memory is O((T*W)^2) whatever the number of
trajectories. Only the within-trajectory windows are covered: the paper's concatenated series
couples neighbouring samples, which M does not record.
"""

from __future__ import annotations

import torch

from koopnet._checks import as_tensor, check_int
from koopnet.dmd import PairStatistics


class TrajectoryMoments:
    """Running second moments of whole trajectories. Shape: update(states [B, T, W])."""

    def __init__(self, n_states: int, width: int, dtype: torch.dtype = torch.float64) -> None:
        self.n_states, self.width = n_states, width
        size = n_states * width + 1
        self.moments = torch.zeros(size, size, dtype=dtype)
        self.n_trajectories = 0

    def update(self, states: torch.Tensor) -> TrajectoryMoments:
        states = as_tensor(states, "states", ndim=3)
        if tuple(states.shape[1:]) != (self.n_states, self.width):
            raise ValueError(f"states have shape [B, {states.shape[1]}, {states.shape[2]}]; "
                             f"expected [B, {self.n_states}, {self.width}].")
        flat = states.reshape(len(states), -1).to(self.moments.dtype)  # [B, T*W]
        stacked = torch.cat([flat, flat.new_ones(len(flat), 1)], dim=1)  # [B, T*W+1]
        self.moments += stacked.T @ stacked
        self.n_trajectories += len(states)
        return self

    def __iadd__(self, other: TrajectoryMoments) -> TrajectoryMoments:
        self.moments += other.moments
        self.n_trajectories += other.n_trajectories
        return self

    def _window(self, t: int, n_delays: int, constant: bool) -> torch.Tensor:
        """Indices into v of g_t = [s_t, s_{t-1}, ..., s_{t-h}] (+ the constant)."""
        W = self.width
        blocks = [torch.arange(j * W, (j + 1) * W) for j in range(t, t - n_delays - 1, -1)]
        if constant:
            blocks.append(torch.tensor([self.n_states * W]))
        return torch.cat(blocks)

    def pair_statistics(self, n_delays: int, *, constant: bool = False) -> PairStatistics:
        """Gram statistics of the within-trajectory pairs of ``TimeDelay(n_delays, constant)``."""
        h = check_int(n_delays, "n_delays", low=0)
        if h > self.n_states - 2:
            raise ValueError(f"n_delays={h} needs trajectories of at least {h + 2} states; got "
                             f"T={self.n_states}. Lower n_delays or insert more blocks.")
        if self.n_trajectories == 0:
            raise ValueError("no trajectories were added; call update(states) first.")
        stats = None
        for t in range(h, self.n_states - 1):
            x, y = self._window(t, h, constant), self._window(t + 1, h, constant)
            M = self.moments
            part = PairStatistics(M[x][:, x], M[y][:, x], M[y][:, y], self.n_trajectories)
            stats = part if stats is None else stats + part
        return stats
