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
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from koopnet._checks import as_tensor, check_choice, check_float, check_int
from koopnet.models import Frozen, TrainConfig, fit_minibatch, make_activation, split_mlp
from koopnet.scaling_penalties import TrackedStack, scaling_loss

log = logging.getLogger(__name__)

#: Scaling recipe of ``linearize``, ``koopnet scale`` and the clean protocol on small data:
#: full-batch AdamW (scaling regresses fixed input/output pairs, so no mini-batch noise is
#: needed), 1000 steps at lr 1e-2 with plateau halving.
DEFAULT_SCALING = TrainConfig(epochs=1000, batch_size=5000, lr=1e-2, betas=(0.8, 0.8),
                              weight_decay=1e-4, plateau_patience=100, plateau_threshold=1e-4)


INSERT_KINDS = ("plain", "residual", "tied")


@dataclass(frozen=True)
class ScalingSpec:
    """What the inserted blocks are and what their training penalises, beside the Huber loss on
    the replaced layer's output. The default is the paper's scaling exactly.

    kind: "plain" (N independent ``Linear + activation`` blocks), "residual" (s + f(s), f started
    near zero) or "tied" (one block applied N times: autonomous dynamics).
    step_penalty: weight of sum_t ||s_{t+1} - s_t||^2 over the inserted steps s_0..s_N, divided
    by the batch's mean ||s_0||^2 (fixed, the head is frozen) so one weight suits every layer.
    dmd_penalty: weight of the batch's DMD residual (:func:`dmd_residual`) over the states
    s_0..s_{N+1}: K is fitted in closed form (ridge ``dmd_ridge`` relative to the Gram's mean
    diagonal) on the within-trajectory pairs of the states delay-lifted with ``dmd_delays``
    delays, and the residual of a roll-out of ``dmd_steps`` steps is penalised (1: the one-step
    residual; more: from each lifted state, with K divided by max(1, its spectral norm) so that
    the powers cannot explode).
    """

    kind: str = "plain"
    step_penalty: float = 0.0
    dmd_penalty: float = 0.0
    dmd_steps: int = 1
    dmd_delays: int = 0
    dmd_ridge: float = 1e-6

    def __post_init__(self) -> None:
        check_choice(self.kind, "kind", INSERT_KINDS)
        for name in ("step_penalty", "dmd_penalty", "dmd_ridge"):
            object.__setattr__(self, name, check_float(getattr(self, name), name, low=0.0))
        object.__setattr__(self, "dmd_steps", check_int(self.dmd_steps, "dmd_steps", low=1))
        object.__setattr__(self, "dmd_delays", check_int(self.dmd_delays, "dmd_delays", low=0))

    @property
    def penalised(self) -> bool:
        return self.step_penalty > 0 or self.dmd_penalty > 0

    def check_states(self, n_states: int) -> None:
        """Refuse a DMD penalty whose lifted roll-out does not fit in ``n_states`` states."""
        if self.dmd_penalty > 0 and self.dmd_delays + self.dmd_steps > n_states - 1:
            raise ValueError(
                f"dmd_delays={self.dmd_delays} + dmd_steps={self.dmd_steps} needs at least "
                f"{self.dmd_delays + self.dmd_steps + 1} states, but {n_states - 2} inserted "
                f"blocks give {n_states}; insert more blocks or shorten the roll-out.")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> ScalingSpec:
        return cls(**values)


