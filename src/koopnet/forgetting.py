"""Forgetting a class in closed form: edit the hybrid's linear read-out g -> p, no gradient steps.

The hybrid reads its predicted state out of the lifted state as p = linear_map g ([w'] from [D]),
then runs the nonlinear tail. Every method here replaces that map by an affine one, p' = M g + b,
fitted on training data; M becomes the new ``linear_map`` and b is folded where the map meets a
constant: the constant feature of the lifted state when the observable has one, else the bias of
the tail's first ``nn.Linear`` (the tail computes the same on p' either way). Operator and basis
are kept; the result holds no DMD (it would no longer match the map).

Methods (c the forgotten class, "kept" every other sample, m and mu the class means of g and p):

- ``"erase"``: the affine edit with the least mean squared change of the kept samples' p that
  makes c's mean of p' equal the kept mean (the class indicator's cross-covariance with p' is
  zero, so no linear probe on p' beats a constant at telling c from the rest). It is an oblique
  projection of the lifted state, g' = g - dm a^T (g - m_kept) / a^T dm, dm = m_c - m_kept,
  a = S^+ dm with S the kept samples' covariance of g; kept means stay where they were.
- ``"leace"``: LEACE (Belrose et al. 2023) of the class indicator at p itself: the affine map of p
  with the least mean squared change over all samples under the same constraint,
  p' = p - s s^T C^+ (p - mu) / (s^T C^+ s), s the cross-covariance, C the covariance of p.
- ``"reassign"``: the affine least-squares map whose targets are the kept samples' own p and, for
  each sample of c, the mean p of the kept class the network ranks next for it; refitted with
  weights x3 for the samples the edit still gets wrong (a class sample still predicted as c, a
  kept sample now misclassified), as ``"redirect"`` does.
- ``"reassign-erase"``: ``"reassign"``, then ``"erase"`` on its output, the re-weighting judged on
  the erased edit.
- ``"reassign-match"``: aimed at a multinomial probe, which can still isolate a class whose mean
  sits between the kept classes (where ``"erase"`` puts it). The samples of c are shared among
  the kept classes in proportion to their sizes (greedily, the network's most confident first);
  each share's targets are its kept class's mean p, and the least-squares fit is solved under
  the linear constraint that each share's mean of p' equals its class's mean, so c's mean of p'
  is (up to rounding of the shares) the kept mean and each share hides inside a kept class;
  re-weighted as ``"reassign"``. The default: chosen on the validation split in
  ``benchmarks/forgetting.py``.
- ``"redirect"``: koopnet's first edit: the starting state of the roll-out is changed by weighted
  ridge least squares towards the p of each class sample's nearest kept sample.

Erasure removes the class from the means of p' only; the tail is nonlinear, so probe the
penultimate features of the result, on held-out data, before relying on it. The algebra runs on
the CPU in float64.
"""

from __future__ import annotations

import torch
from torch import nn

from koopnet._checks import as_tensor, check_choice, check_float, check_int
from koopnet.editing import (
    _F64,
    _buffers,
    _labels,
    _lifted,
    _logits,
    _tail_logits,
    _with_buffers,
)
from koopnet.hybrid import KoopmanHybrid

__all__ = ["METHODS", "forget_class"]

METHODS = ("reassign-match", "reassign-erase", "erase", "leace", "reassign", "redirect")


def _solve(gram: torch.Tensor, rhs: torch.Tensor, ridge: float) -> torch.Tensor:
    """(gram + ridge max(diag) I)^-1 rhs, the damped normal equations of every fit here."""
    damping = ridge * max(float(gram.diagonal().max()), 1e-300)
    return torch.linalg.solve(gram + damping * torch.eye(len(gram), **_F64), rhs)


def _erasure(lifted: torch.Tensor, forget: torch.Tensor, ridge: float):
    """What ``"erase"`` needs of the data, (a, dm, kept mean) (see the module docs), or None
    when dm = 0 (the class means of g, hence of p, already coincide). Shape: lifted [n, D]."""
    kept_mean = lifted[~forget].mean(0)
    gap = lifted[forget].mean(0) - kept_mean  # dm [D]
    centred = lifted[~forget] - kept_mean
    a = _solve(centred.T @ centred / len(centred), gap, ridge)  # S^+ dm [D]
    return (a, gap, kept_mean) if float(a @ gap) > 0 else None


def _erase(M: torch.Tensor, b: torch.Tensor, erasure) -> tuple[torch.Tensor, torch.Tensor]:
    """(M', b') of ``"erase"`` applied after p = M g + b. Shape: M [w', D]."""
    if erasure is None:
        return M, b
    a, gap, kept_mean = erasure
    shift = M @ gap / float(a @ gap)  # [w']
    return M - shift[:, None] * a[None, :], b + shift * float(a @ kept_mean)


