"""Spectral editing of hybrids: remove or scale Koopman modes, project out a subspace, and
attribute each class's logits to the modes that carry them (forgetting a class in closed form
is :mod:`koopnet.forgetting`).

The fitted operator is A = Phi Lambda Phi^-1 (reduced coordinates, ``basis`` V [D, R]). An edit
multiplies chosen eigenvalues by real factors c_i (c = 0 removes the mode), complex-conjugate
pairs together so the operator stays real. With E = I + Phi_S diag(c - 1) Phi^-1_S (it commutes
with A) the m-step map becomes linear_map' = linear_map V E^m V^T, exactly: ``linear_map`` =
readout L A^k V^T (L = V for the projected roll-out, the exact-DMD P for the exact one) ends in
V^T and V^T V = I. So an edit needs only the stored buffers, works on a loaded hybrid, and
equals re-rolling the edited operator (A E; for the exact roll-out also P E, i.e. K' = P E V^T).
The ``operator`` buffer becomes A E and a DMD kept on the hybrid is edited alike.

A subspace edit removes directions Q [D, k] of the lifted state before the roll-out
(linear_map' = linear_map V Pi V^T, Pi = I - Q_r Q_r^T, Q_r = orthonormalised V^T Q).
Everything works for KoopmanHybrid and DepthHybrid; the input is never modified (results are
deep copies). The algebra runs on the CPU in float64 (mode indices in LAPACK's order on any
device), the network where the hybrid lives; edited buffers go back to the hybrid's device.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping, Sequence

import torch

from koopnet._checks import as_tensor, check_float, check_int
from koopnet.dmd import PairStatistics
from koopnet.hybrid import KoopmanHybrid

__all__ = ["abs_below", "edit_modes", "mode_attribution", "mode_groups", "near_frequency",
           "resdmd_residuals", "spectrum"]

# relative size of an imaginary part below which an eigenvalue counts as real, and of the
# imaginary residue of a rebuilt operator above which an edit is refused
_REAL_TOL = 1e-9
_RESIDUE_TOL = 1e-8
_F64 = {"dtype": torch.float64, "device": "cpu"}  # where the algebra runs (see the module docs)


def _is_depth(hybrid) -> bool:
    """A :class:`koopnet.depth.DepthHybrid` (recognised by its parts: depth sits a floor up)."""
    return type(hybrid).__name__ == "DepthHybrid" and hasattr(hybrid, "_predict")


def _check_hybrid(hybrid) -> None:
    if not (isinstance(hybrid, KoopmanHybrid) or _is_depth(hybrid)):
        raise TypeError(f"hybrid must be a koopnet KoopmanHybrid or DepthHybrid; got "
                        f"{type(hybrid).__name__}. Fit one with koopnet.linearize or "
                        "koopnet.linearize_depth.")


def _buffers(hybrid) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """(basis V [D, R], operator A [R, R], linear_map [w', D], linear steps m), float64."""
    _check_hybrid(hybrid)
    if isinstance(hybrid, KoopmanHybrid):
        basis, operator = hybrid.basis, hybrid.operator
    else:
        basis, operator = hybrid.dmd_.basis_, hybrid.dmd_.operator_
    return (basis.detach().to(**_F64), operator.detach().to(**_F64),
            hybrid.linear_map.detach().to(**_F64), int(hybrid.linear_steps))


def _with_buffers(hybrid, operator: torch.Tensor, linear_map: torch.Tensor,
                  step: torch.Tensor | None):
    """A deep copy of ``hybrid`` holding the edited operator and map. ``step`` [R, R] is the
    one-step edit E (A' = A E), applied to a kept DMD as well; None when the edit is not
    spectral (the DMD is then dropped, since it would no longer match the map)."""
    new = copy.deepcopy(hybrid)
    device = hybrid.linear_map.device
    if isinstance(new, KoopmanHybrid):
        new.operator = operator.to(device=new.operator.device, dtype=new.operator.dtype)
        new.linear_map = linear_map.to(device=device, dtype=new.linear_map.dtype)
    else:
        predict = new._predict
        predict.linear_map = linear_map.to(device=device, dtype=predict.linear_map.dtype)
    if new.dmd_ is not None and step is None and isinstance(new, KoopmanHybrid):
        new.dmd_ = None
    elif new.dmd_ is not None:  # a DepthHybrid needs its DMD (rank_) even after other edits
        new.dmd_ = new.dmd_.edited(operator, step)
    return new


def spectrum(hybrid) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eigenvalues, right and left eigenvectors of the hybrid's reduced operator A.

    Shape: eigenvalues [R] complex, Phi [R, R] (columns), Psi = Phi^-1 [R, R] (rows). The order
    is LAPACK's (``torch.linalg.eig``), the order every index in this module refers to.
    """
    _, operator, _, _ = _buffers(hybrid)
    eigenvalues, right = torch.linalg.eig(operator)
    left = torch.linalg.inv(right)
    rebuilt = (right * eigenvalues) @ left
    scale = max(float(operator.abs().max()), 1.0)
    error = float((rebuilt - operator.to(rebuilt.dtype)).abs().max()) / scale
    if not error < 1e-6:
        raise ValueError(f"the operator is not numerically diagonalisable (Phi Lambda Phi^-1 "
                         f"differs from A by {error:.2g} relative); edit a hybrid fitted with a "
                         "lower rank or some Tikhonov damping.")
    return eigenvalues, right, left


def mode_groups(eigenvalues: torch.Tensor) -> list[list[int]]:
    """Indices grouped as real modes [i] and complex-conjugate pairs [i, j] (i < j)."""
    lam = eigenvalues.to(torch.complex128)
    scale = max(float(lam.abs().max()), 1e-300) if len(lam) else 1.0
    free, groups = set(range(len(lam))), []
    for i in range(len(lam)):
        if i not in free:
            continue
        free.discard(i)
        if abs(float(lam[i].imag)) <= _REAL_TOL * scale or not free:
            groups.append([i])
            continue
        others = sorted(free)
        distance = (lam[others] - lam[i].conj()).abs()
        j = others[int(distance.argmin())]
        free.discard(j)
        groups.append([i, j])
    return groups


def abs_below(radius: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """Region |lambda| < radius (fast-decaying modes), for ``edit_modes(where=...)``."""
    radius = check_float(radius, "radius", low=0.0)
    return lambda lam: lam.abs() < radius


def near_frequency(theta: float, tol: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """Region |arg(lambda)| within ``tol`` radians of ``theta`` (either sign, so a conjugate
    pair is chosen whole), for ``edit_modes(where=...)``."""
    theta = check_float(theta, "theta", low=0.0)
    if theta > math.pi:
        raise ValueError(f"theta={theta} must be an angle in [0, pi] (radians); pass |arg|.")
    tol = check_float(tol, "tol", low=0.0)
    return lambda lam: (lam.angle().abs() - theta).abs() <= tol


def _indices(value, name: str, n_modes: int) -> list[int]:
    value = value.tolist() if isinstance(value, torch.Tensor) else value
    value = [value] if isinstance(value, int) else value
    if not isinstance(value, Sequence) or isinstance(value, str):
        raise TypeError(f"{name}={value!r} must be a mode index or a list of them "
                        f"(0..{n_modes - 1}).")
    return [check_int(i, f"{name} index", low=-n_modes, high=n_modes - 1) % n_modes
            for i in value]


def _factors(remove, scale, where, n_modes, eigenvalues) -> dict[int, float]:
    factors: dict[int, float] = {}
    if remove is not None:
        factors.update(dict.fromkeys(_indices(remove, "remove", n_modes), 0.0))
    if where is not None:
        if not callable(where):
            raise TypeError(f"where={where!r} must be a callable taking the eigenvalues [R] "
                            "(complex) and returning a boolean mask [R], e.g. "
                            "koopnet.editing.abs_below(0.1).")
        mask = torch.as_tensor(where(eigenvalues))
        if mask.dtype != torch.bool or tuple(mask.shape) != (n_modes,):
            raise ValueError(f"where(...) returned {mask.dtype} of shape {list(mask.shape)}; "
                             f"it must return a boolean mask of shape [{n_modes}].")
        factors.update(dict.fromkeys(mask.nonzero().flatten().tolist(), 0.0))
    if scale is not None:
        if not isinstance(scale, Mapping):
            raise TypeError(f"scale={scale!r} must be a mapping {{mode index: real factor}}, "
                            "e.g. {0: 0.5}.")
        for index, factor in scale.items():
            index = _indices(index, "scale", n_modes)[0]
            if index in factors:
                raise ValueError(f"mode {index} is both removed and scaled; choose one.")
            factors[index] = check_float(factor, f"scale[{index}]")
    for group in mode_groups(eigenvalues):
        chosen = {factors[i] for i in group if i in factors}
        if len(chosen) > 1:
            raise ValueError(f"modes {group} are a complex-conjugate pair but were given "
                             f"different factors {sorted(chosen)}; give both the same factor "
                             "so the operator stays real.")
        if chosen:
            factors.update(dict.fromkeys(group, chosen.pop()))
    return factors


def _real(matrix: torch.Tensor, what: str) -> torch.Tensor:
    residue = float(matrix.imag.abs().max()) if matrix.numel() else 0.0
    size = max(float(matrix.real.abs().max()) if matrix.numel() else 0.0, 1.0)
    if residue > _RESIDUE_TOL * size:
        raise ValueError(f"the edited {what} has an imaginary residue of {residue:.2g} "
                         f"(relative {residue / size:.2g}); the eigenvectors are too "
                         "ill-conditioned to edit these modes apart.")
    return matrix.real.contiguous()


def edit_modes(hybrid, *, remove=None, scale: Mapping | None = None,
               where: Callable | None = None, subspace: torch.Tensor | None = None):
    """A new hybrid with chosen eigenmodes of the operator removed or scaled, or a subspace of
    the lifted state projected out; ``hybrid`` itself is left untouched.

    ``remove``: mode indices (the order of :func:`spectrum`) set to 0; ``scale``: ``{index:
    c}``, lambda_i -> c lambda_i (c real); ``where``: a region whose modes are removed,
    ``where(eigenvalues) -> mask`` (e.g. :func:`abs_below`, :func:`near_frequency`);
    ``subspace``: directions Q [D, k] of the lifted state removed before the roll-out.

    A mode of a complex-conjugate pair takes its partner along. Nothing chosen returns an exact
    copy. Shape: the result maps inputs to logits as ``hybrid`` does.
    """
    basis, operator, linear_map, m = _buffers(hybrid)
    if remove is None and scale is None and where is None and subspace is None:
        raise ValueError("edit_modes needs remove=, scale=, where= or subspace=; "
                         "pass at least one.")
    if subspace is not None and (remove is not None or scale is not None or where is not None):
        raise ValueError("pass subspace= alone, or mode edits (remove=, scale=, where=) alone; "
                         "call edit_modes twice to do both.")
    if subspace is not None:
        return _project_out(hybrid, basis, operator, linear_map, subspace)
    eigenvalues, right, left = spectrum(hybrid)
    factors = _factors(remove, scale, where, len(eigenvalues), eigenvalues)
    if not factors:
        return copy.deepcopy(hybrid)
    chosen = sorted(factors)
    c = torch.tensor([factors[i] for i in chosen], **_F64)
    Phi, Psi = right[:, chosen], left[chosen]  # [R, s], [s, R]
    step = (Phi * (c - 1).to(Phi.dtype)) @ Psi  # E - I, one step
    powered = (Phi * (c**m - 1).to(Phi.dtype)) @ Psi  # E^m - I
    eye = torch.eye(len(operator), **_F64)
    step = _real(step, "operator") + eye
    powered = _real(powered, "roll-out") + eye
    edited_operator = _real((right * eigenvalues) @ left, "operator") @ step
    new_map = linear_map @ basis @ powered @ basis.T
    return _with_buffers(hybrid, edited_operator, new_map, step)


def _project_out(hybrid, basis, operator, linear_map, subspace):
    Q = as_tensor(subspace, "subspace").to(**_F64)
    if Q.ndim == 1:
        Q = Q[:, None]
    if Q.ndim != 2 or Q.shape[0] != basis.shape[0]:
        raise ValueError(f"subspace has shape {list(Q.shape)}; it must be [D, k] with "
                         f"D={basis.shape[0]}, the lifted state's size.")
    U, s, _ = torch.linalg.svd(basis.T @ Q, full_matrices=False)  # reduced directions
    keep = s > s[0] * 1e-10 if len(s) and s[0] > 0 else s > 0
    Qr = U[:, keep]
    projector = torch.eye(len(operator), **_F64) - Qr @ Qr.T
    new_map = linear_map @ basis @ projector @ basis.T
    return _with_buffers(hybrid, operator @ projector, new_map, projector)


def _lifted(hybrid, X: torch.Tensor) -> torch.Tensor:
    """The lifted state g_h entering the roll-out, float64 on the CPU. Shape: [n, ...] -> [n, D]."""
    if not isinstance(hybrid, KoopmanHybrid):
        raise TypeError(f"this diagnosis needs a KoopmanHybrid; got {type(hybrid).__name__}.")
    with torch.no_grad():
        states = hybrid.prefix_states(X.to(hybrid.linear_map.device))
        states = states[:, hybrid.n_blocks - hybrid.n_delays: hybrid.n_blocks + 1]
        return hybrid.observable.transform(states)[:, -1].to(**_F64)


def _logits(hybrid, lifted: torch.Tensor, linear_map: torch.Tensor,
            offset: torch.Tensor | None = None) -> torch.Tensor:
    """The tail's logits of p = linear_map g (+ offset). Shape: lifted [n, D] -> [n, C]."""
    predicted = lifted @ linear_map.T  # [n, w']
    if offset is not None:
        predicted += offset
    return _tail_logits(hybrid, predicted)


def _tail_logits(hybrid, predicted: torch.Tensor) -> torch.Tensor:
    """The tail's logits of a predicted state p, float64 on the CPU. Shape: [n, w'] -> [n, C]."""
    parameter = next(hybrid.tail.parameters())  # the tail runs where it lives
    with torch.no_grad():
        return hybrid.tail(predicted.to(parameter.device, parameter.dtype)).to(**_F64)


def resdmd_residuals(hybrid, stats: PairStatistics) -> torch.Tensor:
    """ResDMD relative residual ||Y w - lambda X w|| / ||X w|| of every eigenpair of the
    hybrid's operator on the (held-out) pairs in ``stats`` (Colbrook and Townsend 2024); a
    large residual flags a spurious mode. The eigenfunction of mode i is w_i^T g with
    w = V Psi^T. Shape: [R], in the order of :func:`spectrum`.
    """
    basis, _, _, _ = _buffers(hybrid)
    if not isinstance(stats, PairStatistics):
        raise TypeError(f"stats must be a koopnet.dmd.PairStatistics; got "
                        f"{type(stats).__name__}. Build one with PairStatistics.from_pairs.")
    if stats.xx.shape[0] != basis.shape[0]:
        raise ValueError(f"stats have D={stats.xx.shape[0]}; this hybrid lifts to "
                         f"D={basis.shape[0]}. Lift the held-out pairs the same way.")
    eigenvalues, _, left = spectrum(hybrid)
    W = basis.to(left.dtype) @ left.T  # [D, R]

    def quad(G: torch.Tensor) -> torch.Tensor:
        return (W.conj() * (G.to(**_F64).to(W.dtype) @ W)).sum(0)

    xx, yx, yy = quad(stats.xx).real, quad(stats.yx), quad(stats.yy).real
    numerator = yy - 2 * (eigenvalues * yx).real + eigenvalues.abs() ** 2 * xx
    return (numerator.clamp_min(0) / xx.clamp_min(torch.finfo(xx.dtype).tiny)).sqrt()


def mode_attribution(hybrid: KoopmanHybrid, X, y, *, stats: PairStatistics | None = None
                     ) -> dict:
    """What each mode does to each class, measured through the tail on (X, y): each mode (a
    conjugate pair as one) is removed as :func:`edit_modes` does and the data re-scored.

    Returns tensors: ``eigenvalues`` [R] complex; ``group`` [R] (first index of its pair);
    ``logit_drop`` [R, C] (drop of class c's mean logit over its samples); ``accuracy_drop``
    [R, C]; ``residual`` [R] (ResDMD residual on ``stats``, held-out lifted pairs, else NaN);
    ``base_accuracy`` [C]; all on the CPU.
    """
    X = as_tensor(X, "X")
    y = _labels(y, len(X))
    basis, _, linear_map, _ = _buffers(hybrid)
    lifted = _lifted(hybrid, X)
    eigenvalues, right, left = spectrum(hybrid)
    logits = _logits(hybrid, lifted, linear_map)
    n_classes = logits.shape[1]
    if int(y.max()) >= n_classes:
        raise ValueError(f"y holds label {int(y.max())}; the hybrid has {n_classes} classes.")
    base_logit, base_acc = _per_class(logits, y, n_classes)
    R = len(eigenvalues)
    logit_drop, accuracy_drop = torch.zeros(R, n_classes, **_F64), torch.zeros(R, n_classes, **_F64)
    group_of = torch.zeros(R, dtype=torch.int64, device="cpu")
    eye = torch.eye(R, **_F64)
    for group in mode_groups(eigenvalues):
        powered = _real(-(right[:, group] @ left[group]), "roll-out") + eye  # E^m - I + I
        edited = _logits(hybrid, lifted, linear_map @ basis @ powered @ basis.T)
        logit, acc = _per_class(edited, y, n_classes)
        logit_drop[group] = base_logit - logit
        accuracy_drop[group] = base_acc - acc
        group_of[group] = group[0]
    residual = (resdmd_residuals(hybrid, stats) if stats is not None
                else torch.full((R,), float("nan"), **_F64))
    return {"eigenvalues": eigenvalues, "group": group_of, "logit_drop": logit_drop,
            "accuracy_drop": accuracy_drop, "residual": residual, "base_accuracy": base_acc}


def _labels(y, n: int) -> torch.Tensor:
    y = as_tensor(y, "y", ndim=1)
    if y.is_floating_point() or y.is_complex() or len(y) != n:
        raise ValueError(f"y must hold {n} integer class labels; got {y.dtype} of shape "
                         f"{list(y.shape)}.")
    return y.to("cpu", torch.int64)  # beside the logits of _logits


def _per_class(logits: torch.Tensor, y: torch.Tensor, n_classes: int):
    right = logits.argmax(1) == y
    mean_logit, acc = (torch.full((n_classes,), float("nan"), **_F64) for _ in range(2))
    for c in range(n_classes):
        mask = y == c
        if mask.any():
            mean_logit[c] = logits[mask, c].mean()
            acc[c] = right[mask].double().mean()
    return mean_logit, acc
