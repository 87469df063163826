"""Multilayer perceptrons as ``nn.Sequential`` and a small, seeded classifier trainer.

The layout ``[Linear, act, Linear, act, ..., Linear]`` is the paper's: hidden layer k is the
k-th Linear followed by its activation (:func:`mlp_blocks`); a LayerNorm or BatchNorm1d between
the two belongs to the layer, so the hidden state is still the activation's output.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from koopnet._checks import check_choice, check_int

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "gelu": nn.GELU,
    "elu": nn.ELU,
    "leaky_relu": nn.LeakyReLU,
    "sigmoid": nn.Sigmoid,
    "silu": nn.SiLU,
    "softplus": nn.Softplus,
    "identity": nn.Identity,
}


def make_activation(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise ValueError(f"activation={name!r} is not supported; use one of {sorted(ACTIVATIONS)}.")
    return ACTIVATIONS[name]()


def activation_name(module: nn.Module) -> str | None:
    """Inverse of :func:`make_activation`; None when ``module`` is not a known activation."""
    for name, cls in ACTIVATIONS.items():
        if type(module) is cls:
            return name
    return None


_SOFTMAX = (nn.Softmax, nn.LogSoftmax)
_DROPOUT = nn.modules.dropout._DropoutNd  # every Dropout variant: the identity in eval mode
#: Norms accepted between a hidden Linear and its activation; they belong to that layer, so the
#: hidden state is still the activation's output.
NORMS = (nn.LayerNorm, nn.BatchNorm1d)


def mlp_blocks(model: nn.Module, name: str = "model") -> list[list[nn.Module]]:
    """The layers of a Sequential MLP, checked: ``[Linear, (norm), activation]`` per hidden
    layer and ``[Linear]`` for the output layer.

    Dropout modules are left out (they are the identity in eval mode, where koopnet runs a
    network) and a final Softmax is dropped (it does not change the argmax). A LayerNorm or
    BatchNorm1d between a Linear and its activation is part of that hidden layer. Every error
    names the offending position in ``model`` itself.
    """
    if not isinstance(model, nn.Sequential):
        raise TypeError(f"{name} must be an nn.Sequential MLP [Linear, activation, ..., Linear]; "
                        f"got {type(model).__name__}.")
    indexed = [(i, m) for i, m in enumerate(model) if not isinstance(m, _DROPOUT)]
    if indexed and isinstance(indexed[-1][1], _SOFTMAX):
        indexed = indexed[:-1]
    if not indexed:
        raise ValueError(f"{name} holds no layers; koopnet expects [Linear, activation, ..., "
                         "Linear].")
    blocks: list[list[nn.Module]] = []
    previous = None  # (index, kind) of the module before
    for i, module in indexed:
        kind = type(module).__name__
        if previous is None or previous[1] == "activation":
            if type(module) is not nn.Linear:
                after = "starts the model" if previous is None else \
                    f"follows the activation {name}[{previous[0]}]"
                raise ValueError(f"{name}[{i}] is {kind} where a Linear layer is needed (it "
                                 f"{after}); koopnet's layer scaling takes a Sequential of "
                                 f"Linear and activation modules only ({sorted(ACTIVATIONS)}; "
                                 "Dropout, LayerNorm/BatchNorm1d before an activation and a "
                                 "final Softmax are allowed). Rebuild the model in that layout.")
            blocks.append([module])
            previous = (i, "Linear")
        elif previous[1] == "Linear" and isinstance(module, NORMS):
            blocks[-1].append(module)
            previous = (i, "norm")
        elif activation_name(module) is None:
            raise ValueError(f"{name}[{i}] is {kind} where an activation is needed after the "
                             f"{previous[1]} {name}[{previous[0]}]; supported activations "
                             f"are {sorted(ACTIVATIONS)} (a LayerNorm or BatchNorm1d may sit "
                             "between a Linear and its activation).")
        else:
            blocks[-1].append(module)
            previous = (i, "activation")
    if previous[1] != "Linear":
        last = "an activation" if previous[1] == "activation" else "a norm"
        raise ValueError(f"{name} ends with {last} ({name}[{previous[0]}]); an MLP "
                         "ends with its output Linear layer (logits).")
    return blocks


def mlp_layout(model: nn.Module, name: str = "model") -> list[nn.Module]:
    """The modules of a Sequential MLP ``[Linear, (norm), activation, ..., Linear]``, checked
    and flattened (see :func:`mlp_blocks`: Dropout and a final Softmax left out)."""
    return [module for block in mlp_blocks(model, name) for module in block]


def check_layer(model: nn.Module, layer) -> int:
    """Hidden layer ``layer`` (1-based) must start a trajectory: layer k+1 exists to replace."""
    n_hidden = len(mlp_blocks(model)) - 1
    if n_hidden < 2:
        raise ValueError(f"model has {n_hidden} hidden layer(s); linearising needs at least 2 "
                         "(one to start the trajectory, one to replace). Use a deeper MLP.")
    layer = check_int(layer, "layer")
    if not 1 <= layer <= n_hidden - 1:
        raise ValueError(f"layer={layer} is out of range: this model has {n_hidden} hidden "
                         f"layers, so layer must be in 1..{n_hidden - 1} (hidden layer k+1 is "
                         "the one replaced).")
    return layer


def split_mlp(model: nn.Module, layer: int) -> tuple[nn.Sequential, nn.Sequential, nn.Sequential]:
    """Cut an MLP into (head, replaced, tail) around hidden layer ``layer`` (1-based, as the paper).

    head = everything up to hidden layer k's activation, replaced = the next Linear, its norm if
    any and its activation (hidden layer k+1), tail = the rest (see
    :func:`koopnet.models.mlp_blocks` for what is accepted).
    """
    layer = check_layer(model, layer)
    blocks = mlp_blocks(model)
    head, tail = itertools.chain(*blocks[:layer]), itertools.chain(*blocks[layer + 1:])
    return nn.Sequential(*head), nn.Sequential(*blocks[layer]), nn.Sequential(*tail)


class Frozen(nn.Module):
    """A frozen original module that stays in eval mode while the modules around it train.

    :func:`fit_minibatch` puts what it trains in train mode; a BatchNorm of the frozen original
    would then normalise with batch statistics (and overwrite its running ones) and a Dropout
    would drop units. Wrapped, they compute exactly what they compute at inference.
    Shape: whatever ``module`` takes.
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def train(self, mode: bool = True) -> Frozen:
        super().train(mode)
        self.module.eval()
        return self

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