class ResidualBlock(nn.Module):
    """s -> s + body(s): an inserted step that moves the state by ``body`` (Linear + activation).

    Shape: [B, w] -> [B, w].
    """

    def __init__(self, body: nn.Sequential) -> None:
        super().__init__()
        self.body = body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class ScaledMLP(nn.Module):
    """head -> N inserted blocks -> replaced layer -> tail; only the inserts are trainable.

    Shape: x [B, features] -> logits [B, classes]. ``stages`` lists the modules whose outputs are
    the trajectory states s_0..s_{N+1}.
    """

    def __init__(self, head: nn.Sequential, inserts: nn.Sequential, replaced: nn.Sequential,
                 tail: nn.Sequential, layer: int, spec: ScalingSpec | None = None) -> None:
        super().__init__()
        self.head, self.inserts, self.replaced, self.tail = head, inserts, replaced, tail
        self.layer = layer
        self.spec = ScalingSpec() if spec is None else spec  # how the inserts were trained

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
        kind = "" if self.spec.kind == "plain" else f", kind={self.spec.kind}"
        return f"layer={self.layer}, n_inserted={self.n_inserted}, width={self.width}{kind}"


def _check_init(init) -> None:
    if init not in ("he", "identity"):
        raise ValueError(f"init={init!r} must be 'he' (paper) or 'identity' (near-identity).")


def _insert_linear(width: int, init: str, kind: str, generator: torch.Generator) -> nn.Linear:
    """One inserted ``Linear(w, w)``, drawn in the order the plain blocks always drew it."""
    linear = nn.Linear(width, width, device="cpu")
    with torch.no_grad():
        if init == "he":
            std = (2.0 / width) ** 0.5
            linear.weight.copy_(torch.randn(width, width, generator=generator, device="cpu") * std)
            linear.bias.fill_(0.01)
        else:
            noise = torch.randn(width, width, generator=generator, device="cpu") * 1e-3
            linear.weight.copy_(torch.eye(width, device="cpu") + noise)
            linear.bias.zero_()
        if kind == "residual":  # f starts near zero, so every step starts near the identity
            linear.weight.sub_(torch.eye(width, device="cpu") if init == "identity" else 0.0)
            linear.weight.mul_(1.0 if init == "identity" else 1e-2)
            linear.bias.zero_()
    return linear


def make_inserts(width: int, n_inserted: int, activation: nn.Module | str, init: str,
                 generator: torch.Generator, kind: str = "plain") -> nn.Sequential:
    """N blocks ``Sequential(Linear(w, w), activation)``; the activation is copied with its
    arguments (a LeakyReLU keeps its slope).

    ``init="he"`` is the paper's (He-normal, bias 0.01); narrow ReLU layers often die with it.
    ``init="identity"`` starts at W = I + 0.001 noise, bias 0: with ReLU on non-negative inputs
    each block starts as the identity, so every unit stays alive and training starts at the
    original function.

    ``kind="residual"``: each block is ``s + f(s)`` (:class:`ResidualBlock`) with f started near
    zero (identity init: W = 0.001 noise; He: He-normal at 1/100 of its scale; bias 0), so each
    step starts near the identity whatever the init. ``kind="tied"``: one block drawn once and
    applied at every step (:func:`tie_blocks`), so the dynamics is autonomous, as one Koopman
    operator assumes.
    """
    _check_init(init)
    check_choice(kind, "kind", INSERT_KINDS)

    def activation_module() -> nn.Module:
        return make_activation(activation) if isinstance(activation, str) else \
            copy.deepcopy(activation)

    if kind == "tied":
        if n_inserted == 0:
            return nn.Sequential()
        block = nn.Sequential(_insert_linear(width, init, kind, generator), activation_module())
        return tie_blocks(block, n_inserted)
    blocks = []
    for _ in range(n_inserted):
        body = nn.Sequential(_insert_linear(width, init, kind, generator), activation_module())
        blocks.append(ResidualBlock(body) if kind == "residual" else body)
    return nn.Sequential(*blocks)


