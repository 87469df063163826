"""Exact dynamic mode decomposition (Tu et al. 2014; Schmid 2010) in torch.

Rows are snapshots. Given pairs X, Y [n, D] (g_t and g_{t+1}), the truncated SVD X = U S V^T
gives the reduced operator  A~ = V^T Y^T U S^-1  [R, R], so that g_{t+1} ~ V A~ V^T g_t. Its
eigenvalues are the DMD eigenvalues, and the exact DMD modes are Y^T U S^-1 Phi.

Two routes lead to the same operator:
- ``fit_pairs``: in-memory SVD of X (best conditioned; used to check against PyDMD);
- ``fit_statistics``: from the Gram matrices X^T X and Y^T X only, since X^T X = V S^2 V^T and
  Y^T U = Y^T X V S^-1. Memory is O(D^2) whatever n is, so statistics can be streamed
  (``PairStatistics`` adds up over batches and processes). It squares the condition number,
  which is why everything runs in float64 by default.

Rank truncation: ``rank=None`` keeps every singular value above the numerical noise floor, an
int keeps that many, a float in (0, 1) keeps that fraction of the energy (sum of S^2), and 0
uses the optimal hard threshold of Gavish and Donoho 2014. ``tikhonov`` replaces S^-1 by
S / (S^2 + lambda) with lambda = tikhonov * S_max^2 (scale free).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch

from koopnet._checks import (
    as_tensor,
    check_finite,
    check_float,
    check_int,
    check_is_fitted,
    check_rank,
    check_rank_limit,
)
from koopnet.observables import snapshot_pairs

__all__ = ["DMD", "PairStatistics", "resolve_rank"]


@dataclass
class PairStatistics:
    """Sufficient statistics of snapshot pairs: sums of x x^T, y x^T and y y^T (float64).

    Shape: xx, yx, yy [D, D]. Statistics of disjoint batches add up with ``+``.
    """

    xx: torch.Tensor
    yx: torch.Tensor
    yy: torch.Tensor
    n_pairs: int
    _spectrum: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)

    @classmethod
    def from_pairs(cls, X: torch.Tensor, Y: torch.Tensor,
                   dtype: torch.dtype = torch.float64) -> PairStatistics:
        X, Y = X.to(dtype), Y.to(dtype)
        return cls(X.T @ X, Y.T @ X, Y.T @ Y, X.shape[0])

    def __add__(self, other: PairStatistics) -> PairStatistics:
        return PairStatistics(self.xx + other.xx, self.yx + other.yx, self.yy + other.yy,
                              self.n_pairs + other.n_pairs)

    @property
    def noise_floor(self) -> float:
        """Relative resolution of singular values from these Grams: S^2 is exact to
        eps * S_max^2, so S is resolvable only down to sqrt(D * eps) * S_max."""
        return (self.xx.shape[0] * torch.finfo(self.xx.dtype).eps) ** 0.5

    def spectrum(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Singular values of X (descending) and right singular vectors [D, D], cached."""
        if self._spectrum is None:
            evals, evecs = torch.linalg.eigh(self.xx)
            self._spectrum = (evals.flip(0).clamp_min(0).sqrt(), evecs.flip(1))
        return self._spectrum


def resolve_rank(rank, singular_values: torch.Tensor, shape: tuple[int, int],
                 noise_floor: float) -> int:
    """Turn the ``rank`` parameter into a number of kept singular values (see module docs)."""
    n_rows, n_cols = shape
    s = singular_values
    usable = int((s > noise_floor * s[0]).sum()) if s[0] > 0 else 0
    if usable == 0:
        raise ValueError("the snapshot matrix is zero (all singular values vanish); "
                         "check that the states are not all dead or constant.")
    rank = check_rank(rank)
    check_rank_limit(rank, n_cols, n_rows)
    if rank is None:
        return usable
    if rank == 0:  # Gavish and Donoho's omega(beta) for an unknown noise level
        beta = min(n_rows, n_cols) / max(n_rows, n_cols)
        omega = 0.56 * beta**3 - 0.95 * beta**2 + 1.82 * beta + 1.43
        threshold = omega * s[: min(n_rows, n_cols)].median()
        return max(1, min(usable, int((s > threshold).sum())))
    if isinstance(rank, int):
        return min(rank, usable)
    energy = (s**2).cumsum(0) / (s**2).sum()
    return min(usable, int((energy < rank).sum()) + 1)


