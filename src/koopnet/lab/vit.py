"""Depth as a trajectory in a small vision transformer on MNIST (issue 12, items 4 and 5).

The model: 7x7 patches of a 28x28 image -> 16 tokens + a CLS token, width 64, pre-norm blocks
``x + Attn(LN(x))``, ``x + MLP(LN(x))`` named ``blocks.0..``, each acting on [B, 17, 64], and a
head (LayerNorm + Linear) on the CLS token. Its residual stream s_0..s_T is a trajectory, so
the last k blocks can be replaced, with nothing trained, by

- ``DMD/pos`` and ``DMD/flat``: :class:`koopnet.depth.DepthHybrid` with d delays, per position
  (tokens are samples over the 64 features, one shared operator) or over the flattened state
  (17*64 features, an operator that can mix tokens as attention does);
- ``identity``: the blocks are skipped (output s_h);
- ``LS/pos``, ``LS/flat``: the closed-form affine map s_h -> s_T (ReplaceMe-style);
- ``ridge/pos``, ``ridge/flat``: the same with an L2 penalty;
- ``lifting/flat`` (for the spans in ``grid["lifting_spans"]``): the flattened state s_h plus
  a learned encoder psi(s_h) of r features (:class:`koopnet.learned.LearnedObservable`,
  ``encoder_input="state"``: Linear 17*64 -> hidden, GELU, Linear hidden -> r, GELU, trained on
  the training states as a Koopman autoencoder), then a DMD over the span refitted in closed
  form on the lifted states. psi's multiply-adds are reported beside one block's
  (``nonlinear_macs``, ``block_macs``): the nonlinear work the hybrid keeps.

Every setting (delays, rank, Tikhonov, ridge) is chosen on the validation split. Selection
scores replacements from cached validation states (the head, or the blocks after a span, run
on the predicted state), which is what the replaced model computes; the selected rows are then
rebuilt as real modules (:class:`DepthHybrid`, :func:`koopnet.lab.residual.replace_span`),
scored on validation again (a check of the cached path) and on test, which therefore cannot
change any selection.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from koopnet.depth import DepthHybrid
from koopnet.dmd import DMD, PairStatistics
from koopnet.lab.residual import (
    AffineMap,
    affine_fit,
    block_names,
    lifting_parts,
    replace_span,
)
from koopnet.observables import TimeDelay, snapshot_pairs

__all__ = ["LIFTING", "FlatAffine", "ViT", "block_macs", "build_replacement",
           "linearity_profile", "sweep_spans", "train_vit", "vit_states"]

VIEWS = ("pos", "flat")
#: psi's training for ``lifting/flat`` (full-rank batches: more pairs than lifted features)
LIFTING = {"activation": "gelu", "encoder_input": "state", "constant": True,
           "batch_size": 1024, "lr": 3e-3}
_LIFTING_KEYS = ("lifting_latent", "lifting_hidden", "lifting_steps", "lifting_seed")


# ----------------------------------------------------------------------------- the model


class Attention(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads, self.qkv, self.proj = heads, nn.Linear(width, 3 * width), \
            nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, W = x.shape
        q, k, v = self.qkv(x).reshape(B, L, 3, self.heads, W // self.heads).permute(2, 0, 3, 1, 4)
        out = nn.functional.scaled_dot_product_attention(q, k, v)  # [B, heads, L, W/heads]
        return self.proj(out.transpose(1, 2).reshape(B, L, W))


class Block(nn.Module):
    """Pre-norm transformer block x + Attn(LN(x)), then x + MLP(LN(x)); keeps [B, L, W]."""

    def __init__(self, width: int, heads: int, mlp_ratio: int) -> None:
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(width), Attention(width, heads)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, mlp_ratio * width), nn.GELU(),
                                 nn.Linear(mlp_ratio * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def block_macs(width: int, tokens: int, mlp_ratio: int) -> int:
    """Multiply-adds of one :class:`Block` per sample: q, k, v and the output projection
    (4 W^2 per token), the MLP (2 m W^2 per token) and the attention scores and weighted sum
    (2 L W per token); the norms and softmax are left out."""
    return tokens * ((4 + 2 * mlp_ratio) * width * width + 2 * tokens * width)


class ViT(nn.Module):
    """Patches -> tokens + CLS + positions, ``depth`` blocks, head on the CLS token.

    Shape: x [n, 784] (flattened normalised images) -> logits [n, n_out]; the residual stream
    is [n, 17, width] (CLS first).
    """

    def __init__(self, width: int = 64, depth: int = 6, heads: int = 4, mlp_ratio: int = 2,
                 patch: int = 7, side: int = 28, n_out: int = 10) -> None:
        super().__init__()
        self.patch, self.side = patch, side
        n_tokens = (side // patch) ** 2
        self.embed = nn.Linear(patch * patch, width)
        self.cls = nn.Parameter(torch.zeros(1, 1, width, device="cpu"))  # built on the CPU
        self.pos = nn.Parameter(0.02 * torch.randn(1, n_tokens + 1, width, device="cpu"))
        self.blocks = nn.ModuleList([Block(width, heads, mlp_ratio) for _ in range(depth)])
        self.norm, self.head = nn.LayerNorm(width), nn.Linear(width, n_out)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """s_0: [n, 784] -> [n, 17, width]."""
        p, g = self.patch, self.side // self.patch
        patches = x.reshape(-1, g, p, g, p).permute(0, 1, 3, 2, 4).reshape(-1, g * g, p * p)
        tokens = self.embed(patches)
        return torch.cat([self.cls.expand(len(x), -1, -1), tokens], 1) + self.pos

    def tail(self, state: torch.Tensor, start: int) -> torch.Tensor:
        """Blocks ``start..`` and the head on a residual-stream state [n, 17, width]."""
        for block in self.blocks[start:]:
            state = block(state)
        return self.head(self.norm(state[:, 0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        state = self.tokens(x)
        for block in self.blocks:
            state = block(state)
        return self.head(self.norm(state[:, 0]))


def train_vit(model: ViT, train, val, *, epochs: int, lr: float = 2e-3, batch_size: int = 128,
              weight_decay: float = 0.05, seed: int = 0, log=None) -> tuple[ViT, dict]:
    """AdamW with a one-cycle cosine schedule over ``epochs``; after every epoch the model is
    scored on validation and the best epoch's weights are kept (epochs chosen on validation,
    never on test). Returns the model in eval mode and {epoch, val_accuracy, history}."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps = epochs * math.ceil(len(train.X) / batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps,
                                                   pct_start=0.1)
    best, history = (-1.0, 0, None), []
    for epoch in range(1, epochs + 1):
        model.train()
        order = torch.randperm(len(train.X), generator=generator, device="cpu")
        for start in range(0, len(train.X), batch_size):
            idx = order[start:start + batch_size]
            loss = nn.functional.cross_entropy(model(train.X[idx]), train.y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
        acc = score(model, val.X, val.y)
        history.append(acc)
        if log is not None:
            log(f"epoch {epoch}/{epochs}: val accuracy {acc:.4f}")
        if acc > best[0]:
            best = (acc, epoch, copy.deepcopy(model.state_dict()))
    model.load_state_dict(best[2])
    return model.eval(), {"epoch": best[1], "val_accuracy": best[0], "history": history}


@torch.no_grad()
def score(model: nn.Module, X: torch.Tensor, y: torch.Tensor, batch: int = 2048) -> float:
    model.eval()
    hits = sum(int((model(X[i:i + batch]).argmax(1) == y[i:i + batch]).sum())
               for i in range(0, len(X), batch))
    return hits / len(X)


@torch.no_grad()
def vit_states(model: ViT, X: torch.Tensor, batch: int = 2048) -> torch.Tensor:
    """s_0..s_T of every sample (float32). Shape: [n, T+1, 17, width]."""
    model.eval()
    out = []
    for i in range(0, len(X), batch):
        state = model.tokens(X[i:i + batch])
        chunk = [state]
        for block in model.blocks:
            state = block(state)
            chunk.append(state)
        out.append(torch.stack(chunk, 1))
    return torch.cat(out)


def view(states: torch.Tensor, kind: str) -> torch.Tensor:
    """[n, T+1, L, d] -> per position [n*L, T+1, d] or flattened [n, T+1, L*d]."""
    n, T1, L, d = states.shape
    if kind == "pos":
        return states.permute(0, 2, 1, 3).reshape(n * L, T1, d)
    return states.reshape(n, T1, L * d)


def unview(rows: torch.Tensor, n: int, L: int, d: int) -> torch.Tensor:
    """Predicted last states as rows ([n*L, d] or [n, L*d]) -> [n, L, d]."""
    return rows.reshape(n, L, d)


class FlatAffine(nn.Module):
    """An affine map over the whole flattened state: [B, L, d] -> [B, L, d].

    Its weights come from :func:`koopnet.lab.residual.affine_fit` on [n, L*d] states, a
    design that is rank-deficient up to float32 rounding where the state is an affine image
    of fewer inputs (s_0: 16 patches of 49 pixels, a constant CLS token and positions), so
    the fit drops singular values at the rounding level and returns the minimum-norm map.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        super().__init__()
        self.inner = AffineMap(weight, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x.reshape(len(x), -1)).reshape(x.shape)


# ----------------------------------------------------------------------------- the sweep


def _dmd_parts(rows: torch.Tensor, h: int, d: int):
    """Observable and pair statistics of the d-delay DMD over s_{h-d}..s_T (rows [N, T+1, W])."""
    sub = rows[:, h - d:].to(torch.float64)
    observable = TimeDelay(d, constant=True).fit(sub[:1])
    return observable, PairStatistics.from_pairs(*snapshot_pairs(observable.transform(sub)))


def _dmd_map(observable, dmd, steps: int) -> torch.Tensor:
    readout = observable.readout(observable.n_features_in_).to(torch.float64)
    return dmd.transition(steps, readout)  # [W, D]


def _predict_dmd(observable, linear_map, rows: torch.Tensor, h: int, d: int) -> torch.Tensor:
    lifted = observable.transform(rows[:, h - d:h + 1].to(torch.float64))[:, -1]
    return (lifted @ linear_map.T).to(torch.float32)


def _lifting_parts(rows: torch.Tensor, h: int, settings: dict):
    """The flattened lifting a row's settings describe (rows [N, T+1, W])."""
    return lifting_parts(rows, h, latent=settings["lifting_latent"],
                         hidden=settings["lifting_hidden"], seed=settings["lifting_seed"],
                         n_steps=settings["lifting_steps"], training=LIFTING)


@torch.no_grad()
def _tail_score(model: ViT, state: torch.Tensor, start: int, y: torch.Tensor) -> float:
    hits = sum(int((model.tail(state[i:i + 2048], start).argmax(1) == y[i:i + 2048]).sum())
               for i in range(0, len(state), 2048))
    return hits / len(state)


def sweep_spans(model: ViT, states: torch.Tensor, val_states: torch.Tensor, val_y, grid: dict,
                spans=None, log=None, liftings: dict | None = None) -> list[dict]:
    """Every method and setting for every span of last blocks, scored on validation only.

    ``states`` / ``val_states`` [n, T+1, 17, width] are training / validation depth states;
    ``grid`` holds ``delays``, ``ranks`` (per view: {"pos": [...], "flat": [...]}),
    ``tikhonovs``, ``ridges`` and optionally ``flat_delays`` (the flattened view's delays),
    ``lifting_spans`` with ``lifting_latent``, ``lifting_hidden``, ``lifting_steps`` and
    ``lifting_seed`` (the learned lifting's). One row per setting: span, method, n_delays,
    rank, tikhonov, ridge, val_accuracy (and a lifting's settings and costs). ``liftings``, a
    dict, receives each span's fitted lifting, so :func:`build_replacement` need not train
    it again.
    """
    n, T1, L, d_model = val_states.shape
    T = T1 - 1
    rows = []

    def add(span, method, pred, **settings):
        acc = _tail_score(model, pred, T, val_y)
        rows.append({"span": span, "method": method, "n_delays": settings.pop("n_delays", None),
                     "rank": settings.pop("rank", None),
                     "tikhonov": settings.pop("tikhonov", None),
                     "ridge": settings.pop("ridge", None), "val_accuracy": acc, **settings})

    for span in spans or range(1, T + 1):
        h = T - span
        add(span, "identity", val_states[:, h])
        for kind in VIEWS:
            fit, held = view(states, kind), view(val_states, kind)
            for ridge in (0.0, *grid["ridges"]):
                weight, bias = affine_fit(fit[:, h], fit[:, T], ridge)
                pred = (held[:, h].double() @ weight.T + bias).float()
                add(span, f"{'ridge' if ridge else 'LS'}/{kind}", unview(pred, n, L, d_model),
                    ridge=ridge or None)
            delays = grid["delays"] if kind == "pos" else grid.get("flat_delays", grid["delays"])
            for d in (d for d in delays if d <= h):
                observable, stats = _dmd_parts(fit, h, d)
                for rank in grid["ranks"][kind]:
                    for tikhonov in grid["tikhonovs"]:
                        dmd = DMD(rank, tikhonov=tikhonov, exact_rollout=True)
                        dmd.fit_statistics(stats)
                        pred = _predict_dmd(observable, _dmd_map(observable, dmd, span),
                                            held, h, d)
                        add(span, f"DMD/{kind}", unview(pred, n, L, d_model), n_delays=d,
                            rank=dmd.rank_, tikhonov=tikhonov)
        if span in grid.get("lifting_spans", ()):
            _lifting_rows(add, model, view(states, "flat"), view(val_states, "flat"), span,
                          grid, liftings)
        if log is not None:
            log(f"span {span}: {len(rows)} settings scored")
    return rows


def _lifting_rows(add, model: ViT, fit, held, span: int, grid: dict, liftings) -> None:
    h = fit.shape[1] - 1 - span
    L, d_model = model.pos.shape[1:]
    settings = {k: grid[k] for k in _LIFTING_KEYS}
    observable, stats = _lifting_parts(fit, h, settings)
    if liftings is not None:
        liftings[span] = (settings, observable, stats)
    costs = {**settings, "nonlinear_macs": observable.nonlinear_macs(),
             "block_macs": block_macs(d_model, L, model.blocks[0].mlp[0].out_features // d_model)}
    for tikhonov in grid["tikhonovs"]:
        dmd = DMD(None, tikhonov=tikhonov, exact_rollout=True).fit_statistics(stats)
        pred = _predict_dmd(observable, _dmd_map(observable, dmd, span), held, h, 0)
        add(span, "lifting/flat", unview(pred, len(held), L, d_model), n_delays=0,
            rank=dmd.rank_, tikhonov=tikhonov, **costs)


def build_replacement(model: ViT, states: torch.Tensor, row: dict,
                      liftings: dict | None = None) -> nn.Module:
    """The replaced model a selected row describes, as a real module (fits are deterministic;
    a lifting found in ``liftings`` with the row's settings is reused, not trained again)."""
    names = block_names(model)
    T = len(names)
    h = T - row["span"]
    method, _, kind = row["method"].partition("/")
    if method == "identity":
        return replace_span(model, h, T - 1, None)
    fit = view(states, kind)
    if method == "lifting":
        settings = {k: row[k] for k in _LIFTING_KEYS}
        cached = (liftings or {}).get(row["span"])
        observable, stats = cached[1:] if cached and cached[0] == settings else \
            _lifting_parts(fit, h, settings)
        dmd = DMD(None, tikhonov=row["tikhonov"], exact_rollout=True).fit_statistics(stats)
        return DepthHybrid(model, names[h:], observable, dmd).eval()
    if method in ("LS", "ridge"):
        weight, bias = affine_fit(fit[:, h], fit[:, T], row["ridge"] or 0.0)
        module = AffineMap(weight, bias) if kind == "pos" else FlatAffine(weight, bias)
        return replace_span(model, h, T - 1, module)
    d = row["n_delays"]
    observable, stats = _dmd_parts(fit, h, d)
    dmd = DMD(row["rank"], tikhonov=row["tikhonov"], exact_rollout=True).fit_statistics(stats)
    return DepthHybrid(model, names[h - d:], observable, dmd, per_position=kind == "pos").eval()


# ----------------------------------------------------------------------------- the profile


def _r2(pred, target, baseline) -> float:
    centred = (target - baseline) - (target - baseline).mean(0)
    return float(1 - ((target - pred) ** 2).sum() / (centred ** 2).sum())


def linearity_profile(model: ViT, states, val_states, val_y, *, flat: bool = True) -> list[dict]:
    """For every contiguous span i..j: least-squares R^2 of s_i -> s_{j+1} on held-out states
    (plain, and of the update s_{j+1} - s_i that the skip connection does not inflate), per
    position and flattened; the one-step DMD relative residual (per position) on held-out
    pairs inside the span; the validation accuracy when the span is replaced by its
    per-position least-squares map and the blocks after it run. ``flat=False`` leaves out the
    flattened R^2 (the slowest part)."""
    n, T1, L, d_model = val_states.shape
    T = T1 - 1
    views = VIEWS if flat else ("pos",)
    # the fitted states keep their dtype: affine_fit's singular-value cutoff follows it
    fit = {kind: view(states, kind) for kind in views}
    held = {kind: view(val_states, kind).double() for kind in views}
    rows = []
    for i in range(T):
        for j in range(i, T):
            row = {"first": i, "last": j, "blocks": j - i + 1}
            for kind in views:
                weight, bias = affine_fit(fit[kind][:, i], fit[kind][:, j + 1])
                x, y = held[kind][:, i], held[kind][:, j + 1]
                pred = x @ weight.T + bias
                row[f"ls_r2_{kind}"] = _r2(pred, y, torch.zeros((), device=y.device))
                row[f"ls_r2_update_{kind}"] = _r2(pred, y, x)
                if kind == "pos":
                    row["val_accuracy_ls"] = _tail_score(
                        model, unview(pred.float(), n, L, d_model), j + 1, val_y)
            sub, hold = fit["pos"][:, i:j + 2].double(), held["pos"][:, i:j + 2]
            observable = TimeDelay(0, constant=True).fit(sub[:1])
            dmd = DMD(exact_rollout=True).fit_statistics(
                PairStatistics.from_pairs(*snapshot_pairs(observable.transform(sub))))
            one_step = observable.transform(hold)[:, :-1] @ _dmd_map(observable, dmd, 1).T
            row["dmd_residual"] = float((one_step - hold[:, 1:]).norm() / hold[:, 1:].norm())
            rows.append(row)
    return rows
