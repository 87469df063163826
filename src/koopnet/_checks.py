"""Shared input validation: one wording for every error koopnet raises.

Messages follow "what, the value given, what is needed, how to fix it", so a user never has to
read a traceback from inside torch. This module imports only torch and sits at the bottom of the
package: every other module may use it.
"""

from __future__ import annotations

import numbers

import numpy as np
import torch


class NotFittedError(ValueError, AttributeError):
    """Raised when a method that needs a fitted estimator is called before ``fit``."""


def check_is_fitted(estimator: object, attribute: str) -> None:
    if not hasattr(estimator, attribute):
        name = type(estimator).__name__
        raise NotFittedError(f"This {name} instance is not fitted yet; call fit(...) first.")


def as_tensor(data, name: str, *, ndim: int | None = None, dtype=None) -> torch.Tensor:
    """Convert arrays/lists to a tensor and check rank, emptiness and finiteness."""
    if isinstance(data, np.ndarray):
        data = torch.from_numpy(np.ascontiguousarray(data))
    elif not isinstance(data, torch.Tensor):
        try:
            data = torch.as_tensor(data)
        except (TypeError, ValueError, RuntimeError) as err:
            kind = type(data).__name__
            raise TypeError(f"{name} must be a tensor or array; got {kind}.") from err
    if dtype is not None:
        data = data.to(dtype)
    if ndim is not None and data.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions; got shape {tuple(data.shape)}.")
    if data.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(data.shape)}); pass at least one sample.")
    check_finite(data, name)
    return data


def check_finite(data: torch.Tensor, name: str, hint: str = "") -> None:
    """Raise if ``data`` holds NaN or inf, naming the count and the first bad position."""
    if not data.is_floating_point() and not data.is_complex():
        return
    # fast path: any NaN or inf makes the sum non-finite; a huge finite tensor can overflow the
    # sum, so only then look at every entry
    if bool(torch.isfinite(data.sum())) or bool(torch.isfinite(data).all()):
        return
    bad = ~torch.isfinite(data)
    n_nan = int(torch.isnan(data).sum())
    n_inf = int(bad.sum()) - n_nan
    first = tuple(int(i) for i in bad.nonzero()[0])
    kinds = ", ".join(f"{n} {k}" for n, k in ((n_nan, "NaN"), (n_inf, "inf")) if n)
    raise ValueError(f"{name} contains {kinds} values (first at index {first}).{hint}")


def check_int(value, name: str, *, low: int | None = None, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        kind = " (a string)" if isinstance(value, str) else ""
        raise TypeError(f"{name}={value!r}{kind} must be an integer.")
    value = int(value)
    if low is not None and value < low:
        raise ValueError(f"{name}={value} must be >= {low}.")
    if high is not None and value > high:
        raise ValueError(f"{name}={value} must be <= {high}.")
    return value


def check_float(value, name: str, *, low: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}={value!r} must be a real number.")
    value = float(value)
    if not np.isfinite(value) or (low is not None and value < low):
        bound = f" >= {low}" if low is not None else ""
        raise ValueError(f"{name}={value} must be a finite number{bound}.")
    return value


def check_rank(rank):
    """The ``rank`` parameter, normalised: None, an int >= 0 or a float in (0, 1).

    numpy scalars are accepted and turned into Python numbers, so a value that passes here never
    fails later inside a fit.
    """
    if rank is None:
        return None
    if isinstance(rank, bool) or not isinstance(rank, numbers.Real):
        raise TypeError(f"rank={rank!r} must be None, an int or a float.")
    if isinstance(rank, numbers.Integral) and int(rank) >= 0:
        return int(rank)
    if not isinstance(rank, numbers.Integral) and 0.0 < float(rank) < 1.0:
        return float(rank)
    raise ValueError(f"rank={rank!r} is ambiguous: pass an int >= 1, a float in (0, 1), 0 for "
                     "the optimal threshold, or None for full rank.")


def check_rank_limit(rank, n_features: int, n_pairs: int) -> None:
    """An integer rank cannot exceed min(D, pairs): the data has no more directions."""
    limit = min(n_features, n_pairs)
    if isinstance(rank, int) and rank > limit:
        raise ValueError(f"rank={rank} exceeds what the data supports: min(D={n_features}, "
                         f"pairs={n_pairs})={limit}. Lower rank to <= {limit}, pass None for "
                         "full rank, or use more samples.")


def check_delays(n_delays, n_states: int, *, fix: str = "insert more blocks") -> int:
    """``n_delays`` h must leave at least one snapshot pair: T >= h + 2 states."""
    h = check_int(n_delays, "n_delays", low=0)
    if h > n_states - 2:
        raise ValueError(f"n_delays={h} needs trajectories of at least {h + 2} states; got "
                         f"T={n_states}. Lower n_delays to <= {max(n_states - 2, 0)} or {fix}.")
    return h


def check_choice(value, name: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        options = " or ".join(repr(c) for c in choices)
        raise ValueError(f"{name}={value!r} must be {options}.")
    return value


def check_width_preserving(blocks: torch.nn.Module, width: int,
                           name: str = "inserted block") -> None:
    """Every Linear inside ``blocks`` must map ``width`` to ``width``.

    The inserted blocks of a scaled network turn depth into time: each state must have the
    width of the one before it, or the states do not form one trajectory.
    """
    for i, block in enumerate(blocks):
        for module in block.modules():
            if isinstance(module, torch.nn.Linear) and (
                    module.in_features, module.out_features) != (width, width):
                raise ValueError(
                    f"{name} {i} maps width {module.in_features} -> {module.out_features}; "
                    f"inserted blocks must preserve the width ({width} -> {width}) so the states "
                    "form one trajectory. Build them with Linear(w, w) (see scale_layer).")