class DMD:
    """Exact DMD with rank truncation and Tikhonov damping.

    Parameters
    ----------
    rank : None, int or float
        None = full numerical rank; int >= 1 = that many modes; float in (0, 1) = energy
        fraction; 0 = Gavish-Donoho optimal hard threshold.
    tikhonov : float
        Relative Tikhonov parameter (lambda = tikhonov * S_max^2); damps small singular values
        that make multi-step roll-outs blow up.
    dtype : torch.dtype
        Precision of the fit; float64 because the Gram route squares the condition number.
    exact_rollout : bool
        False (the paper's EDMD): m steps are V A~^m V^T, so predictions stay in the span of X.
        True: m steps of the exact-DMD operator K = Y^T U S^-1 V^T, i.e. K^m = P A~^(m-1) V^T
        with P = Y^T U S^-1; the last step can leave span(X). Needed when the predicted state
        never appears as a newest state in X (within-trajectory pairs: the replaced layer's
        output s_{T-1} is only ever a target).

    Attributes (after fit): ``basis_`` [D, R], ``operator_`` [R, R], ``singular_values_`` [R],
    ``eigenvalues_`` [R] complex, ``modes_`` [D, R] complex, ``rank_``, ``n_features_in_``,
    ``n_pairs_``.

    >>> X = torch.randn(50, 3, dtype=torch.float64)
    >>> dmd = DMD().fit_pairs(X, X @ torch.diag(torch.tensor([0.5, 0.9, -0.3])).double())
    >>> sorted(dmd.eigenvalues_.real.round(decimals=6).tolist())
    [-0.3, 0.5, 0.9]
    """

    def __init__(self, rank=None, *, tikhonov: float = 0.0,
                 dtype: torch.dtype = torch.float64, exact_rollout: bool = False) -> None:
        self.rank = rank
        self.tikhonov = tikhonov
        self.dtype = dtype
        self.exact_rollout = exact_rollout

    def fit(self, lifted: torch.Tensor) -> DMD:
        """Fit on pairs taken within each trajectory. Shape: lifted [B, T', D]."""
        lifted = as_tensor(lifted, "lifted", ndim=3)
        return self.fit_pairs(*snapshot_pairs(lifted))

    def fit_pairs(self, X: torch.Tensor, Y: torch.Tensor) -> DMD:
        """Fit from explicit pairs by SVD of X. Shape: X, Y [n, D]."""
        X = as_tensor(X, "X", ndim=2, dtype=self.dtype)
        Y = as_tensor(Y, "Y", ndim=2, dtype=self.dtype)
        if X.shape != Y.shape:
            raise ValueError(f"X and Y must have the same shape; got {tuple(X.shape)} and "
                             f"{tuple(Y.shape)}.")
        U, s, Vh = torch.linalg.svd(X, full_matrices=False)
        eps = torch.finfo(self.dtype).eps
        r = self._rank(s, X.shape, noise_floor=max(X.shape) * eps)
        self._finish(Vh[:r].T, s[:r], Y.T @ U[:, :r], s[0], X.shape)
        return self

    def fit_statistics(self, stats: PairStatistics) -> DMD:
        """Fit from Gram statistics (streamed or all-reduced). Equal to ``fit_pairs`` in theory."""
        if stats.n_pairs < 1:
            raise ValueError("stats holds no snapshot pairs; feed at least one batch first.")
        check_finite(stats.xx, "the Gram matrix X^T X",
                     " The states overflow float64 when squared; rescale them.")
        s, V = stats.spectrum()
        shape = (stats.n_pairs, stats.xx.shape[0])
        r = self._rank(s, shape, noise_floor=stats.noise_floor)
        V = V[:, :r].to(self.dtype)
        self._finish(V, s[:r].to(self.dtype), stats.yx.to(self.dtype) @ V / s[:r], s[0], shape)
        return self

    def _rank(self, s: torch.Tensor, shape: tuple[int, int], noise_floor: float) -> int:
        self.tikhonov_ = check_float(self.tikhonov, "tikhonov", low=0.0)
        return resolve_rank(self.rank, s, shape, noise_floor)

    def _finish(self, V, s, YtU, s_max, shape) -> None:
        """Shared tail of both routes. Shape: V [D, R], s [R], YtU [D, R] = Y^T U."""
        unit = s / s_max  # scale free, so data near the float range cannot overflow S^2
        inv = unit / (unit**2 + self.tikhonov_) / s_max  # damped S^-1, [R]
        projected = YtU * inv  # Y^T U S^-1, [D, R]
        operator = V.T @ projected  # [R, R]
        check_finite(operator, "the DMD operator",
                     " The data overflows float64 arithmetic; rescale the states.")
        self.restore(basis=V, singular_values=s, projected=projected, operator=operator,
                     tikhonov_=self.tikhonov_, n_pairs=shape[0])

    def restore(self, *, basis: torch.Tensor, singular_values: torch.Tensor,
                projected: torch.Tensor, operator: torch.Tensor, tikhonov_: float,
                n_pairs: int) -> DMD:
        """Set the fitted state from its tensors (a fit's end, or a saved DMD loaded without
        its data); returns self. Shape: basis [D, R], singular_values [R], projected [D, R]
        (Y^T U S^-1), operator [R, R]."""
        D, R = basis.shape
        if singular_values.shape != (R,) or projected.shape != (D, R) or \
                operator.shape != (R, R):
            raise ValueError(f"DMD tensors of shapes basis {list(basis.shape)}, singular_values "
                             f"{list(singular_values.shape)}, projected {list(projected.shape)}"
                             f", operator {list(operator.shape)} do not fit together.")
        self.basis_, self.singular_values_, self.operator_ = basis, singular_values, operator
        self._projected, self._eig, self.tikhonov_ = projected, None, float(tikhonov_)
        self.rank_, self.n_pairs_, self.n_features_in_ = R, int(n_pairs), D
        return self

    def edited(self, operator: torch.Tensor, step: torch.Tensor | None = None) -> DMD:
        """A copy holding an edited reduced operator (see :mod:`koopnet.editing`); self is
        untouched. With ``step`` E, the edit A' = A E also carries the exact modes' projection
        (Y^T U S^-1 E) so ``modes_`` stay those of A'. Shape: operator [R, R], step [R, R]."""
        check_is_fitted(self, "operator_")
        projected = self._projected if step is None else self._projected @ step.to(self.dtype)
        return copy.copy(self).restore(
            basis=self.basis_, singular_values=self.singular_values_, projected=projected,
            operator=operator.to(self.dtype), tikhonov_=self.tikhonov_, n_pairs=self.n_pairs_)

    # The eigendecomposition is computed on first access and cached: a general eig of a
    # 2817 x 2817 operator takes ~35 s on 2 cores, while a hyper-parameter sweep only needs
    # ``operator_`` (roll-outs and hybrids never use the eigenvectors).
    def _eigendecomposition(self) -> tuple[torch.Tensor, torch.Tensor]:
        check_is_fitted(self, "operator_")
        if self._eig is None:
            eigenvalues, eigenvectors = torch.linalg.eig(self.operator_)
            modes = self._projected.to(eigenvectors.dtype) @ eigenvectors  # exact modes, [D, R]
            self._eig = (eigenvalues, modes)
        return self._eig

    @property
    def eigenvalues_(self) -> torch.Tensor:
        """DMD eigenvalues, the eigenvalues of ``operator_``. Shape: [R] complex."""
        return self._eigendecomposition()[0]

    @property
    def modes_(self) -> torch.Tensor:
        """Exact DMD modes Y^T U S^-1 Phi. Shape: [D, R] complex."""
        return self._eigendecomposition()[1]

    def transition(self, n_steps: int, readout: torch.Tensor | None = None) -> torch.Tensor:
        """The linear map of ``n_steps`` steps in lifted coordinates, optionally read out.

        Projected (the paper's EDMD): V A~^m V^T; exact: P A~^(m-1) V^T. With ``readout``
        [k, D] the product readout @ map is formed from the left, one [k, R] @ [R, R] product
        per step, so a hybrid never builds the [D, D] matrix (seconds instead of minutes at
        D ~ 3000). The map is on the device of the fit (a readout elsewhere is moved there).
        Shape: [D, D], or [k, D] with a readout.
        """
        check_is_fitted(self, "operator_")
        n_steps = check_int(n_steps, "n_steps", low=0)
        device = self.basis_.device
        left = (torch.eye(self.n_features_in_, dtype=self.dtype, device=device)
                if readout is None else readout.to(device, self.dtype))
        if n_steps == 0:
            return left
        left = left @ (self._projected if self.exact_rollout else self.basis_)  # [k, R]
        for _ in range(n_steps - 1 if self.exact_rollout else n_steps):
            left = left @ self.operator_  # [k, R]
        return left @ self.basis_.T  # [k, D]

    def transitions(self, n_steps: int, readout: torch.Tensor | None = None) -> torch.Tensor:
        """``transition(m, readout)`` for every m = 1..n_steps from one running product, for a
        roll-out's every state: one [k, R] @ [R, R] product per step instead of m at step m.
        Shape: [n_steps, D, D], or [n_steps, k, D] with a readout [k, D]; entry m-1 is step m.
        """
        check_is_fitted(self, "operator_")
        n_steps = check_int(n_steps, "n_steps", low=0)
        left = self.transition(0, readout)  # [k, D] on the fit's device and dtype
        maps = left.new_empty(n_steps, *left.shape)  # [n_steps, k, D]
        left = left @ (self._projected if self.exact_rollout else self.basis_)  # [k, R]
        for m in range(n_steps):
            if m > 0 or not self.exact_rollout:  # exact: P A~^(m-1) V^T; projected: V A~^m V^T
                left = left @ self.operator_  # [k, R]
            maps[m] = left @ self.basis_.T
        return maps

    def predict(self, lifted: torch.Tensor, n_steps: int = 1) -> torch.Tensor:
        """Advance lifted states ``n_steps`` steps, computed on the device of the fit and
        returned on the device of ``lifted``. Shape: [n, D] -> [n, D] (real)."""
        check_is_fitted(self, "operator_")
        n_steps = check_int(n_steps, "n_steps", low=0)
        lifted = as_tensor(lifted, "lifted", ndim=2, dtype=self.dtype)
        return self._predict(lifted.to(self.basis_.device), n_steps).to(lifted.device)

    def _predict(self, lifted: torch.Tensor, n_steps: int) -> torch.Tensor:
        if lifted.shape[1] != self.n_features_in_:
            raise ValueError(f"lifted has {lifted.shape[1]} features; this DMD was fitted on "
                             f"{self.n_features_in_}.")
        if self.exact_rollout:
            return lifted @ self.transition(n_steps).T  # [n, D]
        z = lifted @ self.basis_  # [n, R]
        z = z @ torch.linalg.matrix_power(self.operator_, n_steps).T  # [n, R]
        return z @ self.basis_.T  # [n, D]

    def to(self, device: torch.device | str) -> DMD:
        """Move the fitted tensors (and cached eigendecomposition) to ``device``, in place as
        ``nn.Module.to`` does; returns self."""
        check_is_fitted(self, "operator_")
        for name in ("basis_", "singular_values_", "operator_", "_projected"):
            setattr(self, name, getattr(self, name).to(device))
        if self._eig is not None:
            self._eig = tuple(t.to(device) for t in self._eig)
        return self

    def __repr__(self) -> str:
        extra = ", exact_rollout=True" if self.exact_rollout else ""
        return f"DMD(rank={self.rank!r}, tikhonov={self.tikhonov!r}{extra})"
