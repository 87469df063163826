"""Scaling any submodule: inserted blocks before a named module of any network, then DMD.

``linearize(model, target="blocks.2.mlp", data=X)`` (see :mod:`koopnet.linearization`) is the
layer scaling of :mod:`koopnet.scaling` applied to one submodule of any ``nn.Module``, not only
to a hidden layer of a Sequential MLP. The target maps [..., w] -> [..., w']; N width-preserving
blocks are inserted before it and trained, with every original parameter frozen, so that
target(inserts(a)) matches target(a) on the inputs a the target receives when the model runs on
the data (captured with a forward hook). The states a = s_0, s_1..s_N through the inserts form
the trajectory that the :class:`~koopnet.spec.FitSpec`'s observable and DMD are fitted on. The
result is a copy of the model in which the target is a :class:`KoopmanTarget`: it runs the first
h inserts, advances the remaining N - h steps with the operator (one precomputed linear map),
reads the state s_N back out and applies the frozen target. The target itself is kept, not
replaced: it is the part of the network the inserts learned to feed.

Positions: the inserts act on the last dimension, so for inputs [B, L, d] (tokens) or more
dimensions every position is a sample of the trajectory: states [B*L, N+1, d], one operator
shared by all positions, as a token-wise MLP is.

Why residual inserts: a target's input is any vector (a LayerNorm output, a residual stream),
not the non-negative output of a ReLU, so the inserts are ``s + f(s)`` with f started near
zero (``ScalingSpec(kind="residual")``): the scaled model starts at the original function.
f is ``Linear(w, w)`` and a copy of the first activation found inside the target (GELU when it
has none).
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn

from koopnet._checks import check_finite
from koopnet.depth_states import check_data, not_a_submodule
from koopnet.dmd import DMD
from koopnet.hybrid import KoopmanHybrid
from koopnet.models import ACTIVATIONS, TrainConfig, model_device, model_dtype
from koopnet.observables import TimeDelay, snapshot_pairs
from koopnet.scaling import ScalingSpec, make_inserts, train_inserts
from koopnet.spec import FitSpec

__all__ = ["KoopmanTarget", "TargetPairs", "capture_target", "fit_states", "resolve_target",
           "scale_target"]

# Errors a model raises on inputs of the wrong shape or dtype.
_MODEL_ERRORS = (RuntimeError, ValueError, TypeError, IndexError, KeyError)
_HALF = (torch.float16, torch.bfloat16)


class _TargetError(TypeError):
    """The target is called or answers in a way the inserted blocks cannot follow."""


def resolve_target(model, target) -> str:
    """Check that ``target`` names a submodule of ``model`` (not the model itself); return it."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}.")
    if not isinstance(target, str):
        raise TypeError(f"target must be a qualified module name such as 'blocks.0.mlp' (see "
                        f"model.named_modules()); got {target!r}.")
    modules = dict(model.named_modules())
    valid = [name for name in modules if name]
    if not target:
        raise ValueError("target='' is the model itself; name one of its submodules, e.g. "
                         f"{valid[0]!r}." if valid else "target='' is the model itself, which "
                         "has no submodules; wrap the module to scale in a model.")
    if target in modules:
        return target
    raise not_a_submodule(model, target, "target", valid)


@dataclass
class TargetPairs:
    """What the target saw on the data: inputs ``a`` [n, ..., w] and outputs ``b`` [n, ..., w'],
    and ``model``, the frozen eval-mode copy they were recorded on (on the model's device)."""

    model: nn.Module
    name: str
    a: torch.Tensor
    b: torch.Tensor
    dtype: torch.dtype  # the user's model's: half-precision models are scaled in float32

    @property
    def width(self) -> int:
        return self.a.shape[-1]

    @property
    def n_positions(self) -> int:
        """Trajectories: samples times positions."""
        return self.a.numel() // self.width


