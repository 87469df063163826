"""Depth as a trajectory on a residual MLP for MNIST (issue 12, items 4 and 5).

A residual MLP as in the Koopman-autoencoder paper (input Linear 784 -> d, ``n_blocks``
pre-norm blocks ``x + fc2(GELU(fc1(LayerNorm(x))))`` named ``blocks.0..``, head LayerNorm +
Linear) is trained on the clean MNIST training split. Its residual stream s_0..s_T is a
trajectory, so the last k blocks can be replaced, with nothing trained, by

- ``delay DMD``: :class:`koopnet.depth.DepthHybrid` with d delays, fitted on the states from
  s_{h-d} on (h = T - k blocks still run); d, rank and Tikhonov are chosen on validation;
- ``identity``: the blocks are skipped (output s_h), the baseline that skipping is;
- ``least squares``: the closed-form affine map s_h -> s_T (ReplaceMe-style);
- ``ridge``: the same map with an L2 penalty chosen on validation;
- ``learned lifting`` (for the spans in ``grid["lifting_spans"]``): the state s_h plus a
  learned encoder psi(s_h) of ``lifting_ratio`` x W features
  (:class:`koopnet.learned.LearnedObservable` with ``encoder_input="state"``: Linear W -> W,
  GELU, Linear W -> rW, GELU, trained on the training states as a Koopman autoencoder), then a
  DMD over the span refitted in closed form on the lifted states. With r = 1, psi costs 2 W^2
  multiply-adds, one block's: that is the nonlinear work left, reported beside one block's
  (``nonlinear_macs``, ``block_macs``).

Every setting is chosen on the validation split; the test split only scores the selected
row, so scrambling the test labels cannot change a selection. The per-block linearity profile
(:func:`linearity_profile`) puts closed-form scores of every span beside the accuracy measured
when the span is replaced by its least-squares map.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from koopnet.depth import DepthHybrid, collect_depth_states
from koopnet.dmd import DMD, PairStatistics
from koopnet.learned import LearnedObservable
from koopnet.models import TrainConfig, accuracy, model_device
from koopnet.observables import TimeDelay, snapshot_pairs

__all__ = ["AffineMap", "ResidualBlock", "ResidualMLP", "affine_fit", "block_names",
           "lifting_parts", "linearity_profile", "replace_span", "sweep_spans",
           "train_residual"]


# ----------------------------------------------------------------------------- the model


class ResidualBlock(nn.Module):
    """Pre-norm residual block x + fc2(GELU(fc1(LayerNorm(x)))); keeps the width."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm, self.fc1, self.fc2 = nn.LayerNorm(width), nn.Linear(width, width), \
            nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(nn.functional.gelu(self.fc1(self.norm(x))))