def model_dtype(model: nn.Module) -> torch.dtype:
    """The floating dtype of a model's parameters (float32 for a model without any)."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def model_device(model: nn.Module) -> torch.device:
    """Where a model's parameters (or buffers) live (CPU for a model without any)."""
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


def init_he(module: nn.Module) -> None:
    """He-normal weights (ReLU gain) and bias 0.01, the paper's initialisation."""
    if isinstance(module, nn.Linear):
        nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
        if module.bias is not None:
            nn.init.constant_(module.bias, 0.01)


def build_mlp(widths: Sequence[int], activation: str = "relu") -> nn.Sequential:
    """``widths = [in, h1, ..., out]`` -> Linear+activation blocks and a final Linear (logits).

    >>> build_mlp([2, 8, 2])
    Sequential(
      (0): Linear(in_features=2, out_features=8, bias=True)
      (1): ReLU()
      (2): Linear(in_features=8, out_features=2, bias=True)
    )
    """
    widths = [check_int(w, "width", low=1) for w in widths]
    if len(widths) < 2:
        raise ValueError(f"widths={widths} needs at least an input and an output width.")
    layers: list[nn.Module] = []
    for n_in, n_out in itertools.pairwise(widths[:-1]):
        layers += [nn.Linear(n_in, n_out), make_activation(activation)]
    layers.append(nn.Linear(widths[-2], widths[-1]))
    model = nn.Sequential(*layers)
    model.apply(init_he)
    return model