def tie_blocks(block: nn.Module, n_steps: int) -> nn.Sequential:
    """``n_steps`` distinct step modules sharing every submodule (and so every parameter) of
    ``block``. Distinct steps keep one forward hook per step, so
    :func:`koopnet.trajectories.collect_trajectories` records each state once."""
    if isinstance(block, ResidualBlock):
        return nn.Sequential(block, *[ResidualBlock(block.body) for _ in range(n_steps - 1)])
    if isinstance(block, nn.Sequential):
        return nn.Sequential(block, *[nn.Sequential(*block) for _ in range(n_steps - 1)])
    raise TypeError(f"block is {type(block).__name__}; tie an nn.Sequential or a "
                    "ResidualBlock.")


def tied_steps(blocks: nn.Module) -> bool:
    """True for two or more steps that share every submodule of the first (see
    :func:`tie_blocks`)."""
    if not isinstance(blocks, nn.Sequential) or len(blocks) < 2:
        return False
    first = list(blocks[0].children())
    if not first or not any(True for _ in blocks[0].parameters()):
        return False
    return all(type(b) is type(blocks[0]) and b is not blocks[0]
               and len(list(b.children())) == len(first)
               and all(x is y for x, y in zip(b.children(), first, strict=True))
               for b in blocks[1:])


def insert_kind(blocks: nn.Module) -> str:
    """'tied', 'residual' or 'plain': what :func:`make_inserts` built ``blocks`` as."""
    if tied_steps(blocks):
        return "tied"
    if len(blocks) and all(isinstance(b, ResidualBlock) for b in blocks):
        return "residual"
    return "plain"


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


def train_inserts(inserts: nn.Sequential, replaced: nn.Sequential, a: torch.Tensor,
                  b: torch.Tensor, config: TrainConfig, spec: ScalingSpec, *, seed: int,
                  progress: bool = False, desc: str = "scale") -> list[float]:
    """Fit the inserts so that replaced(inserts(a)) matches b; returns the loss history.

    Without penalties this is exactly the paper's Huber regression of the stack. ``replaced``
    stays in eval mode (:class:`~koopnet.models.Frozen`), so a norm or Dropout in it trains the
    inserts against the function it computes at inference. Shape: a [B, ..., w], b [B, ..., w'].
    """
    if not len(inserts):
        return []
    replaced = Frozen(replaced)
    if not spec.penalised:
        return fit_minibatch(nn.Sequential(inserts, replaced), nn.functional.huber_loss, a, b,
                             config, seed=seed, progress=progress, desc=desc)
    stack = TrackedStack(inserts, replaced)
    return fit_minibatch(stack, lambda out, target: scaling_loss(spec, out, target,
                                                                 stack.states_),
                         a, b, config, seed=seed, progress=progress, desc=desc)


@dataclass
class _Fixed:
    """What every scaling attempt shares: the frozen parts, their fixed pairs (a, b) and the
    reference predictions the agreement is judged against."""

    head: nn.Sequential
    replaced: nn.Sequential
    tail: nn.Sequential
    a: torch.Tensor
    b: torch.Tensor
    judge_a: torch.Tensor
    reference: torch.Tensor
    target: float


