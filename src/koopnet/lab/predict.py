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
- ``flip``: the roll-out error e matters only through the rest of the network, so it is carried
  to the logits to first order, J(s_{T-1}) e (the tail's Jacobian, by autograd on the trajectory
  pass): the share of val samples whose first-order logits change their top class, the least
  over the fits a sweep tries (:func:`sweep_fits`). A prediction, not a measurement: the tail is
  never run on the roll-out, and no labels are used. It needs the tail, so :func:`layer_cells`
  computes it only when given one.
"""

from __future__ import annotations

import copy
import math

import torch

from koopnet._checks import as_tensor, check_float, check_int
from koopnet.dmd import DMD
from koopnet.lab.recipes import ExperimentConfig
from koopnet.observables import TimeDelay, snapshot_pairs

SCORES = ("unexplained", "residual", "rollout", "flip")

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
#: The same for the predicted flip share: :func:`calibrate` of ``flip`` over the same 99 cells
#: (``builtin_thresholds`` of benchmarks/results/predict_drop.json, cells of commit 9860082).
BUILTIN_FLIP_CALIBRATION = {
    "score": "flip",
    "source": "built-in: clean Yin-Yang seeds 0-2, 99 cells of benchmarks/predict_drop.py "
              "(commit 9860082)",
    "thresholds": {0.0025: 0.0025, 0.005: 0.0065, 0.01: 0.013, 0.02: 0.0185, 0.05: 0.0205},
}
#: The built-in calibration of each score that has one (``koopnet suggest --calibration
#: yinyang``).
BUILTIN_CALIBRATIONS = {"residual": BUILTIN_CALIBRATION, "flip": BUILTIN_FLIP_CALIBRATION}
#: ``flip`` needs no calibration: it predicts the share of decisions the hybrid changes, and
#: each changed decision moves accuracy by at most one sample, so to first order the drop is at
#: most the flip share. Its threshold is the tolerance itself (``koopnet suggest``'s default).
FIRST_ORDER_BOUND = {
    "score": "flip", "bound": True,
    "source": "first-order bound, no calibration: predicted share of changed decisions <= "
              "tolerance"}


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


def _fit(train: torch.Tensor, h: int, constant: bool, tikhonov: float, rank=None):
    """The delay observable and the DMD of the lifted train pairs (as the hybrid fits them)."""
    observable = TimeDelay(h, constant=constant).fit(train)
    dmd = DMD(rank=rank, tikhonov=tikhonov, exact_rollout=True).fit(observable.transform(train))
    return observable, dmd


def drop_scores(train_states, val_states, h: int, *, constant: bool = True,
                tikhonov: float = 1e-6, out_width: int | None = None,
                fitter=None) -> dict[str, float]:
    """Closed-form scores of delay h (no hybrid is built or evaluated).

    ``out_width`` limits the last-state comparisons to its first neurons (the replaced layer's
    real width; the rest is padding). ``fitter(train, h, constant, tikhonov, rank)`` returns the
    fitted (observable, DMD); default: a TimeDelay and a DMD of the lifted train pairs (pass
    another to reuse fits, e.g. ones from Gram statistics of more trajectories).
    Shape: train_states [B, T, W], val_states [B', T, W].
    Returns r2, unexplained (1 - r2), residual and rollout (see the module docstring).
    """
    h = check_int(h, "h", low=0)
    tikhonov = check_float(tikhonov, "tikhonov", low=0.0)
    train, val = _check_states(train_states, val_states, h)
    n_steps, width = train.shape[1] - 1 - h, train.shape[2]
    out = width if out_width is None else check_int(out_width, "out_width", low=1, high=width)
    observable, dmd = (fitter or _fit)(train, h, constant, tikhonov)
    lifted_train = observable.transform(train)  # [B, T-h, D]
    lifted_val = observable.transform(val)  # [B', T-h, D]
    target_train, target_val = train[:, -1, :out], val[:, -1, :out]  # [B, out], [B', out]
    r2 = _r2(lifted_train[:, 0], target_train, lifted_val[:, 0], target_val)
    X, Y = snapshot_pairs(lifted_val)  # [B'(T-h-1), D] each
    residual = _relative(Y - X @ dmd.transition(1).T, Y)
    step = dmd.transition(n_steps, observable.readout(width))[:out]  # [out, D]
    rollout = _relative(lifted_val[:, 0] @ step.T - target_val, target_val)
    return {"r2": r2, "unexplained": 1.0 - r2, "residual": residual, "rollout": rollout}


def rollout_errors(train_states, val_states, h: int, *, constant: bool = True,
                   tikhonov: float = 1e-6, rank=None, out_width: int | None = None,
                   fitter=None):
    """Held-out last states s_{T-1} and the error e = s_hat - s_{T-1} of the DMD roll-out from s_h.

    What the hybrid feeds its tail, minus what the network feeds it, computed from trajectories
    alone. ``fitter``: as for :func:`drop_scores`.
    Shape: train_states [B, T, W], val_states [B', T, W] -> (target, error), each [B', out].
    """
    h = check_int(h, "h", low=0)
    tikhonov = check_float(tikhonov, "tikhonov", low=0.0)
    train, val = _check_states(train_states, val_states, h)
    n_steps, width = train.shape[1] - 1 - h, train.shape[2]
    out = width if out_width is None else check_int(out_width, "out_width", low=1, high=width)
    observable, dmd = (fitter or _fit)(train, h, constant, tikhonov, rank)
    step = dmd.transition(n_steps, observable.readout(width))[:out]  # [out, D]
    target = val[:, -1, :out]  # [B', out]
    return target, observable.transform(val)[:, 0] @ step.T - target  # [B', out] each


def state_errors(observable, dmd: DMD, states: torch.Tensor, h: int, width: int,
                 out_width: int) -> list[float]:
    """Held-out relative error ||S_hat_t - S_t||_F / ||S_t||_F of every state a hybrid's
    roll-out from s_h predicts, t = h+1..T-1 (S_t: state t of all samples), so a K that only
    gets the last state right (a memorised end) shows in the states before it.

    ``observable`` and ``dmd`` are fitted (any dictionary whose ``readout`` returns the state);
    ``width``/``out_width``: real widths of the inserted states and of the last one (the rest
    is padding). Shape: states [B, T, W] -> T-1-h errors.
    """
    T = states.shape[1]
    first = h - observable.n_delays_  # a dictionary without delays lifts s_h alone
    lifted = observable.transform(states[:, first:h + 1])[:, -1]  # [B, D]
    readout = observable.readout(states.shape[2])  # [W, D]
    steps = dmd.transitions(T - 1 - h, readout)  # [T-1-h, W, D], step m at m-1
    errors = []
    for t in range(h + 1, T):
        w = out_width if t == T - 1 else width
        step = steps[t - h - 1, :w]  # [w, D]
        true = states[:, t, :w].to(step.dtype)  # [B, w]
        error = lifted.to(step.dtype) @ step.T - true
        errors.append(float(error.norm() / true.norm().clamp_min(1e-12)))
    return errors


def _jacobian_product(tail: torch.nn.Module, target: torch.Tensor, error: torch.Tensor):
    """tail(s) and J(s) e per sample, by one backward pass per class (the samples of an eval-mode
    tail do not interact). Shape: target [B, w], error [B, w] -> (logits, change), each [B, C]."""
    tail = copy.deepcopy(tail).to(torch.float64).eval().requires_grad_(False)
    state = target.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        logits = tail(state)  # [B, C]
        rows = [torch.autograd.grad(logits[:, c].sum(), state, retain_graph=True)[0]
                for c in range(logits.shape[1])]  # C x [B, w]
    change = torch.stack([(row * error).sum(1) for row in rows], dim=1)  # [B, C]
    return logits.detach(), change


def first_order_flips(tail: torch.nn.Module, target, error) -> dict[str, float]:
    """Decisions of ``tail`` that a first-order change of its input ``target`` by ``error`` flips.

    The logits z = tail(s) move by J(s) e to first order (autograd in float64, one backward pass
    per class; ``tail(s + e)`` is never evaluated: that would be the hybrid). With k the top class,
    the change closes the fraction r_c = (dz_c - dz_k) / (z_k - z_c) of the margin to class c;
    a decision flips when some r_c > 1. Returns ``flip`` (the fraction of samples that flip) and
    ``margin`` (the mean of max_c r_c clipped to [0, 1]: near-flips count in part).
    Shape: target [B, w], error [B, w] -> floats.
    """
    target = as_tensor(target, "target", ndim=2, dtype=torch.float64)
    error = as_tensor(error, "error", ndim=2, dtype=torch.float64)
    if target.shape != error.shape:
        raise ValueError(f"target has shape {tuple(target.shape)} and error "
                         f"{tuple(error.shape)}; pass one error per target state.")
    logits, change = _jacobian_product(tail, target, error)  # [B, C] each
    top = logits.argmax(1, keepdim=True)  # [B, 1]
    flip = (logits + change).argmax(1, keepdim=True) != top  # [B, 1]
    margin = logits.gather(1, top) - logits  # [B, C], 0 at the top class
    closing = change - change.gather(1, top)  # [B, C]
    ratio = torch.where(margin > 0, closing / margin.clamp_min(torch.finfo(margin.dtype).tiny),
                        torch.zeros_like(margin))  # [B, C]
    worst = ratio.max(1).values.clamp(0.0, 1.0)  # [B]
    return {"flip": float(flip.double().mean()), "margin": float(worst.mean())}


def sweep_fits(config=None) -> list[dict]:
    """The DMD fits (rank, constant, tikhonov) a sweep of ``config`` tries for each h.

    Default: the grid of :class:`koopnet.lab.recipes.ExperimentConfig`. :func:`flip_score` takes
    the best of them, as the sweep takes the best hybrid among them.
    """
    config = ExperimentConfig() if config is None else config
    return [{"rank": rank, "constant": constant, "tikhonov": tikhonov}
            for rank in config.ranks for constant in config.constants
            for tikhonov in config.tikhonovs]


def flip_score(train_states, val_states, h: int, tail: torch.nn.Module, *, fits=None,
               out_width: int | None = None, fitter=None) -> dict[str, float]:
    """Predicted share of held-out decisions the hybrid of delay h changes, best of ``fits``.

    For each fit: :func:`rollout_errors` on val, then :func:`first_order_flips` of the tail (the
    rest of the scaled network after s_{T-1}). ``fits``: dicts of rank, constant and tikhonov
    (default :func:`sweep_fits`); a fit the data cannot support (a rank too large) is skipped,
    as the sweep skips it; ``fitter``: as for :func:`drop_scores`. Returns ``flip`` and
    ``flip_margin``, each the minimum over the fits.
    Shape: train_states [B, T, W], val_states [B', T, W].
    """
    train = as_tensor(train_states, "train_states", ndim=3)
    n_pairs = train.shape[0] * (train.shape[1] - 1 - h)
    scores = []
    for fit in sweep_fits() if fits is None else fits:
        rank, n_features = fit["rank"], train.shape[2] * (h + 1) + fit["constant"]
        if isinstance(rank, int) and not isinstance(rank, bool) and rank > min(n_pairs,
                                                                               n_features):
            continue
        target, error = rollout_errors(train_states, val_states, h, out_width=out_width,
                                       fitter=fitter, **fit)
        scores.append(first_order_flips(tail, target, error))
    if not scores:
        raise ValueError(f"no fit of h={h} is possible: every rank in fits exceeds the data's "
                         f"min(pairs, features); pass smaller ranks.")
    return {"flip": min(s["flip"] for s in scores),
            "flip_margin": min(s["margin"] for s in scores)}


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
                out_width: int | None = None, tail: torch.nn.Module | None = None, fits=None,
                **options) -> list[dict]:
    """:func:`drop_scores` of every delay h of one scaled layer, one cell per h.

    ``delays``: the h to score (default every h with at least one linear step). ``options`` go
    to :func:`drop_scores`. With ``tail`` (the scaled network after s_{T-1}), each cell also
    gets :func:`flip_score` over ``fits``. Shape: train_states [B, T, W], val_states [B', T, W].
    """
    n_states = as_tensor(train_states, "train_states", ndim=3).shape[1]
    delays = range(n_states - 1) if delays is None else delays
    cells = []
    for h in delays:
        scores = drop_scores(train_states, val_states, h, out_width=out_width, **options)
        if tail is not None:
            scores |= flip_score(train_states, val_states, h, tail, fits=fits,
                                 out_width=out_width)
        cells.append({"layer": layer, "h": h, "linear_steps": n_states - 1 - h, **scores})
    return cells


def calibrated_threshold(calibration: dict, score: str, tolerance: float) -> tuple[float, dict]:
    """The score threshold for ``tolerance`` (a fraction of accuracy) and what it came from.

    ``calibration`` holds ``cells`` with the score and a measured ``drop`` (such as
    benchmarks/results/predict_drop.json), calibrated here with :func:`calibrate`; or, as
    :data:`BUILTIN_CALIBRATION`, ``thresholds`` per tolerance, the largest tolerance not above
    ``tolerance`` being used; or it is :data:`FIRST_ORDER_BOUND` (flip only: the threshold is
    ``tolerance``). Returns (threshold, a record of the calibration for the output).
    """
    tolerance = check_float(tolerance, "tolerance", low=0.0)
    record = {"source": calibration.get("source", "calibration"), "score": score}
    if calibration.get("bound"):
        if score != "flip":
            raise ValueError(f"the first-order bound thresholds the flip score, not {score!r}; "
                             "pass --score flip, or a calibration for the score.")
        return tolerance, {**record, "tolerance": tolerance, "threshold": tolerance}
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