def _leace(lifted: torch.Tensor, forget: torch.Tensor, M: torch.Tensor,
           b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(M', b') of ``"leace"``: p' = (I - E) p + E mu with E = s s^T C^+ / s^T C^+ s."""
    predicted = lifted @ M.T + b  # [n, w']
    mean = predicted.mean(0)
    centred = predicted - mean
    z = forget.to(torch.float64)
    s = centred.T @ (z - z.mean()) / len(z)  # cross-covariance [w']
    whitened = torch.linalg.pinv(centred.T @ centred / len(z), hermitian=True) @ s
    along = float(s @ whitened)
    if not along > 0:
        return M, b
    E = s[:, None] * whitened[None, :] / along  # [w', w']
    return M - E @ M, b - E @ b + E @ mean


def _reweigh(w: torch.Tensor, predicted_class: torch.Tensor, y: torch.Tensor, c: int):
    """Weights x3 for a class sample still predicted as it and for a kept sample now wrong."""
    forget = y == c
    return w * torch.where((forget & (predicted_class == c)) | (~forget & (predicted_class != y)),
                           3.0, 1.0)


def _shares(logits: torch.Tensor, y: torch.Tensor, c: int) -> list[tuple[torch.Tensor, int]]:
    """The samples of c shared among the kept classes in proportion to the kept classes' sizes:
    (sample, class) pairs are taken greedily, the network's most confident first (its
    log-softmax over the kept classes), each class up to its share. Returns (mask [n], k) for
    every non-empty share. Proportional shares put c's mean of p' on the kept mean once each
    share's mean sits on its class's mean."""
    kept = [k for k in y.unique().tolist() if k != c]
    members = (y == c).nonzero().flatten()
    sizes = torch.tensor([int((y == k).sum()) for k in kept], **_F64)
    left = torch.floor(sizes / sizes.sum() * len(members)).long()
    left[sizes.argmax()] += len(members) - int(left.sum())
    scores = logits[members][:, kept].log_softmax(1)  # [n_c, kept]
    owner = [-1] * len(members)
    for pair in scores.flatten().argsort(descending=True, stable=True).tolist():
        i, j = divmod(pair, len(kept))
        if owner[i] < 0 and left[j] > 0:
            owner[i], left[j] = j, left[j] - 1
    owner = torch.tensor(owner, device="cpu")
    shares = []
    for j, k in enumerate(kept):
        mask = torch.zeros_like(y, dtype=torch.bool)
        mask[members[owner == j]] = True
        if mask.any():
            shares.append((mask, k))
    return shares


def _runner_up_shares(logits: torch.Tensor, y: torch.Tensor, c: int):
    """The samples of c grouped by the kept class the network ranks next: (mask [n], k)."""
    present = torch.zeros(logits.shape[1], dtype=torch.bool, device="cpu")
    present[y.unique()] = True
    present[c] = False
    runner_up = logits.masked_fill(~present, -torch.inf).argmax(1)  # best kept class
    return [((y == c) & (runner_up == k), k) for k in present.nonzero().flatten().tolist()]


def _match(M: torch.Tensor, gram: torch.Tensor, gaps: torch.Tensor, ridge: float):
    """The least-squares fit M under M G = 0, i.e. M - M G (G^T H^+ G)^+ G^T H^+ with H the
    fit's weighted gram: each share's mean of p' lands on its kept class's mean.
    Shape: M [w', D], gram [D, D], gaps G [D, shares]."""
    whitened = _solve(gram, gaps, ridge)  # H^+ G [D, J]
    return M - (M @ gaps) @ torch.linalg.pinv(gaps.T @ whitened) @ whitened.T


class _Moments:
    """Weighted moments of the pairs (g_i, t_i) about their unweighted means, kept up to date
    as weights change: a re-weighting touches only the samples whose weight moved, so each
    round after the first costs those samples instead of all n. Shape: g [n, D], t [n, w']."""

    def __init__(self, lifted: torch.Tensor, targets: torch.Tensor) -> None:
        self.centre = lifted.mean(0), targets.mean(0)
        self.d, self.e = lifted - self.centre[0], targets - self.centre[1]
        self.dd, self.de = self.d.T @ self.d, self.d.T @ self.e  # sum w d d^T, sum w d e^T
        self.sd, self.se = self.d.sum(0), self.e.sum(0)
        self.total = float(len(lifted))

    def reweigh(self, change: torch.Tensor) -> None:
        """Add ``change`` [n] to the weights (zero for the samples that keep theirs)."""
        moved = change.nonzero().flatten()
        d, e, dw = self.d[moved], self.e[moved], change[moved, None]
        self.dd += (d * dw).T @ d
        self.de += (d * dw).T @ e
        self.sd += (d * dw).sum(0)
        self.se += (e * dw).sum(0)
        self.total += float(dw.sum())

    def centred(self):
        """(gram [D, D], cross [D, w']) about the weighted means, and those means of g and t."""
        g_bar, t_bar = self.sd / self.total, self.se / self.total
        gram = self.dd - self.total * torch.outer(g_bar, g_bar)
        cross = self.de - self.total * torch.outer(g_bar, t_bar)
        return gram, cross, self.centre[0] + g_bar, self.centre[1] + t_bar


def _reassign(hybrid, lifted: torch.Tensor, y: torch.Tensor, c: int, linear_map: torch.Tensor,
              *, finish: str, rounds: int, ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, b) of ``"reassign"`` (``finish`` "none"), ``"reassign-erase"`` ("erase": then
    ``"erase"``) or ``"reassign-match"`` ("match": proportional shares, constrained fit): a
    weighted, centred ridge least-squares fit of the targets on g, re-weighted
    (:func:`_reweigh`) by what the whole edit predicts, ``rounds`` fits in all."""
    predicted = lifted @ linear_map.T  # [n, w']
    logits = _tail_logits(hybrid, predicted)
    share_of = _shares if finish == "match" else _runner_up_shares
    shares = share_of(logits, y, c)
    targets = predicted.clone()
    for mask, k in shares:
        targets[mask] = predicted[y == k].mean(0)
    if finish == "match":  # what the constraint M G = 0 closes, one column per share
        gaps = torch.stack([lifted[mask].mean(0) - lifted[y == k].mean(0)
                            for mask, k in shares], 1)  # [D, shares]
    erasure = _erasure(lifted, y == c, ridge) if finish == "erase" else None
    w = torch.ones(len(y), **_F64)
    moments = _Moments(lifted, targets)
    for round_ in range(rounds):
        gram, cross, g_mean, t_mean = moments.centred()
        M = _solve(gram, cross, ridge).T  # [w', D]
        if finish == "match":
            M = _match(M, gram, gaps, ridge)
        b = t_mean - M @ g_mean
        if finish == "erase":
            M, b = _erase(M, b, erasure)
        if round_ < rounds - 1:
            new_w = _reweigh(w, _logits(hybrid, lifted, M, b).argmax(1), y, c)
            moments.reweigh(new_w - w)
            w = new_w
    return M, b


def _redirect(hybrid, lifted, y, c, basis, linear_map, *, weight, rounds, ridge):
    """``"redirect"``: linear_map + C B with C = linear_map V (a change B g of the starting
    state), fitted by weighted ridge least squares; ``rounds`` - 1 re-weightings
    (:func:`_reweigh`) follow, one [D, D] solve each."""
    forget = y == c
    predicted = lifted @ linear_map.T  # [n, w']
    kept = predicted[~forget]
    nearest = torch.cdist(predicted[forget], kept).argmin(1)
    change = torch.zeros_like(predicted)
    change[forget] = kept[nearest] - predicted[forget]  # targets minus predictions
    C = linear_map @ basis  # [w', R]
    onto = C @ torch.linalg.pinv(C)  # projector onto the maps a starting-state edit can reach
    w = torch.ones(len(y), **_F64)
    w[forget] = weight
    new_map = linear_map
    for _ in range(rounds):
        delta = _solve((lifted * w[:, None]).T @ lifted, (lifted * w[:, None]).T @ change,
                       ridge).T
        new_map = linear_map + onto @ delta  # [w', D]
        w = _reweigh(w, _logits(hybrid, lifted, new_map).argmax(1), y, c)
    return new_map


def _leading(tail: nn.Module) -> nn.Module:
    return tail[0] if isinstance(tail, nn.Sequential) and len(tail) else tail


def _first_linear(tail: nn.Module) -> nn.Linear | None:
    first = _leading(tail)
    return first if isinstance(first, nn.Linear) and first.bias is not None else None


def _check_offset_target(hybrid: KoopmanHybrid, method: str) -> None:
    if getattr(hybrid.observable, "constant", False) or _first_linear(hybrid.tail) is not None:
        return
    raise ValueError(f"forget_class(method={method!r}) shifts the predicted state by a constant, "
                     "which needs a lifted state with a constant feature (an observable with "
                     "constant=True) or a tail starting with an nn.Linear with a bias; this "
                     f"tail starts with {type(_leading(hybrid.tail)).__name__}. "
                     "Use method='redirect', or fit the hybrid with a constant observable.")


def _fold_offset(new: KoopmanHybrid, offset: torch.Tensor) -> None:
    """Add the constant ``offset`` [w'] to p in ``new`` (a copy): onto the constant feature's
    column of ``linear_map``, else into the tail's first Linear (bias += W offset)."""
    with torch.no_grad():
        if getattr(new.observable, "constant", False):  # the constant is the last feature
            column = new.linear_map[:, -1]
            column += offset.to(column.device, column.dtype)
            return
        linear = _first_linear(new.tail)
        weight = linear.weight.detach().to(**_F64)
        shift = weight @ offset
        linear.bias += shift.to(linear.bias.device, linear.bias.dtype)


def forget_class(hybrid: KoopmanHybrid, class_index: int, X, y, *,
                 method: str = "reassign-match", ridge: float = 1e-8,
                 weight: float | None = None, rounds: int | None = None) -> KoopmanHybrid:
    """A new hybrid whose linear read-out is edited in closed form (no gradient steps) so that
    it forgets class ``class_index``; ``hybrid`` is left untouched.

    ``method``: one of :data:`METHODS` (see the module docs); each is fitted on (X, y), the
    training data. ``ridge``: relative damping of every least-squares solve. ``rounds``
    (default 4): least-squares fits of ``"reassign-erase"``, ``"reassign"``,
    ``"reassign-match"`` and ``"redirect"``,
    each re-weighted by what the previous edit predicts; ``weight`` (default 10, how many times
    a class sample counts at first) belongs to ``"redirect"`` only. With ``"erase"``,
    ``"leace"`` and ``"reassign-erase"`` the class's mean of the edited predicted state equals
    the other samples' mean on (X, y); with ``"reassign-match"`` each share of the class has
    the mean of its kept class. The edit is affine in g, so it forgets the class only as
    far as g separates it linearly: score the result on held-out data, and probe its features,
    before relying on it. The least-squares methods cost one [D, D] Gram matrix over the n
    samples (a re-weighting then touches only the samples whose weight changed): where n D^2
    is too slow, pass a random subset of (X, y).
    Shape: X [n, features], y [n]; the result maps inputs to logits as ``hybrid`` does.
    """
    if not isinstance(hybrid, KoopmanHybrid):
        raise TypeError(f"forget_class needs a KoopmanHybrid; got {type(hybrid).__name__}.")
    method = check_choice(method, "method", METHODS)
    if method != "redirect" and weight is not None:
        raise ValueError(f"weight= belongs to method='redirect'; method={method!r} does not "
                         "take it. Drop it or pass method='redirect'.")
    if method in ("erase", "leace") and rounds is not None:
        raise ValueError(f"rounds= belongs to the least-squares methods ('reassign-erase', "
                         f"'reassign', 'reassign-match', 'redirect'); method={method!r} is one "
                         "closed-form step. "
                         "Drop rounds=.")
    if method != "redirect":
        _check_offset_target(hybrid, method)
    X = as_tensor(X, "X")
    y = _labels(y, len(X))
    ridge = check_float(ridge, "ridge", low=0.0)
    basis, operator, linear_map, _ = _buffers(hybrid)
    lifted = _lifted(hybrid, X)  # [n, D]
    n_classes = _logits(hybrid, lifted[:1], linear_map).shape[1]
    c = check_int(class_index, "class_index", low=0, high=n_classes - 1)
    forget = y == c
    if not forget.any() or forget.all():
        raise ValueError(f"forget_class needs samples of class {c} and of the other classes in "
                         f"y; got {int(forget.sum())} of {len(y)} in class {c}.")
    rounds = check_int(4 if rounds is None else rounds, "rounds", low=1)
    if method == "redirect":
        weight = check_float(10.0 if weight is None else weight, "weight", low=0.0)
        new_map = _redirect(hybrid, lifted, y, c, basis, linear_map, weight=weight,
                            rounds=rounds, ridge=ridge)
        return _with_buffers(hybrid, operator, new_map, None)
    if method == "leace":
        new_map, offset = _leace(lifted, forget, linear_map, torch.zeros_like(linear_map[:, 0]))
    elif method == "erase":
        new_map, offset = _erase(linear_map, torch.zeros_like(linear_map[:, 0]),
                                 _erasure(lifted, forget, ridge))
    else:
        finish = {"reassign-erase": "erase", "reassign-match": "match"}.get(method, "none")
        new_map, offset = _reassign(hybrid, lifted, y, c, linear_map, ridge=ridge,
                                    finish=finish, rounds=rounds)
    new = _with_buffers(hybrid, operator, new_map, None)
    _fold_offset(new, offset)
    return new