def _fixed_pairs(model: nn.Sequential, layer: int, X: torch.Tensor, y, judge,
                 tolerance: float) -> _Fixed:
    dtype = next(model.parameters()).dtype
    X = as_tensor(X, "X", ndim=2, dtype=dtype)
    head, replaced, tail = split_mlp(copy.deepcopy(model).eval(), layer)  # norms: eval
    if X.shape[1] != head[0].in_features:
        raise ValueError(f"X has {X.shape[1]} features but the model expects "
                         f"{head[0].in_features}; pass inputs of the model's input width.")
    for p in [*head.parameters(), *replaced.parameters(), *tail.parameters()]:
        p.requires_grad_(False)
    with torch.no_grad():
        a = head(X)
        b = replaced(a)
        judge_a = a if judge is None else head(as_tensor(judge[0], "judge X", ndim=2,
                                                         dtype=dtype))
        original = tail(b if judge is None else replaced(judge_a)).argmax(1)
    y = y if judge is None else judge[1]
    reference = original if y is None else y
    target = float((original == reference).float().mean()) - tolerance
    return _Fixed(head, replaced, tail, a, b, judge_a, reference, target)


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
    spec: ScalingSpec | None = None,
) -> tuple[ScaledMLP, ScalingReport]:
    """Insert and train ``n_inserted`` blocks after hidden layer ``layer`` of ``model``.

    The original parameters are deep-copied and frozen. Training only ever needs the fixed pairs
    (a = head(x), b = replaced(a)), so they are computed once. Success means the scaled and the
    original network agree on at least ``1 - tolerance`` of ``X`` (so accuracy moves by at most
    ``tolerance``); a failed attempt (dead units leave the output constant) is retried with a
    fresh seed, and the last retry uses the near-identity init (unless ``fallback_identity`` is
    False, as the paper protocol sets, so that every attempt uses ``init``). ``report.ok`` says
    if it worked. ``judge`` = (X, y) judges the agreement (and so the retries) on other points
    than the training ones, e.g. points disjoint from a reported test set. ``spec``
    (:class:`ScalingSpec`) chooses the kind of inserts and the penalties; the default is the
    paper's scaling.

    Shape: X [n, features], y [n].
    """
    spec = ScalingSpec() if spec is None else spec
    if not isinstance(spec, ScalingSpec):
        raise TypeError(f"spec must be a ScalingSpec; got {type(spec).__name__}.")
    n_inserted = check_int(n_inserted, "n_inserted", low=0)
    _check_init(init)
    spec.check_states(n_inserted + 2)
    fixed = _fixed_pairs(model, layer, X, y, judge, tolerance)
    report = ScalingReport(agreement=-1.0, ok=False, init=init)
    best = None
    for attempt in range(retries + 1):
        last = attempt == retries and attempt > 0
        attempt_init = "identity" if last and fallback_identity else init
        inserts, history, agreement = _attempt(fixed, n_inserted, attempt_init, config, spec,
                                               seed, attempt, progress, layer)
        report.attempts.append({"init": attempt_init, "seed": seed + 1000 * attempt,
                                "agreement": agreement,
                                "final_loss": history[-1] if history else 0.0})
        if agreement > report.agreement:
            best = ScaledMLP(fixed.head, inserts, fixed.replaced, fixed.tail, layer, spec)
            report.agreement, report.init, report.history = agreement, attempt_init, history
        if agreement >= fixed.target:
            report.ok = True
            break
        log.warning("scaling layer %d: attempt %d (%s init) scores %.2f%%, below the %.2f%% "
                    "needed; retrying", layer, attempt + 1, attempt_init, 100 * agreement,
                    100 * fixed.target)
    if not report.ok:
        log.error("scaling layer %d FAILED: %.2f%% < %.2f%% after %d attempts", layer,
                  100 * report.agreement, 100 * fixed.target, retries + 1)
    best.eval()
    return best, report


def _attempt(fixed: _Fixed, n_inserted: int, init: str, config: TrainConfig,
             spec: ScalingSpec, seed: int, attempt: int, progress: bool, layer: int
             ) -> tuple[nn.Sequential, list[float], float]:
    """One scaling attempt: fresh inserts, trained; returns (inserts, history, agreement)."""
    generator = torch.Generator().manual_seed(seed + 1000 * attempt)
    activation = fixed.head[-1]
    inserts = make_inserts(fixed.a.shape[1], n_inserted, activation, init, generator,
                           spec.kind).to(fixed.a.device, fixed.a.dtype)
    history = train_inserts(inserts, fixed.replaced, fixed.a, fixed.b, config, spec,
                            seed=seed + attempt, progress=progress, desc=f"scale layer {layer}")
    with torch.no_grad():
        out = fixed.tail(fixed.replaced(inserts(fixed.judge_a)))
        agreement = float((out.argmax(1) == fixed.reference).float().mean())
    return inserts, history, agreement