def _recorder(name: str, calls: list):
    def hook(_module, args, kwargs, output):
        if len(args) != 1 or kwargs or not isinstance(args[0], torch.Tensor):
            kinds = [type(a).__name__ for a in args] + sorted(kwargs)
            raise _TargetError(f"target '{name}' is called with inputs {kinds}; the inserted "
                               "blocks need a module of one tensor input [..., w].")
        x = args[0]
        if not x.is_floating_point() or x.ndim == 0:
            raise _TargetError(f"target '{name}' takes a {x.dtype} tensor of shape "
                               f"{list(x.shape)}; the inserted blocks need floating-point "
                               "inputs [..., w] (e.g. not token ids); target a later module.")
        if not isinstance(output, torch.Tensor) or not output.is_floating_point():
            raise _TargetError(f"target '{name}' returns a {type(output).__name__}, not a "
                               "floating-point tensor; target a module that returns one.")
        calls.append((x.clone(), output.clone()))  # later in-place ops cannot change them
    return hook


def _run(model: nn.Module, X: torch.Tensor, calls: list, name: str, shape: list) -> None:
    """One batch through the model; data that does not fit names its shape, and a target run
    other than once per pass is refused (replacing it would change every call)."""
    calls.clear()
    try:
        model(X.to(model_device(model)))
    except _TargetError:
        raise
    except _MODEL_ERRORS as err:
        first = (str(err).strip().splitlines() or [""])[0]
        raise ValueError(f"data of shape {shape} does not fit the model: it raised "
                         f"{type(err).__name__}: {first.rstrip('.')}. Pass inputs [n, ...] "
                         "shaped as the model takes them, samples first.") from err
    if len(calls) != 1:
        raise ValueError(f"target '{name}' ran {len(calls)} times in one forward pass; it must "
                         "run exactly once (a shared module cannot be scaled for one call).")


@torch.no_grad()
def capture_target(model, target, data, *, batch_size: int = 1024) -> TargetPairs:
    """The target's inputs and outputs over ``data``, on a frozen eval-mode copy of ``model``
    (half-precision models are copied in float32). Shape: data [n, ...] -> a [n, ..., w]."""
    name = resolve_target(model, target)
    work = copy.deepcopy(model).eval().requires_grad_(False)
    dtype = model_dtype(work)
    if dtype in _HALF:  # scaled in float32, run in the model's precision
        work = work.float()
    X = check_data(work, data)
    calls: list = []
    hook = work.get_submodule(name).register_forward_hook(_recorder(name, calls),
                                                          with_kwargs=True)
    a, b = [], []
    try:
        for start in range(0, len(X), batch_size):
            _run(work, X[start:start + batch_size], calls, name, list(X.shape))
            a.append(calls[0][0])
            b.append(calls[0][1])
    finally:
        hook.remove()
    a, b = torch.cat(a), torch.cat(b)
    for tensor, what in ((a, "inputs"), (b, "outputs")):
        check_finite(tensor, f"{what} of target '{name}'", " Rescale the data or check the "
                     "model's weights.")
    return TargetPairs(work, name, a, b, dtype)


def fit_states(states: torch.Tensor, spec: FitSpec) -> tuple[TimeDelay, DMD]:
    """The fitted observable and DMD of ``spec`` on trajectories ``states`` [n, T, W]."""
    observable = spec.observable().fit(states)
    dmd = spec.dmd()
    if spec.pairing == "trajectory":
        dmd.fit(observable.transform(states))  # lifted [n, T-h, D]
    else:
        concatenated = states.reshape(1, -1, states.shape[2])  # [1, n*T, W]
        dmd.fit_pairs(*snapshot_pairs(observable.transform(concatenated)))
    return observable, dmd


