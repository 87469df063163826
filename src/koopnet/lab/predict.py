"""Predict the accuracy drop of a hybrid from trajectories alone, before evaluating it.

A sweep over layers and delays scores every hybrid on validation data, which is the slow part of
a study. The scores here are closed-form and need only the trajectories s_0..s_{T-1} of the
scaled network: if the replaced map from the lifted delay vector g_h to the replaced layer's
output s_{T-1} is close to linear, and the DMD operator fitted on the lifted pairs predicts
both one step and the whole roll-out well on held-out trajectories, the hybrid should lose
little accuracy. ``rank_correlation`` measures how well a score orders the measured drops.
``layer_cells`` scores every h of one layer, and ``calibrated_threshold`` turns a tolerance into a
score threshold for :func:`suggest` (what ``koopnet suggest`` runs).

Three scores, each "higher = worse" so all should correlate positively with the drop:

- ``unexplained``: 1 - R^2 of the least-squares map g_h -> s_{T-1} (fitted on train, scored
  on val): the best any linear read-out of the delay vector can do.
- ``residual``: relative one-step residual ||Y - X K^T|| / ||Y|| of the DMD on val pairs.
- ``rollout``: relative error of the DMD's (T-1-h)-step prediction of s_{T-1} on val: what
  the hybrid actually computes before the tail.
"""

from __future__ import annotations

import math

import torch

from koopnet._checks import as_tensor, check_float, check_int
from koopnet.dmd import DMD
from koopnet.observables import TimeDelay, snapshot_pairs

SCORES = ("unexplained", "residual", "rollout")

#: The threshold ``koopnet suggest`` uses without a calibration file: per tolerance (a fraction
#: of accuracy), :func:`calibrate` of the held-out one-step residual over the 99 (layer, h)
#: cells of clean Yin-Yang seeds 0, 1, 2 in benchmarks/results/predict_drop.json (commit
#: 006d113). A tolerance between two entries uses the smaller one (the stricter threshold).
BUILTIN_CALIBRATION = {
    "score": "residual",
    "source": "built-in: clean Yin-Yang seeds 0-2, 99 cells of benchmarks/predict_drop.py "
              "(commit 006d113)",
    "thresholds": {0.0025: 0.004441185502234935, 0.005: 0.005990685371268233,
                   0.01: 0.005990685371268233, 0.02: 0.005990685371268233,
                   0.05: 0.009306130520229638},
}


def _check_states(train_states, val_states, h: int) -> tuple[torch.Tensor, torch.Tensor]:
    train = as_tensor(train_states, "train_states", ndim=3, dtype=torch.float64)
    val = as_tensor(val_states, "val_states", ndim=3, dtype=torch.float64)
    if train.shape[1:] != val.shape[1:]:
        raise ValueError(f"train_states have shape [B, T, W] = {tuple(train.shape)} and "
                         f"val_states {tuple(val.shape)}; T and W must match. Collect both "
                         "from the same scaled network.")
    if h > train.shape[1] - 2:
        raise ValueError(f"h={h} needs trajectories of at least {h + 2} states (one linear "
                         f"step); got T={train.shape[1]}. Lower h.")
    return train, val


def _relative(error: torch.Tensor, target: torch.Tensor) -> float:
    """||error|| / ||target|| (Frobenius); 0 when both vanish."""
    norm = float(torch.linalg.norm(target))
    err = float(torch.linalg.norm(error))
    return err / norm if norm > 0 else (0.0 if err == 0 else math.inf)


def _r2(train_g, train_y, val_g, val_y) -> float:
    """R^2 on val of the least-squares map g -> y fitted on train. Shape: g [n, D], y [n, W]."""
    coef = torch.linalg.lstsq(train_g, train_y, driver="gelsd").solution  # [D, W]
    sse = float(((val_y - val_g @ coef) ** 2).sum())
    sst = float(((val_y - val_y.mean(0)) ** 2).sum())
    if sst == 0:
        return 1.0 if sse == 0 else -math.inf
    return 1.0 - sse / sst


def drop_scores(train_states, val_states, h: int, *, constant: bool = True,
                tikhonov: float = 1e-6, out_width: int | None = None) -> dict[str, float]:
    """Closed-form scores of delay h (no hybrid is built or evaluated).

    ``out_width`` limits the last-state comparisons to its first neurons (the replaced layer's
    real width; the rest is padding). Shape: train_states [B, T, W], val_states [B', T, W].
    Returns r2, unexplained (1 - r2), residual and rollout (see the module docstring).
    """
    h = check_int(h, "h", low=0)
    tikhonov = check_float(tikhonov, "tikhonov", low=0.0)
    train, val = _check_states(train_states, val_states, h)
    n_steps, width = train.shape[1] - 1 - h, train.shape[2]
    out = width if out_width is None else check_int(out_width, "out_width", low=1, high=width)
    observable = TimeDelay(h, constant=constant).fit(train)
    lifted_train = observable.transform(train)  # [B, T-h, D]
    lifted_val = observable.transform(val)  # [B', T-h, D]
    target_train, target_val = train[:, -1, :out], val[:, -1, :out]  # [B, out], [B', out]
    r2 = _r2(lifted_train[:, 0], target_train, lifted_val[:, 0], target_val)
    dmd = DMD(rank=None, tikhonov=tikhonov, exact_rollout=True).fit(lifted_train)
    X, Y = snapshot_pairs(lifted_val)  # [B'(T-h-1), D] each
    residual = _relative(Y - X @ dmd.transition(1).T, Y)
    step = dmd.transition(n_steps, observable.readout(width))[:out]  # [out, D]
    rollout = _relative(lifted_val[:, 0] @ step.T - target_val, target_val)
    return {"r2": r2, "unexplained": 1.0 - r2, "residual": residual, "rollout": rollout}


