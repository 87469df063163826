"""Layer scaling: insert N width-preserving blocks before a layer so depth becomes a trajectory.

Aswani et al. 2024 (section "layer scaling"): after hidden layer k (its activation sits at
Sequential index s = 2k-1) insert N blocks ``Linear(w, w) + activation``, freeze every original
parameter and train only the inserts so that the replaced layer (hidden layer k+1) still
produces the same output. The states s_0 (input of the stack), s_1..s_N (insert outputs) and
s_{N+1} (replaced layer output) form a trajectory of T = N + 2 states per sample.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from koopnet._checks import as_tensor, check_int
from koopnet.models import TrainConfig, check_layer, fit_minibatch, make_activation, mlp_layout

log = logging.getLogger(__name__)

#: Scaling recipe of ``linearize``, ``koopnet scale`` and the clean protocol on small data:
#: full-batch AdamW (scaling regresses fixed input/output pairs, so no mini-batch noise is
#: needed), 1000 steps at lr 1e-2 with plateau halving.
DEFAULT_SCALING = TrainConfig(epochs=1000, batch_size=5000, lr=1e-2, betas=(0.8, 0.8),
                              weight_decay=1e-4, plateau_patience=100, plateau_threshold=1e-4)


def split_mlp(model: nn.Module, layer: int) -> tuple[nn.Sequential, nn.Sequential, nn.Sequential]:
    """Cut an MLP into (head, replaced, tail) around hidden layer ``layer`` (1-based, as the paper).

    head = everything up to hidden layer k's activation, replaced = the next Linear and its
    activation (hidden layer k+1), tail = the rest (see :func:`koopnet.models.mlp_layout` for
    what is accepted).
    """
    layer = check_layer(model, layer)
    modules = mlp_layout(model)
    s = 2 * layer - 1
    return (nn.Sequential(*modules[: s + 1]), nn.Sequential(*modules[s + 1: s + 3]),
            nn.Sequential(*modules[s + 3:]))


class ScaledMLP(nn.Module):
    """head -> N inserted blocks -> replaced layer -> tail; only the inserts are trainable.

    Shape: x [B, features] -> logits [B, classes]. ``stages`` lists the modules whose outputs are
    the trajectory states s_0..s_{N+1}.
    """

    def __init__(self, head: nn.Sequential, inserts: nn.Sequential, replaced: nn.Sequential,
                 tail: nn.Sequential, layer: int) -> None:
        super().__init__()
        self.head, self.inserts, self.replaced, self.tail = head, inserts, replaced, tail
        self.layer = layer

    @property
    def width(self) -> int:
        return self.replaced[0].in_features

    @property
    def out_width(self) -> int:
        return self.replaced[0].out_features

    @property
    def n_inserted(self) -> int:
        return len(self.inserts)

    @property
    def n_states(self) -> int:
        return self.n_inserted + 2

    @property
    def stages(self) -> list[nn.Module]:
        return [self.head, *self.inserts, self.replaced]

    def original(self) -> nn.Sequential:
        """The unscaled network (shares the frozen modules)."""
        return nn.Sequential(*self.head, *self.replaced, *self.tail)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tail(self.replaced(self.inserts(self.head(x))))

    def extra_repr(self) -> str:
        return f"layer={self.layer}, n_inserted={self.n_inserted}, width={self.width}"


def make_inserts(width: int, n_inserted: int, activation: nn.Module | str, init: str,
                 generator: torch.Generator) -> nn.Sequential:
    """N blocks ``Sequential(Linear(w, w), activation)``; the activation is copied with its
    arguments (a LeakyReLU keeps its slope).

    ``init="he"`` is the paper's (He-normal, bias 0.01); narrow ReLU layers often die with it.
    ``init="identity"`` starts at W = I + 0.001 noise, bias 0: with ReLU on non-negative inputs
    each block starts as the identity, so every unit stays alive and training starts at the
    original function.
    """
    if init not in ("he", "identity"):
        raise ValueError(f"init={init!r} must be 'he' (paper) or 'identity' (near-identity).")
    blocks = []
    for _ in range(n_inserted):
        linear = nn.Linear(width, width)
        with torch.no_grad():
            if init == "he":
                std = (2.0 / width) ** 0.5
                linear.weight.copy_(torch.randn(width, width, generator=generator) * std)
                linear.bias.fill_(0.01)
            else:
                noise = torch.randn(width, width, generator=generator) * 1e-3
                linear.weight.copy_(torch.eye(width) + noise)
                linear.bias.zero_()
        act = make_activation(activation) if isinstance(activation, str) else \
            copy.deepcopy(activation)
        blocks.append(nn.Sequential(linear, act))
    return nn.Sequential(*blocks)


@dataclass
class ScalingReport:
    """How scaling went. ``agreement``: the scaled model's accuracy on the labels given to
    :func:`scale_layer`, or without labels the fraction of inputs where it agrees with the
    original."""

    agreement: float
    attempts: list[dict] = field(default_factory=list)
    ok: bool = True
    init: str = "identity"
    history: list[float] = field(default_factory=list)


def scale_layer(
    model: nn.Sequential,
    layer: int,
    X: torch.Tensor,
    y: torch.Tensor | None = None,
    *,
    n_inserted: int = 10,
    init: str = "identity",
    config: TrainConfig = DEFAULT_SCALING,
    seed: int = 0,
    retries: int = 2,
    fallback_identity: bool = True,
    tolerance: float = 0.005,
    progress: bool = False,
    judge: tuple[torch.Tensor, torch.Tensor | None] | None = None,
) -> tuple[ScaledMLP, ScalingReport]:
    """Insert and train ``n_inserted`` blocks after hidden layer ``layer`` of ``model``.

    The original parameters are deep-copied and frozen. Training only ever needs the fixed pairs
    (a = head(x), b = replaced(a)), so they are computed once. Success means the scaled and the
    original network agree on at least ``1 - tolerance`` of ``X`` (so accuracy moves by at most
    ``tolerance``); a failed attempt (dead units leave the output constant) is retried with a
    fresh seed, and the last retry uses the near-identity init (unless ``fallback_identity`` is
    False, as the paper protocol sets, so that every attempt uses ``init``). ``report.ok`` says
    if it worked. ``judge`` = (X, y) judges the agreement (and so the retries) on other points
    than the training ones, e.g. points disjoint from a reported test set.

    Shape: X [n, features], y [n].
    """
    dtype = next(model.parameters()).dtype
    X = as_tensor(X, "X", ndim=2, dtype=dtype)
    n_inserted = check_int(n_inserted, "n_inserted", low=0)
    head, replaced, tail = split_mlp(copy.deepcopy(model), layer)
    if X.shape[1] != head[0].in_features:
        raise ValueError(f"X has {X.shape[1]} features but the model expects "
                         f"{head[0].in_features}; pass inputs of the model's input width.")
    for p in [*head.parameters(), *replaced.parameters(), *tail.parameters()]:
        p.requires_grad_(False)
    activation = head[-1]
    with torch.no_grad():
        a = head(X)
        b = replaced(a)
        judge_a = a if judge is None else head(as_tensor(judge[0], "judge X", ndim=2,
                                                         dtype=dtype))
        original = tail(b if judge is None else replaced(judge_a)).argmax(1)
    y = y if judge is None else judge[1]
    reference = original if y is None else y
    target = float((original == reference).float().mean()) - tolerance
    report = ScalingReport(agreement=-1.0, ok=False, init=init)
    best = None
    for attempt in range(retries + 1):
        last = attempt == retries and attempt > 0
        attempt_init = "identity" if last and fallback_identity else init
        generator = torch.Generator().manual_seed(seed + 1000 * attempt)
        inserts = make_inserts(a.shape[1], n_inserted, activation, attempt_init,
                               generator).to(dtype)
        stack = nn.Sequential(inserts, replaced)
        history = fit_minibatch(stack, nn.functional.huber_loss, a, b, config,
                                seed=seed + attempt, progress=progress,
                                desc=f"scale layer {layer}") if n_inserted else []
        with torch.no_grad():
            agreement = float((tail(stack(judge_a)).argmax(1) == reference).float().mean())
        report.attempts.append({"init": attempt_init, "seed": seed + 1000 * attempt,
                                "agreement": agreement,
                                "final_loss": history[-1] if history else 0.0})
        if agreement > report.agreement:
            best = ScaledMLP(head, inserts, replaced, tail, layer)
            report.agreement, report.init, report.history = agreement, attempt_init, history
        if agreement >= target:
            report.ok = True
            break
        log.warning("scaling layer %d: attempt %d (%s init) scores %.2f%%, below the %.2f%% "
                    "needed; retrying", layer, attempt + 1, attempt_init, 100 * agreement,
                    100 * target)
    if not report.ok:
        log.error("scaling layer %d FAILED: %.2f%% < %.2f%% after %d attempts", layer,
                  100 * report.agreement, 100 * target, retries + 1)
    best.eval()
    return best, report
