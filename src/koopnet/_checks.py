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
        raise TypeError(f"{name}={value!r} must be an integer.")
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