def _ranks(values: list[float]) -> list[float]:
    """Ranks 1..n, tied values sharing the average of their ranks."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    start = 0
    while start < len(order):
        stop = start
        while stop + 1 < len(order) and values[order[stop + 1]] == values[order[start]]:
            stop += 1
        for k in range(start, stop + 1):
            ranks[order[k]] = (start + stop) / 2 + 1
        start = stop + 1
    return ranks


def rank_correlation(scores, drops) -> float:
    """Spearman's rho: the Pearson correlation of the (tie-averaged) ranks.

    NaN when either side is constant (no ordering to compare), so a sweep with one flat score
    does not stop a report.
    """
    scores, drops = [float(v) for v in scores], [float(v) for v in drops]
    if len(scores) != len(drops):
        raise ValueError(f"scores has {len(scores)} values but drops has {len(drops)}; pass "
                         "one score per measured drop.")
    if len(scores) < 2:
        raise ValueError(f"rank correlation needs at least 2 pairs; got {len(scores)}.")
    if any(math.isnan(v) for v in scores + drops):
        raise ValueError("scores and drops must not contain NaN; drop those cells first.")
    a, b = _ranks(scores), _ranks(drops)
    mean_a, mean_b = sum(a) / len(a), sum(b) / len(b)
    cov = sum((x - mean_a) * (y - mean_b) for x, y in zip(a, b, strict=True))
    var_a = sum((x - mean_a) ** 2 for x in a)
    var_b = sum((y - mean_b) ** 2 for y in b)
    if var_a == 0 or var_b == 0:
        return math.nan
    return cov / math.sqrt(var_a * var_b)


def suggest(cells: list[dict], score: str, threshold: float) -> dict:
    """The cell with the most linear steps (smallest h) whose score is at most ``threshold``.

    ``cells`` need layer, h and the score; ties go to the lower score. With no cell under the
    threshold, the lowest-scoring cell.
    """
    if not cells:
        raise ValueError("suggest needs at least one scored (layer, h) cell; got none.")
    passing = [c for c in cells if c[score] <= threshold]
    if not passing:
        return min(cells, key=lambda c: c[score])
    return min(passing, key=lambda c: (c["h"], c[score]))


def calibrate(cells: list[dict], score: str, tolerance: float) -> float:
    """Largest score threshold that admits no cell whose drop exceeds ``tolerance``.

    Calibrated on other runs (e.g. other seeds), then used with :func:`suggest` on a new one.
    ``cells`` need the score and a measured ``drop``. -inf when even the best-scoring cell
    failed.
    """
    failing = [c[score] for c in cells if c["drop"] > tolerance]
    limit = min(failing) if failing else math.inf
    passing = [c[score] for c in cells if c["drop"] <= tolerance and c[score] < limit]
    return max(passing) if passing else -math.inf


def layer_cells(train_states, val_states, layer: int, *, delays=None,
                out_width: int | None = None, **options) -> list[dict]:
    """:func:`drop_scores` of every delay h of one scaled layer, one cell per h.

    ``delays``: the h to score (default every h with at least one linear step). ``options`` go
    to :func:`drop_scores`. Shape: train_states [B, T, W], val_states [B', T, W].
    """
    n_states = as_tensor(train_states, "train_states", ndim=3).shape[1]
    delays = range(n_states - 1) if delays is None else delays
    cells = []
    for h in delays:
        scores = drop_scores(train_states, val_states, h, out_width=out_width, **options)
        cells.append({"layer": layer, "h": h, "linear_steps": n_states - 1 - h, **scores})
    return cells


def calibrated_threshold(calibration: dict, score: str, tolerance: float) -> tuple[float, dict]:
    """The score threshold for ``tolerance`` (a fraction of accuracy) and what it came from.

    ``calibration`` holds ``cells`` with the score and a measured ``drop`` (such as
    benchmarks/results/predict_drop.json), calibrated here with :func:`calibrate`; or, as
    :data:`BUILTIN_CALIBRATION`, ``thresholds`` per tolerance, the largest tolerance not above
    ``tolerance`` being used. Returns (threshold, a record of the calibration for the output).
    """
    tolerance = check_float(tolerance, "tolerance", low=0.0)
    record = {"source": calibration.get("source", "calibration"), "score": score}
    if "cells" in calibration:
        usable = [c for c in calibration["cells"] if score in c and "drop" in c]
        if not usable:
            raise ValueError(f"the calibration '{record['source']}' has no cells with both "
                             f"'{score}' and 'drop'; write one with benchmarks/predict_drop.py.")
        threshold = calibrate(usable, score, tolerance)
        return threshold, {**record, "tolerance": tolerance, "threshold": threshold,
                           "n_cells": len(usable)}
    if calibration.get("score") != score:
        raise ValueError(f"the {record['source']} calibration scores "
                         f"{calibration.get('score')!r}, not {score!r}; pass a calibration "
                         f"file with '{score}' cells (benchmarks/predict_drop.py writes one).")
    covered = sorted(t for t in calibration["thresholds"] if t <= tolerance + 1e-12)
    if not covered:
        smallest = min(calibration["thresholds"])
        raise ValueError(f"tolerance {100 * tolerance:g} point is below the smallest one the "
                         f"{record['source']} calibration covers ({100 * smallest:g} point); "
                         "pass a calibration file (benchmarks/predict_drop.py writes one).")
    threshold = calibration["thresholds"][covered[-1]]
    return threshold, {**record, "tolerance": covered[-1], "threshold": threshold}
