"""Observables: lift trajectories of states into the coordinates where DMD fits a linear map.

``TimeDelay(n_delays=h)`` stacks each state with the h before it, newest first, as the paper
(via PyKoopman's ``TimeDelay``) does: g_t = [s_t, s_{t-1}, ..., s_{t-h}]. ``n_delays=0`` is the
identity (plain DMD). ``constant=True`` appends the constant observable 1, which lets the linear
operator carry an intercept (an affine map on the states).
"""

from __future__ import annotations

import torch

from koopnet._checks import as_tensor, check_int, check_is_fitted


class TimeDelay:
    """Time-delay (Hankel) lifting, batched over trajectories.

    Shape: states [B, T, W] -> lifted [B, T - h, D] with D = W * (h + 1) (+1 with ``constant``).
    Windows never cross from one trajectory into the next; to reproduce the paper's concatenated
    series, pass ``Trajectories.concatenated()`` ([1, B*T, W]).

    >>> TimeDelay(n_delays=1).fit_transform(torch.arange(6.).view(1, 3, 2))[0, 0]
    tensor([2., 3., 0., 1.])
    """

    def __init__(self, n_delays: int = 0, *, constant: bool = False) -> None:
        self.n_delays = n_delays
        self.constant = constant

    def fit(self, states: torch.Tensor) -> TimeDelay:
        self.n_delays_ = check_int(self.n_delays, "n_delays", low=0)
        states = as_tensor(states, "states", ndim=3)
        self.n_features_in_ = states.shape[2]
        self.n_output_features_ = self.n_features_in_ * (self.n_delays_ + 1) + int(self.constant)
        return self

    def transform(self, states: torch.Tensor) -> torch.Tensor:
        check_is_fitted(self, "n_features_in_")
        states = as_tensor(states, "states", ndim=3)
        batch, n_states, width = states.shape
        h = self.n_delays_
        if width != self.n_features_in_:
            raise ValueError(f"states have width {width}; this TimeDelay was fitted on width "
                             f"{self.n_features_in_}.")
        if n_states < h + 1:
            raise ValueError(f"n_delays={h} needs trajectories of at least {h + 1} states; "
                             f"got T={n_states}. Lower n_delays or insert more blocks.")
        windows = states.unfold(1, h + 1, 1)  # [B, T-h, W, h+1], oldest first
        lifted = windows.flip(-1).transpose(2, 3)  # [B, T-h, h+1, W], newest first
        lifted = lifted.reshape(batch, n_states - h, width * (h + 1))  # [B, T-h, D]
        if self.constant:
            ones = lifted.new_ones(batch, n_states - h, 1)
            lifted = torch.cat([lifted, ones], dim=2)  # [B, T-h, D+1]
        return lifted

    def fit_transform(self, states: torch.Tensor) -> torch.Tensor:
        return self.fit(states).transform(states)

    def readout(self, n_out: int | None = None) -> torch.Tensor:
        """Matrix that maps lifted coordinates back to the newest state's first ``n_out`` neurons.

        Shape: [n_out, D]; a selection, because the state is part of the lifted vector.
        """
        check_is_fitted(self, "n_features_in_")
        n_out = self.n_features_in_ if n_out is None else n_out
        return torch.eye(n_out, self.n_output_features_, dtype=torch.float64)

    def feature_names(self) -> list[str]:
        """Labels such as ``x3(t-2)`` for each lifted coordinate."""
        check_is_fitted(self, "n_features_in_")
        names = [f"x{i}(t)" if lag == 0 else f"x{i}(t-{lag})"
                 for lag in range(self.n_delays_ + 1) for i in range(self.n_features_in_)]
        return [*names, "1"] if self.constant else names

    def __repr__(self) -> str:
        return f"TimeDelay(n_delays={self.n_delays}, constant={self.constant})"


def snapshot_pairs(lifted: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Consecutive pairs (g_t, g_{t+1}) inside each trajectory, stacked as rows.

    Shape: lifted [B, T', D] -> X, Y each [B * (T' - 1), D].
    """
    if lifted.shape[1] < 2:
        raise ValueError(f"lifted trajectories have {lifted.shape[1]} snapshot(s); DMD needs at "
                         "least 2 per trajectory. Lower n_delays or insert more blocks.")
    D = lifted.shape[2]
    return lifted[:, :-1].reshape(-1, D), lifted[:, 1:].reshape(-1, D)  # [B*(T'-1), D] each
