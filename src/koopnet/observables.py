"""Observables: lift trajectories of states into the coordinates where DMD fits a linear map.

``TimeDelay(n_delays=h)`` stacks each state with the h before it, newest first, as the paper
(via PyKoopman's ``TimeDelay``) does: g_t = [s_t, s_{t-1}, ..., s_{t-h}]. ``n_delays=0`` is the
identity (plain DMD). ``constant=True`` appends the constant observable 1, which lets the linear
operator carry an intercept (an affine map on the states).

EDMD dictionaries (Williams, Kevrekidis, Rowley 2015) extend the delay vector with nonlinear
features: ``Polynomial`` (monomials of degree 2..p, capped) and ``RandomFourier`` (random Fourier
features of an RBF kernel; Rahimi and Recht 2007). They keep TimeDelay's interface; with
``include_state=False`` the state is not in the dictionary and ``fit`` also fits a least-squares
read-out back to the neurons.
"""

from __future__ import annotations

import itertools
import math

import torch

from koopnet._checks import as_tensor, check_float, check_int, check_is_fitted


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
        self.n_features_in_, self.device_ = states.shape[2], states.device
        self.n_output_features_ = self.lifted_width(self.n_features_in_)
        return self

    def lifted_width(self, width: int) -> int:
        """Lifted features of states ``width`` wide, known before any fit (rank checks)."""
        return width * (check_int(self.n_delays, "n_delays", low=0) + 1) + int(self.constant)

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

        Shape: [n_out, D]; a selection, because the state is part of the lifted vector. On the
        device of the fitted states (``device_``), where the DMD fitted on them lives.
        """
        check_is_fitted(self, "n_features_in_")
        n_out = self.n_features_in_ if n_out is None else n_out
        return torch.eye(n_out, self.n_output_features_, dtype=torch.float64,
                         device=self.device_)

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


class _Dictionary:
    """EDMD dictionary on top of the delay vector: [delay vector, nonlinear features, (1)].

    Subclasses add ``_fit_features(delay)`` and ``_features(delay)`` (both on [n, W(h+1)] rows).
    With ``include_state=True`` (default) the newest state is part of the lifted vector, so the
    read-out is a selection as for :class:`TimeDelay`. With ``include_state=False`` the delay
    vector is left out and ``fit`` also fits the read-out: a least-squares map from the lifted
    training vectors to their newest states (``readout_``).
    """

    def __init__(self, n_delays: int = 0, *, constant: bool = False,
                 include_state: bool = True) -> None:
        self.n_delays = n_delays
        self.constant = constant
        self.include_state = include_state

    def fit(self, states: torch.Tensor):
        self.n_delays_ = check_int(self.n_delays, "n_delays", low=0)
        states = as_tensor(states, "states", ndim=3)
        self._delay = TimeDelay(self.n_delays_).fit(states)
        self.n_features_in_, self.device_ = states.shape[2], states.device
        delay = self._delay.transform(states)  # [B, T-h, W(h+1)]
        self._fit_features(delay.reshape(-1, delay.shape[2]))  # rows [n, W(h+1)]
        n_delay = delay.shape[2] if self.include_state else 0
        self.n_output_features_ = n_delay + self.n_extra_ + int(self.constant)
        if not self.include_state:
            self.fit_readout(self.transform(states), states[:, self.n_delays_:])
        return self

    def transform(self, states: torch.Tensor) -> torch.Tensor:
        check_is_fitted(self, "n_output_features_")
        delay = self._delay.transform(states)  # [B, T-h, W(h+1)]
        batch, n_rows, _ = delay.shape
        extra = self._features(delay.reshape(batch * n_rows, -1))  # [B*(T-h), n_extra]
        parts = [delay] if self.include_state else []
        parts.append(extra.reshape(batch, n_rows, -1).to(delay.dtype))
        if self.constant:
            parts.append(delay.new_ones(batch, n_rows, 1))
        return torch.cat(parts, dim=2)  # [B, T-h, D]

    def fit_transform(self, states: torch.Tensor) -> torch.Tensor:
        return self.fit(states).transform(states)

    def fit_readout(self, lifted: torch.Tensor, states: torch.Tensor):
        """Least-squares read-out from lifted vectors to the newest state (float64).

        Shape: lifted [B, T', D], states [B, T', W] (the newest state of each window).
        """
        L = as_tensor(lifted, "lifted", ndim=3, dtype=torch.float64).reshape(-1, lifted.shape[2])
        S = as_tensor(states, "states", ndim=3, dtype=torch.float64).reshape(-1, states.shape[2])
        if len(L) != len(S):
            raise ValueError(f"lifted has {len(L)} rows but states has {len(S)}; pass the newest "
                             "state of each lifted window (states[:, n_delays:]).")
        self.readout_ = torch.linalg.lstsq(L, S, driver="gelsd").solution.T  # [W, D]
        return self

    def readout(self, n_out: int | None = None) -> torch.Tensor:
        """Map from lifted coordinates to the newest state's first ``n_out`` neurons.

        A selection when the state is in the dictionary, else the fitted ``readout_``; on the
        device of the fitted states. Shape: [n_out, D].
        """
        check_is_fitted(self, "n_output_features_")
        n_out = self.n_features_in_ if n_out is None else n_out
        if self.include_state:
            return torch.eye(n_out, self.n_output_features_, dtype=torch.float64,
                             device=self.device_)
        return self.readout_[:n_out]

    def feature_names(self) -> list[str]:
        check_is_fitted(self, "n_output_features_")
        names = self._delay.feature_names() if self.include_state else []
        names = names + self._extra_names()
        return [*names, "1"] if self.constant else names


class Polynomial(_Dictionary):
    """Monomials of degree 2..``degree`` of the delay vector, capped at ``max_features``.

    Monomials are enumerated degree by degree in index order of the delay vector (newest state
    first), so the cap keeps the products of the most recent states.
    Shape: states [B, T, W] -> lifted [B, T - h, D], D = W(h+1) + n_extra_ (+1).

    >>> Polynomial(degree=2).fit_transform(torch.tensor([[[2., 3.]]]))[0, 0]
    tensor([2., 3., 4., 6., 9.])
    """

    def __init__(self, degree: int = 2, n_delays: int = 0, *, max_features: int | None = None,
                 constant: bool = False, include_state: bool = True) -> None:
        super().__init__(n_delays, constant=constant, include_state=include_state)
        self.degree = degree
        self.max_features = max_features

    def _fit_features(self, delay: torch.Tensor) -> None:
        degree = check_int(self.degree, "degree", low=2)
        cap = None if self.max_features is None else check_int(self.max_features,
                                                               "max_features", low=1)
        combos = itertools.chain.from_iterable(
            itertools.combinations_with_replacement(range(delay.shape[1]), k)
            for k in range(2, degree + 1))
        self.powers_ = list(itertools.islice(combos, cap))  # index tuples, one per monomial
        self.n_extra_ = len(self.powers_)

    def _features(self, delay: torch.Tensor) -> torch.Tensor:
        columns = []
        for k in range(2, self.degree + 1):
            index = torch.tensor([c for c in self.powers_ if len(c) == k], dtype=torch.long,
                                 device=delay.device)
            if len(index):
                columns.append(delay[:, index].prod(dim=2))  # [n, F_k]
        return torch.cat(columns, dim=1)  # [n, n_extra]

    def _extra_names(self) -> list[str]:
        names = self._delay.feature_names()
        return ["*".join(names[i] for i in combo) for combo in self.powers_]

    def __repr__(self) -> str:
        return (f"Polynomial(degree={self.degree}, n_delays={self.n_delays}, "
                f"max_features={self.max_features}, constant={self.constant}, "
                f"include_state={self.include_state})")


class RandomFourier(_Dictionary):
    """Random Fourier features of the standardised delay vector (an RBF kernel, Rahimi-Recht).

    phi(g) = sqrt(2) cos(z Omega / scale + b), z = (g - mean) / std, Omega ~ N(0, 1),
    b ~ U(0, 2 pi), drawn at fit from ``seed``. Shape: states [B, T, W] -> [B, T - h, D].

    >>> RandomFourier(n_features=5, seed=0).fit_transform(torch.randn(2, 4, 3)).shape
    torch.Size([2, 4, 8])
    """

    def __init__(self, n_features: int = 100, n_delays: int = 0, *, scale: float = 1.0,
                 seed: int = 0, constant: bool = False, include_state: bool = True) -> None:
        super().__init__(n_delays, constant=constant, include_state=include_state)
        self.n_features = n_features
        self.scale = scale
        self.seed = seed

    def _fit_features(self, delay: torch.Tensor) -> None:
        self.n_extra_ = check_int(self.n_features, "n_features", low=1)
        scale = check_float(self.scale, "scale", low=1e-12)
        delay = delay.to(torch.float64)
        self.mean_ = delay.mean(0)  # [W(h+1)]
        self.std_ = delay.std(0, correction=0)  # [W(h+1)]
        self.std_[self.std_ < 1e-8] = 1.0  # constant inputs (padding, dead units) stay unscaled
        # drawn on the CPU and moved, so the features are the same on every device
        generator = torch.Generator().manual_seed(check_int(self.seed, "seed"))
        frequencies = torch.randn(delay.shape[1], self.n_extra_, generator=generator,
                                  dtype=torch.float64, device="cpu")  # [W(h+1), F]
        phases = torch.rand(self.n_extra_, generator=generator, dtype=torch.float64,
                            device="cpu")  # [F]
        self.frequencies_ = frequencies.to(delay.device) / scale
        self.phases_ = 2 * math.pi * phases.to(delay.device)

    def _features(self, delay: torch.Tensor) -> torch.Tensor:
        z = (delay.to(torch.float64) - self.mean_) / self.std_  # [n, W(h+1)]
        return math.sqrt(2.0) * torch.cos(z @ self.frequencies_ + self.phases_)  # [n, F]

    def _extra_names(self) -> list[str]:
        return [f"rff{i}" for i in range(self.n_extra_)]

    def __repr__(self) -> str:
        return (f"RandomFourier(n_features={self.n_features}, n_delays={self.n_delays}, "
                f"scale={self.scale}, seed={self.seed}, constant={self.constant}, "
                f"include_state={self.include_state})")