class KoopmanTarget(nn.Module):
    """The frozen target behind its inserted blocks, the last N - h of them replaced by the
    operator: ``core`` (a :class:`~koopnet.hybrid.KoopmanHybrid` without head or tail) runs h
    inserts, lifts s_0..s_h and maps them to the predicted s_N, on every position; then the
    target runs. Shape: x [..., w] -> the target's output [..., w']."""

    def __init__(self, core: KoopmanHybrid, target: nn.Module) -> None:
        super().__init__()
        self.core, self.target = core, target

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        state = self.core(x.reshape(-1, x.shape[-1]))  # positions as samples: [P, w]
        return self.target(state.reshape(x.shape))


def _activation(target: nn.Module) -> nn.Module:
    """A copy of the first activation inside ``target``, else GELU."""
    kinds = tuple(c for c in ACTIVATIONS.values() if c is not nn.Identity)
    found = next((m for m in target.modules() if type(m) in kinds), None)
    return nn.GELU() if found is None else copy.deepcopy(found)


def _rows(states: list[torch.Tensor]) -> torch.Tensor:
    """States s_0..s_N [n, ..., w] as trajectories, positions as samples: [n*P, N+1, w]."""
    return torch.stack([s.reshape(-1, s.shape[-1]) for s in states], dim=1)


def scale_target(pairs: TargetPairs, spec: FitSpec, *, n_inserted: int, init: str, seed: int,
                 config: TrainConfig, progress: bool = False) -> nn.Module:
    """Insert, train and fit (see the module docs); returns the model copy with the target
    replaced by a :class:`KoopmanTarget`, in eval mode, in the model's dtype.

    Attributes of the result: ``dmd_``, ``observable``, ``rank_``, ``n_inserted``, ``n_delays``,
    ``target_`` (the name), ``scaled`` (the scaled model: inserts and target, nothing linear),
    ``scaling_history_`` (loss per epoch) and ``scaling_error_`` (relative L2 error of the
    scaled target's output on the data).
    """
    model, name, a = pairs.model, pairs.name, pairs.a
    target = model.get_submodule(name)
    scaling = ScalingSpec(kind="residual")
    generator = torch.Generator().manual_seed(seed)
    inserts = make_inserts(pairs.width, n_inserted, _activation(target), init, generator,
                           scaling.kind).to(a.device, a.dtype)
    history = train_inserts(inserts, target, a, pairs.b, config, scaling, seed=seed,
                            progress=progress, desc=f"scale {name}")
    inserts.eval().requires_grad_(False)
    with torch.no_grad():
        states = [a]
        for block in inserts:
            states.append(block(states[-1]))
        error = float((target(states[-1]) - pairs.b).norm() / pairs.b.norm().clamp_min(1e-30))
    observable, dmd = fit_states(_rows(states), spec)
    h, width = observable.n_delays_, pairs.width
    readout = observable.readout(width).to(dmd.dtype)  # [w, D]
    linear_map = dmd.transition(n_inserted - h, readout).to(a.device)
    core = KoopmanHybrid(nn.Identity(), inserts[:h], nn.Identity(), observable,
                         basis=dmd.basis_, operator=dmd.operator_, readout=readout,
                         linear_map=linear_map, width=width, linear_steps=n_inserted - h,
                         dmd=dmd)
    scaled = copy.deepcopy(model)
    _set_module(scaled, name, nn.Sequential(OrderedDict(
        inserts=copy.deepcopy(inserts), target=scaled.get_submodule(name))))
    _set_module(model, name, KoopmanTarget(core, target))
    if pairs.dtype != a.dtype:  # the network in the model's precision; the map stays float64
        buffers = {key: getattr(core, key) for key in ("basis", "operator", "readout",
                                                        "linear_map")}
        model.to(pairs.dtype)
        scaled.to(pairs.dtype)
        for key, value in buffers.items():
            setattr(core, key, value)
    model.__dict__.update(dmd_=dmd, observable=observable, rank_=core.rank_,
                          n_inserted=n_inserted, n_delays=h, target_=name, scaled=scaled,
                          scaling_history_=history, scaling_error_=error)
    return model.eval()


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)