@dataclass(frozen=True)
class TrainConfig:
    """Optimiser recipe. Defaults are the paper's Yin-Yang base recipe (paper-method section 3)."""

    epochs: int = 5000
    batch_size: int = 1000
    lr: float = 5e-3
    weight_decay: float = 1e-2
    betas: tuple[float, float] = (0.9, 0.999)
    plateau_patience: int | None = None  # ReduceLROnPlateau on the epoch-mean loss, factor 0.5
    plateau_threshold: float = 1e-4
    # stop early once the epoch-mean loss has not improved (relatively, by plateau_threshold)
    # for this many epochs; None trains every epoch
    stop_patience: int | None = None
    # a fixed per-batch learning-rate schedule over all ``epochs``: "cosine" decays lr to 0,
    # "onecycle" warms up for 10% of the steps then decays (torch's OneCycleLR, which also
    # cycles beta1); None keeps lr constant (or the plateau rule), as every paper recipe does
    schedule: str | None = None
    label_smoothing: float = 0.0  # train_classifier's cross-entropy; 0 is plain cross-entropy

    def __post_init__(self) -> None:
        if self.schedule is not None:
            check_choice(self.schedule, "schedule", SCHEDULES)
            if self.plateau_patience is not None:
                raise ValueError(f"schedule={self.schedule!r} and plateau_patience="
                                 f"{self.plateau_patience} both set the learning rate; pass "
                                 "plateau_patience=None with a schedule.")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing={self.label_smoothing!r} must be in [0, 1); "
                             "pass 0 for plain cross-entropy.")


SCHEDULES = ("cosine", "onecycle")


def _batch_schedule(optimizer, config: TrainConfig, steps: int):
    """The per-batch scheduler of ``config.schedule`` over ``steps`` optimiser steps."""
    if config.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.lr,
                                                   total_steps=steps, pct_start=0.1)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda t: 0.5 * (1.0 + math.cos(math.pi * min(t, steps) / steps)))


def fit_minibatch(
    module: nn.Module,
    loss_fn,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    config: TrainConfig,
    *,
    seed: int,
    progress: bool = False,
    desc: str = "train",
) -> list[float]:
    """Minimise ``loss_fn(module(inputs), targets)`` with AdamW over shuffled mini-batches.

    Only parameters with ``requires_grad`` are optimised, so frozen layers stay bit-identical.
    Returns the epoch-mean losses.
    """
    generator = torch.Generator().manual_seed(seed)
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, betas=config.betas,
                                  weight_decay=config.weight_decay)
    scheduler = None
    if config.plateau_patience is not None:
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, factor=0.5, patience=config.plateau_patience,
            threshold=config.plateau_threshold)
    n = len(inputs)
    batch_scheduler = None
    if config.schedule is not None:
        steps = max(1, config.epochs * math.ceil(n / config.batch_size))
        batch_scheduler = _batch_schedule(optimizer, config, steps)
    history: list[float] = []
    best, since_best = float("inf"), 0
    module.train()
    bar = tqdm(range(config.epochs), desc=desc, disable=not progress, leave=False)
    for _ in bar:
        order = torch.randperm(n, generator=generator, device="cpu")  # same order on any device
        total = 0.0
        for start in range(0, n, config.batch_size):
            idx = order[start:start + config.batch_size]
            loss = loss_fn(module(inputs[idx]), targets[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if batch_scheduler is not None:
                batch_scheduler.step()
            total += loss.item() * len(idx)
        history.append(total / n)
        if scheduler is not None:
            scheduler.step(history[-1])
        bar.set_postfix(loss=f"{history[-1]:.4g}", refresh=False)
        improved = history[-1] < best * (1 - config.plateau_threshold)
        best, since_best = (history[-1], 0) if improved else (best, since_best + 1)
        if config.stop_patience is not None and since_best >= config.stop_patience:
            break
    module.eval()
    return history


def train_classifier(model: nn.Module, X: torch.Tensor, y: torch.Tensor,
                     config: TrainConfig | None = None, *, seed: int = 0,
                     progress: bool = False) -> list[float]:
    """Cross-entropy training of ``model`` in place. Shape: X [n, features], y [n] int64."""
    config = config or TrainConfig()
    loss_fn = nn.functional.cross_entropy
    if config.label_smoothing:
        def loss_fn(logits, target):
            return nn.functional.cross_entropy(logits, target,
                                               label_smoothing=config.label_smoothing)
    return fit_minibatch(model, loss_fn, X, y, config, seed=seed, progress=progress,
                         desc="base model")


@torch.no_grad()
def predict_logits(model: nn.Module, X: torch.Tensor, batch_size: int = 8192) -> torch.Tensor:
    """Logits in eval mode, batched so large sets fit in memory. Shape: [n, classes]."""
    model.eval()
    return torch.cat([model(X[i:i + batch_size]) for i in range(0, len(X), batch_size)])


def accuracy(model: nn.Module, X: torch.Tensor, y: torch.Tensor) -> float:
    """Fraction of correctly classified samples, in [0, 1]."""
    return float((predict_logits(model, X).argmax(dim=1) == y).float().mean())