class ResidualMLP(nn.Module):
    """Linear n_in -> width, ``n_blocks`` residual blocks, LayerNorm + Linear head.

    Shape: x [n, n_in] -> logits [n, n_out]; the residual stream is [n, width].
    """

    def __init__(self, n_in: int = 784, width: int = 256, n_blocks: int = 4,
                 n_out: int = 10) -> None:
        super().__init__()
        self.embed = nn.Linear(n_in, width)
        self.blocks = nn.ModuleList([ResidualBlock(width) for _ in range(n_blocks)])
        self.norm, self.head = nn.LayerNorm(width), nn.Linear(width, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def block_names(model: nn.Module) -> list[str]:
    return [f"blocks.{i}" for i in range(len(model.blocks))]


def train_residual(model: nn.Module, X: torch.Tensor, y: torch.Tensor, config: TrainConfig, *,
                   seed: int) -> nn.Module:
    """AdamW with a one-cycle cosine schedule (peak ``config.lr``, 10% warm-up) over
    ``config.epochs`` of shuffled batches; the plateau fields of ``config`` are not used, since
    a fixed schedule over a few epochs beat a constant rate on validation."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, betas=config.betas,
                                  weight_decay=config.weight_decay)
    steps = config.epochs * math.ceil(len(X) / config.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.lr,
                                                   total_steps=steps, pct_start=0.1)
    model.train()
    for _ in range(config.epochs):
        order = torch.randperm(len(X), generator=generator, device="cpu")  # any device alike
        for start in range(0, len(X), config.batch_size):
            idx = order[start:start + config.batch_size]
            loss = nn.functional.cross_entropy(model(X[idx]), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    return model.eval()


# ----------------------------------------------------------------------------- replacements


class AffineMap(nn.Module):
    """x -> x @ weight.T + bias, a closed-form replacement of a span of blocks (kept in
    float64, applied in the input's dtype)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("weight", weight.to(torch.float64))
        self.register_buffer("bias", bias.to(torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.T.to(x.dtype) + self.bias.to(x.dtype)


def affine_fit(X: torch.Tensor, Y: torch.Tensor, ridge: float = 0.0):
    """Least-squares affine map Y ~ X W^T + b in float64, fitted on centred data (the
    intercept b = mean(Y) - mean(X) W^T is never penalised).

    ``ridge`` = 0: the minimum-norm least-squares W, the pseudo-inverse of the centred X with
    singular values below rcond * s_max dropped, rcond = sqrt(D) * eps of X's dtype as given.
    The cutoff follows the data's precision because float32 states carry the rounding of the
    float32 arithmetic that produced them, which casting to float64 does not remove: a column
    that is a combination of others up to that rounding (a duplicate, or flattened ViT tokens,
    an affine image of fewer pixels) leaves singular values at about eps * s_max, spread over
    up to sqrt(D), which a plain solve inverts into weights that amplify the rounding of
    held-out states. (max(n, D) * eps of float64, lstsq's default, sits far below float32
    rounding; D * eps of float32 would cut real low-variance directions of wide states.) A
    well-conditioned design keeps every singular value and gets the plain least-squares map.

    ``ridge`` > 0 penalises ||W||^2 with lambda = ridge * trace(Xc^T Xc) / D on centred data,
    so one grid of values suits every span's scale.
    Shape: X [n, D], Y [n, W] -> weight [W, D], bias [W].
    """
    rcond = X.shape[1] ** 0.5 * torch.finfo(X.dtype).eps
    X, Y = X.to(torch.float64), Y.to(torch.float64)
    mx, my = X.mean(0), Y.mean(0)
    Xc, Yc = X - mx, Y - my
    if ridge == 0.0:
        weight = (torch.linalg.pinv(Xc, rtol=rcond) @ Yc).T
        return weight, my - mx @ weight.T
    gram = Xc.T @ Xc
    lam = ridge * torch.trace(gram) / gram.shape[0]
    eye = torch.eye(len(gram), dtype=X.dtype, device=X.device)
    weight = torch.linalg.solve(gram + lam * eye, Xc.T @ Yc).T
    return weight, my - mx @ weight.T


def replace_span(model: nn.Module, first: int, last: int, module: nn.Module | None):
    """A copy of ``model`` whose blocks first..last become ``module`` then identities
    (``module`` None: all identities, i.e. the span is skipped); ``module`` moves to the
    model's device."""
    copied = copy.deepcopy(model)
    module = None if module is None else module.to(model_device(copied))
    for i in range(first, last + 1):
        copied.blocks[i] = module if (i == first and module is not None) else nn.Identity()
    return copied.eval()


# ----------------------------------------------------------------------------- the sweep


def _hybrid(model, names, states, h, d, constant):
    """Observable and pair statistics of the delay-DMD with d delays replacing blocks h..end."""
    sub = states[:, h - d:].to(torch.float64)  # [N, T - h + d + 1, W]
    observable = TimeDelay(d, constant=constant).fit(sub[:1])
    X, Y = snapshot_pairs(observable.transform(sub))
    return observable, PairStatistics.from_pairs(X, Y)


_LIFTING_KEYS = ("lifting_ratio", "lifting_seed", "lifting_steps", "nonlinear_macs",
                 "block_macs")
#: the lifting's training: full-rank batches (more pairs than lifted features); psi's hidden
#: width is W (set in _lifting)
LIFTING = {"activation": "gelu", "encoder_input": "state", "constant": True,
           "n_steps": 600, "batch_size": 2048, "lr": 3e-3}


def lifting_parts(states, h: int, *, latent: int, hidden: int, seed: int, n_steps: int,
                  training: dict = LIFTING):
    """A learned lifting of s_h..s_T (psi reads the newest state, trained with ``training``'s
    settings) and the pair statistics of its lifted trajectories, which every Tikhonov value's
    DMD refits from. Shape: states [N, T+1, W]."""
    sub = states[:, h:]  # [N, T - h + 1, W]
    observable = LearnedObservable(0, latent_dims=latent, hidden=hidden, seed=seed,
                                   **{**training, "n_steps": n_steps}).fit(sub)
    X, Y = snapshot_pairs(observable.transform(sub.to(torch.float64)))
    return observable, PairStatistics.from_pairs(X, Y)


def _lifting(states, h, ratio: int, seed: int, n_steps: int):
    """The residual MLP's lifting: psi W -> W -> ratio W (one block's work at ratio 1)."""
    width = states.shape[2]
    return lifting_parts(states, h, latent=ratio * width, hidden=width, seed=seed,
                         n_steps=n_steps)


def _lifted_hybrid(model, names, h: int, observable, stats, tikhonov: float) -> DepthHybrid:
    """The lifting's hybrid of blocks h..end with the DMD refitted at ``tikhonov``."""
    dmd = DMD(None, tikhonov=tikhonov, exact_rollout=True).fit_statistics(stats)
    return DepthHybrid(model, names[h:], observable, dmd).eval()


def _lifting_rows(add, model, names, states, span, grid) -> None:
    h, width = len(names) - span, states.shape[2]
    settings = {"lifting_ratio": grid["lifting_ratio"], "lifting_seed": grid.get("seed", 0),
                "lifting_steps": grid.get("lifting_steps", LIFTING["n_steps"])}
    observable, stats = _lifting(states, h, settings["lifting_ratio"],
                                 settings["lifting_seed"], settings["lifting_steps"])
    costs = {**settings, "nonlinear_macs": observable.nonlinear_macs(width),
             "block_macs": 2 * width * width}  # ResidualBlock: fc1 and fc2, W x W each
    for tikhonov in grid["tikhonovs"]:
        hybrid = _lifted_hybrid(model, names, h, observable, stats, tikhonov)
        add(span, "learned lifting", hybrid, n_delays=0, rank=hybrid.rank_,
            tikhonov=tikhonov, **costs)


def sweep_spans(model, states, val, grid: dict, log=None) -> tuple[list[dict], dict]:
    """Every method and setting for every span of last blocks, scored on validation only.

    ``states`` [N, T+1, W] are training-split depth states; ``grid`` holds ``delays`` (None:
    all possible), ``ranks``, ``tikhonovs``, ``ridges`` and optionally ``lifting_spans``,
    ``lifting_ratio`` and ``seed`` (the learned lifting's). Returns one row per setting with
    span (number of replaced blocks), method, n_delays, rank, tikhonov, ridge, val_accuracy,
    and the replaced model of the best row per (span, method) (the first wins a tie, as in
    :func:`select`).
    """
    names = block_names(model)
    T = len(names)
    rows, best = [], {}

    def add(span, method, hybrid, **settings):
        acc = accuracy(hybrid, val.X, val.y)
        if (span, method) not in best or acc > best[span, method][0]:
            best[span, method] = (acc, hybrid)
        rows.append({"span": span, "method": method, "n_delays": settings.get("n_delays"),
                     "rank": settings.get("rank"), "tikhonov": settings.get("tikhonov"),
                     "rank_setting": settings.get("rank_setting"),
                     "ridge": settings.get("ridge"), "val_accuracy": acc,
                     **{k: settings[k] for k in _LIFTING_KEYS if k in settings}})

    for span in range(1, T + 1):
        h = T - span
        add(span, "identity", replace_span(model, h, T - 1, None))
        for ridge in (0.0, *grid["ridges"]):
            weight, bias = affine_fit(states[:, h], states[:, T], ridge)
            add(span, "ridge" if ridge else "least squares",
                replace_span(model, h, T - 1, AffineMap(weight, bias)), ridge=ridge or None)
        delays = [d for d in (grid["delays"] or range(h + 1)) if d <= h]
        for d in delays:
            observable, stats = _hybrid(model, names, states, h, d, constant=True)
            for rank in grid["ranks"]:
                for tikhonov in grid["tikhonovs"]:
                    dmd = DMD(rank, tikhonov=tikhonov, exact_rollout=True).fit_statistics(stats)
                    hybrid = DepthHybrid(model, names[h - d:], observable, dmd).eval()
                    add(span, "delay DMD", hybrid, n_delays=d, rank=dmd.rank_,
                        rank_setting=rank, tikhonov=tikhonov)
        if span in grid.get("lifting_spans", ()):
            _lifting_rows(add, model, names, states, span, grid)
        if log is not None:
            log(f"span {span}: {len(rows)} settings scored")
    return rows, {key: hybrid for key, (_, hybrid) in best.items()}


def select(rows: list[dict]) -> list[dict]:
    """The best row per (span, method) by validation accuracy; the first wins a tie."""
    best: dict = {}
    for row in rows:
        key = (row["span"], row["method"])
        if key not in best or row["val_accuracy"] > best[key]["val_accuracy"]:
            best[key] = row
    return list(best.values())


def rebuild(model, states, row: dict) -> nn.Module:
    """The replaced model a row describes, refitted (the fits are deterministic)."""
    names = block_names(model)
    T, h = len(names), len(names) - row["span"]
    if row["method"] == "identity":
        return replace_span(model, h, T - 1, None)
    if row["method"] in ("least squares", "ridge"):
        weight, bias = affine_fit(states[:, h], states[:, T], row["ridge"] or 0.0)
        return replace_span(model, h, T - 1, AffineMap(weight, bias))
    if row["method"] == "learned lifting":
        observable, stats = _lifting(states, h, row["lifting_ratio"], row["lifting_seed"],
                                     row["lifting_steps"])
        return _lifted_hybrid(model, names, h, observable, stats, row["tikhonov"])
    d = row["n_delays"]
    observable, stats = _hybrid(model, names, states, h, d, constant=True)
    dmd = DMD(row["rank_setting"], tikhonov=row["tikhonov"],
              exact_rollout=True).fit_statistics(stats)
    return DepthHybrid(model, names[h - d:], observable, dmd).eval()


# ----------------------------------------------------------------------------- the profile


def _r2(pred: torch.Tensor, target: torch.Tensor, baseline: torch.Tensor) -> float:
    """1 - SS_res / SS_tot of ``target - baseline`` (baseline 0: plain R^2 of the target)."""
    centred = (target - baseline) - (target - baseline).mean(0)
    return float(1 - ((target - pred) ** 2).sum() / (centred ** 2).sum())


def linearity_profile(model, states, val_states, val) -> list[dict]:
    """For every contiguous span of blocks i..j: least-squares R^2 of s_i -> s_{j+1} on
    held-out states (plain, and of the update s_{j+1} - s_i, which the skip connection does
    not inflate), the one-step DMD relative residual on held-out pairs inside the span, and
    the validation accuracy when the span is replaced by its least-squares map."""
    T = len(block_names(model))
    rows = []
    for i in range(T):
        for j in range(i, T):
            weight, bias = affine_fit(states[:, i], states[:, j + 1])
            x, y = val_states[:, i].double(), val_states[:, j + 1].double()
            pred = x @ weight.T + bias
            sub, held = states[:, i:j + 2], val_states[:, i:j + 2]
            observable = TimeDelay(0, constant=True).fit(sub[:1])
            dmd = DMD(exact_rollout=True).fit_statistics(
                PairStatistics.from_pairs(*snapshot_pairs(observable.transform(sub.double()))))
            step = dmd.transition(1, observable.readout(sub.shape[2]).to(torch.float64))
            hx = observable.transform(held.double())  # [n, j-i+2, D]
            one_step = hx[:, :-1] @ step.T  # [n, j-i+1, W]
            residual = (one_step - held[:, 1:].double()).norm() / held[:, 1:].double().norm()
            replaced = replace_span(model, i, j, AffineMap(weight, bias))
            rows.append({"first": i, "last": j, "blocks": j - i + 1,
                         "ls_r2": _r2(pred, y, torch.zeros((), device=y.device)),
                         "ls_r2_update": _r2(pred, y, x),
                         "dmd_residual": float(residual),
                         "val_accuracy_ls": accuracy(replaced, val.X, val.y)})
    return rows


def depth_states(model, X, batch_size: int = 2048) -> torch.Tensor:
    """s_0..s_T of every sample (float32, CPU). Shape: [n, T+1, width]."""
    return collect_depth_states(model, block_names(model), X, batch_size=batch_size)
