"""Depth as a trajectory: residual streams of MLPs, CNNs and transformers, with no scaling.

In a residual network the state that flows through a stack of same-shape blocks already is a
trajectory: s_0 is the input of the first block and s_t the output of block t. No layer has to
be scaled (no blocks inserted, nothing trained) before a DMD is fitted on it, so
:func:`linearize_depth` only runs the model with forward hooks, lifts the states with delays,
fits the operator and returns :class:`DepthHybrid`, a copy of the model that runs the first h
blocks, advances the remaining ``len(blocks) - h`` steps with one precomputed linear map and
carries on after the last block as the original would.

Two views of a state that is more than a vector (tokens [B, L, d], feature maps [B, C, H, W]):

- ``per_position=False`` (default): one operator over the whole state flattened per sample,
  W = L*d or C*H*W. It can mix positions (as attention does) but its size grows as W^2.
- ``per_position=True``: positions are samples over the feature dimension, states
  [B*L, T, d] (for feature maps [B*H*W, T, C]); one shared d x d-sized operator, as in
  per-token DMD along the depth of vision transformers. It cannot move information between
  positions, which is the price of its much smaller size.

The fit is exact DMD by default (``exact_rollout=True``): within-trajectory pairs never hold the
last state as an input, so the projected roll-out would be confined to the span of states the
last step never visits (see :class:`koopnet.dmd.DMD`). States are fitted in float64 whatever the
model's dtype; the map is applied in the states' own dtype and follows the model's device.

>>> import torch
>>> from torch import nn
>>> from koopnet import linearize_depth
>>> class Residual(nn.Module):
...     def __init__(self, width):
...         super().__init__()
...         self.f = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.GELU())
...     def forward(self, x):
...         return x + self.f(x)
>>> torch.manual_seed(0) and None
>>> model = nn.Sequential(nn.Linear(2, 16), *[Residual(16) for _ in range(4)], nn.Linear(16, 2))
>>> hybrid = linearize_depth(model, ["1", "2", "3", "4"], torch.randn(256, 2), n_delays=1)
>>> hybrid(torch.randn(5, 2)).shape, hybrid.n_delays, hybrid.linear_steps
(torch.Size([5, 2]), 1, 3)
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from koopnet._checks import (
    as_tensor,
    check_delays,
    check_finite,
    check_int,
    check_is_fitted,
    check_rank_limit,
)
from koopnet.dmd import DMD
from koopnet.observables import TimeDelay
from koopnet.spec import FitSpec
from koopnet.streaming import TrajectoryMoments

__all__ = ["DepthHybrid", "collect_depth_states", "linearize_depth"]

# States up to this size are fitted in memory (SVD of the lifted pairs, best conditioned);
# larger ones are streamed into trajectory moments (O((T*W)^2) memory whatever n is).
_IN_MEMORY_BYTES = 256 * 2**20
# Errors a model raises on inputs of the wrong shape or dtype.
_MODEL_ERRORS = (RuntimeError, ValueError, TypeError, IndexError, KeyError)


# ----------------------------------------------------------------------------- validation


def _model_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def _model_device(model: nn.Module) -> torch.device:
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


def resolve_blocks(model, blocks) -> list[str]:
    """Check that ``blocks`` names distinct submodules of ``model``; return the names.

    Whether they are consecutive and keep the state's shape shows only when the model runs
    (see :func:`collect_depth_states`).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}.")
    if isinstance(blocks, str) or not isinstance(blocks, (list, tuple)):
        raise TypeError(f"blocks must be a list of qualified module names such as "
                        f"['blocks.0', 'blocks.1']; got {blocks!r}.")
    if not blocks:
        raise ValueError("blocks is empty; name at least one block, e.g. ['blocks.0'].")
    modules = dict(model.named_modules())
    valid = [name for name in modules if name]
    for name in blocks:
        if not isinstance(name, str):
            raise TypeError(f"blocks must hold module names (strings); got {name!r}.")
        if name in modules and name:
            continue
        target = _attribute(model, name)
        if target is not None:
            raise TypeError(f"block '{name}' is a {type(target).__name__}, not an nn.Module; "
                            "blocks must name submodules (see model.named_modules()).")
        shown = ", ".join(repr(v) for v in valid[:6]) + (", ..." if len(valid) > 6 else "")
        raise ValueError(f"block '{name}' is not a submodule of the model; valid names include "
                         f"{shown or 'none (the model has no submodules)'}.")
    repeated = sorted({name for name in blocks if blocks.count(name) > 1})
    if repeated:
        raise ValueError(f"blocks names {repeated[0]!r} more than once; name each block once, "
                         "in the order they run.")
    return list(blocks)


def _attribute(model: nn.Module, name: str):
    """The object a dotted name reaches by attribute access, or None."""
    target = model
    for part in name.split("."):
        try:
            target = getattr(target, part)
        except (AttributeError, TypeError):
            return None
    return target


def _check_data(model: nn.Module, data) -> torch.Tensor:
    """Data as one tensor [n, ...]: floats in the model's dtype, integers (token ids) kept."""
    if isinstance(data, torch.utils.data.DataLoader):
        xs = [torch.as_tensor(b[0] if isinstance(b, (tuple, list)) else b) for b in data]
        if not xs:
            raise ValueError("data (a DataLoader) yielded no batches; pass at least 2 samples.")
        data = torch.cat(xs)
    X = as_tensor(data, "data")
    if X.ndim < 1 or len(X) < 2:
        raise ValueError(f"data has shape {tuple(X.shape)}; pass at least 2 samples along "
                         "the first dimension.")
    if X.is_floating_point():
        X = X.to(_model_dtype(model))
    return X


# ----------------------------------------------------------------------------- states


def _to_rows(state: torch.Tensor, per_position: bool) -> torch.Tensor:
    """One state as rows: [B, W] flattened per sample, or per position [B*L, d]."""
    if not per_position or state.ndim == 2:
        return state.reshape(len(state), -1)
    if state.ndim == 3:  # [B, L, d] tokens
        return state.reshape(-1, state.shape[2])
    if state.ndim == 4:  # [B, C, H, W] feature maps: positions H*W, features C
        return state.permute(0, 2, 3, 1).reshape(-1, state.shape[1])
    raise ValueError(f"per_position=True needs states of shape [B, d], [B, L, d] or "
                     f"[B, C, H, W]; got {list(state.shape)}. Pass per_position=False.")


def _from_rows(rows: torch.Tensor, like: torch.Tensor, per_position: bool) -> torch.Tensor:
    """Inverse of :func:`_to_rows` for a state shaped as ``like``."""
    if per_position and like.ndim == 4:
        B, C, H, W = like.shape
        return rows.reshape(B, H, W, C).permute(0, 3, 1, 2)
    return rows.reshape(like.shape)


class _BlockError(TypeError):
    """A block called or returning in a way depth trajectories cannot follow."""


class _Recording:
    """Forward hooks on the blocks that record s_0 and every block output of one pass."""

    def __init__(self, modules: list[nn.Module], names: list[str]) -> None:
        self.names, self.events = names, []
        self.hooks = []
        for i, module in enumerate(modules):
            self.hooks.append(module.register_forward_pre_hook(self._pre(i)))
            self.hooks.append(module.register_forward_hook(self._post(i)))

    def _pre(self, i):
        def hook(_module, args):
            if not args or not isinstance(args[0], torch.Tensor):
                raise _BlockError(f"block '{self.names[i]}' is not called with its state as the "
                                "first positional tensor; depth trajectories need blocks "
                                "called as block(x, ...).")
            self.events.append((i, "in", args[0]))
        return hook

    def _post(self, i):
        def hook(_module, _args, output):
            if not isinstance(output, torch.Tensor):
                raise _BlockError(f"block '{self.names[i]}' returns a {type(output).__name__}, "
                                "not a tensor; depth trajectories need blocks that return the "
                                "next state.")
            self.events.append((i, "out", output))
        return hook

    def states(self, check: bool) -> list[torch.Tensor]:
        """s_0..s_T of the last pass; ``check`` verifies order, chaining and shapes."""
        n = len(self.names)
        counts = [sum(1 for j, kind, _ in self.events if j == i and kind == "out")
                  for i in range(n)]
        for i, count in enumerate(counts):
            if count != 1:
                raise ValueError(f"block '{self.names[i]}' ran {count} times in one forward "
                                 "pass; each block must run exactly once.")
        if check:
            order = [(j, kind) for j, kind, _ in self.events]
            if order != [(i, kind) for i in range(n) for kind in ("in", "out")]:
                ran = [self.names[j] for j, kind in order if kind == "out"]
                raise ValueError(f"blocks {self.names} are not consecutive: they ran as {ran} "
                                 "(or one runs inside another); name blocks in the order they "
                                 "run, each feeding the next.")
            tensors = [t for _, _, t in self.events]
            for i in range(n):
                inp, out = tensors[2 * i], tensors[2 * i + 1]
                if out.shape != inp.shape:
                    raise ValueError(f"block '{self.names[i]}' maps shape {list(inp.shape)} to "
                                     f"{list(out.shape)}; depth trajectories need blocks that "
                                     "keep the state's shape (same width in and out).")
                if i and not (inp is tensors[2 * i - 1] or torch.equal(inp, tensors[2 * i - 1])):
                    raise ValueError(f"blocks '{self.names[i - 1]}' and '{self.names[i]}' are "
                                     f"not consecutive: the input of '{self.names[i]}' is not "
                                     f"the output of '{self.names[i - 1]}'; name blocks that "
                                     "feed each other directly.")
        first_in = next(t for j, kind, t in self.events if j == 0 and kind == "in")
        outs = sorted((j, t) for j, kind, t in self.events if kind == "out")
        return [first_in, *(t for _, t in outs)]

    def remove(self) -> None:
        for hook in self.hooks:
            hook.remove()


def _runs(model: nn.Module, names: list[str], X: torch.Tensor, batch_size: int):
    """Yield s_0..s_T (a list of tensors on CPU) per batch, in eval mode and without grad.

    The first 2 samples run first as a probe, so data that does not fit the model fails with
    the shape named instead of an error from deep inside it.
    """
    modules = dict(model.named_modules())
    recording = _Recording([modules[name] for name in names], names)
    modes = {m: m.training for m in model.modules()}
    device = _model_device(model)
    model.eval()
    try:
        with torch.no_grad():
            try:
                model(X[:2].to(device))
            except _BlockError:
                raise
            except _MODEL_ERRORS as err:
                first = (str(err).strip().splitlines() or [""])[0]
                raise ValueError(f"data of shape {list(X.shape)} does not fit the model, which "
                                 f"raised {type(err).__name__}: {first} -- pass inputs shaped as "
                                 "the model expects (sample shape first dimension aside).") from err
            recording.states(check=True)
            for start in range(0, len(X), batch_size):
                recording.events.clear()
                model(X[start:start + batch_size].to(device))
                yield [s.detach().cpu() for s in recording.states(check=False)]
    finally:
        recording.remove()
        for module, mode in modes.items():
            module.train(mode)


def collect_depth_states(model: nn.Module, blocks, X, *, batch_size: int = 1024,
                         per_position: bool = False) -> torch.Tensor:
    """The trajectory of each sample through ``blocks``: s_0 (the first block's input) and
    every block's output, recorded with forward hooks in eval mode (the model is unchanged).

    Parameters
    ----------
    blocks : list of str
        Qualified names (``model.named_modules()``) of consecutive blocks, each feeding the
        next and keeping the state's shape.
    per_position : bool
        Positions as samples over the feature dimension (see the module docs).

    Shape: X [n, ...] -> states [n, T = len(blocks) + 1, W] (flattened per sample), or with
    ``per_position`` [n*L, T, d] (tokens [n, L, d]) / [n*H*W, T, C] (maps [n, C, H, W]).
    States are on the CPU in the model's dtype.
    """
    names = resolve_blocks(model, blocks)
    X = _check_data(model, X)
    batch_size = check_int(batch_size, "batch_size", low=1)
    chunks = [torch.stack([_to_rows(s, per_position) for s in states], dim=1)
              for states in _runs(model, names, X, batch_size)]
    states = torch.cat(chunks)  # [N, T, W]
    check_finite(states, "depth states", " Rescale the inputs or check the model's weights.")
    return states


# ----------------------------------------------------------------------------- the hybrid


class _Record(nn.Module):
    """A kept block that also records its input (one of s_0..s_{h-1}) for the lifting."""

    def __init__(self, block: nn.Module, buffer: list) -> None:
        super().__init__()
        self.block = block
        self.__dict__["_buffer"] = buffer  # shared with the predictor, not a submodule

    def forward(self, x, *args, **kwargs):
        self._buffer.append(x)
        return self.block(x, *args, **kwargs)


class _Skip(nn.Module):
    """A replaced block that is not the last: the state passes through unchanged."""

    def forward(self, x, *args, **kwargs):
        return x


class _Predict(nn.Module):
    """The last replaced block: lifts s_0..s_h and returns the predicted last state.

    It receives s_h unchanged (the replaced blocks before it are identities) and the earlier
    states from the recording blocks. Buffer: ``linear_map`` [W, D] (float64).
    """

    def __init__(self, observable, linear_map: torch.Tensor, buffer: list, n_delays: int,
                 per_position: bool) -> None:
        super().__init__()
        self.observable, self.n_delays, self.per_position = observable, n_delays, per_position
        self.register_buffer("linear_map", linear_map)
        self.__dict__["_buffer"] = buffer

    def forward(self, x, *args, **kwargs):
        earlier = list(self._buffer)
        self._buffer.clear()
        if len(earlier) != self.n_delays:
            raise RuntimeError(f"the depth hybrid saw {len(earlier)} earlier states where it "
                               f"needs {self.n_delays}; call the DepthHybrid itself, not its "
                               "inner model.")
        rows = torch.stack([_to_rows(s, self.per_position) for s in (*earlier, x)], dim=1)
        width = self.observable.n_features_in_
        if rows.shape[2] != width:
            raise ValueError(f"the state has {rows.shape[2]} features per row; this hybrid was "
                             f"fitted on {width} (per_position={self.per_position}).")
        lifted = self.observable.transform(rows)[:, -1]  # [N, D]
        predicted = lifted @ self.linear_map.to(lifted.dtype).T  # [N, W]
        return _from_rows(predicted, x, self.per_position)

    def extra_repr(self) -> str:
        return f"n_delays={self.n_delays}, linear_map={list(self.linear_map.shape)}"


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


class DepthHybrid(nn.Module):
    """A copy of ``model`` whose blocks h..end are replaced by one linear map (h = delays).

    Calling it runs the model as usual, except that blocks[0..h-1] run and record their
    inputs, blocks[h..-2] pass the state through, and the last block lifts s_0..s_h with
    ``observable`` and returns ``linear_map @ g_h``: the state the DMD predicts after
    ``len(blocks) - h`` steps, reshaped back; what follows the last block runs unchanged.
    ``model`` itself is deep-copied, never modified.

    Build one with :func:`linearize_depth`; the constructor takes a fitted observable (whose
    ``n_delays_`` is h) and a DMD fitted on its lifted states. ``linear_map`` [W, D] is stored
    in float64 and applied in the states' dtype; it moves with ``.to(device)``.
    """

    def __init__(self, model: nn.Module, blocks, observable: TimeDelay, dmd: DMD, *,
                 per_position: bool = False) -> None:
        super().__init__()
        names = resolve_blocks(model, blocks)
        check_is_fitted(observable, "n_features_in_")
        check_is_fitted(dmd, "operator_")
        h = check_delays(observable.n_delays_, len(names) + 1, fix="name more blocks")
        if dmd.n_features_in_ != observable.n_output_features_:
            raise ValueError(f"the DMD was fitted on {dmd.n_features_in_} lifted features; this "
                             f"observable gives {observable.n_output_features_}. Fit the DMD "
                             "on observable.transform(states).")
        if not isinstance(per_position, bool):
            raise TypeError(f"per_position={per_position!r} must be True or False.")
        self.blocks, self.n_delays, self.per_position = names, h, per_position
        self.linear_steps = len(names) - h
        self.observable, self.dmd_ = observable, dmd
        readout = observable.readout(observable.n_features_in_).to(dmd.dtype)  # [W, D]
        linear_map = dmd.transition(self.linear_steps, readout).to(_model_device(model))
        self.model = copy.deepcopy(model)
        self.__dict__["_buffer"] = buffer = []
        modules = dict(self.model.named_modules())
        for name in names[:h]:
            _set_module(self.model, name, _Record(modules[name], buffer))
        for name in names[h:-1]:
            _set_module(self.model, name, _Skip())
        predict = _Predict(observable, linear_map, buffer, h, per_position)
        self.__dict__["_predict"] = predict  # a shortcut, not a second copy in the state_dict
        _set_module(self.model, names[-1], predict)

    @property
    def linear_map(self) -> torch.Tensor:
        """The precomputed map of the replaced steps, lifted g_h -> last state. Shape: [W, D]."""
        return self._predict.linear_map

    @property
    def rank_(self) -> int:
        return self.dmd_.rank_

    def forward(self, *args, **kwargs):
        self._buffer.clear()
        try:
            return self.model(*args, **kwargs)
        finally:
            self._buffer.clear()

    def extra_repr(self) -> str:
        return (f"blocks={self.blocks[0]!r}..{self.blocks[-1]!r}, n_delays={self.n_delays}, "
                f"linear_steps={self.linear_steps}, rank={self.rank_}, "
                f"per_position={self.per_position}")



# ----------------------------------------------------------------------------- the fit


def _make_spec(spec, n_delays, rank, tikhonov, constant) -> FitSpec:
    loose = {k: v for k, v in (("n_delays", n_delays), ("rank", rank), ("tikhonov", tikhonov),
                               ("constant", constant)) if v is not None}
    if spec is None:
        return FitSpec(**{"n_delays": 1, "exact_rollout": True, **loose})
    if loose:
        raise ValueError(f"pass either spec=FitSpec(...) or the keywords {sorted(loose)}, "
                         "not both.")
    if not isinstance(spec, FitSpec):
        raise TypeError(f"spec must be a koopnet.FitSpec; got {type(spec).__name__}.")
    if spec.pairing != "trajectory":
        raise ValueError(f"spec.pairing={spec.pairing!r}: depth trajectories are fitted with "
                         "pairing='trajectory' (windows never cross from one sample into the "
                         "next); pass FitSpec(..., pairing='trajectory').")
    return spec


def linearize_depth(model: nn.Module, blocks, data, *, spec: FitSpec | None = None,
                    n_delays: int | None = None, rank=None, tikhonov: float | None = None,
                    constant: bool | None = None, per_position: bool = False,
                    batch_size: int = 1024) -> DepthHybrid:
    """Replace blocks h..end of a residual stack by a DMD operator fitted along depth.

    Parameters
    ----------
    model : nn.Module
        A trained network; it is not modified (the result holds a copy).
    blocks : list of str
        Qualified names of consecutive same-shape blocks, e.g. ``["blocks.0", ...,
        "blocks.5"]``; their states s_0..s_T (T = len(blocks)) form each trajectory.
    data : Tensor, array or DataLoader
        Inputs ``[n, ...]`` as the model takes them (floats are cast to the model's dtype,
        integer token ids kept).
    spec : FitSpec, optional
        How to fit (pairing must be "trajectory"); or the loose keywords ``n_delays``
        (default 1: the first block runs), ``rank``, ``tikhonov``, ``constant``, which default
        to an exact-DMD roll-out (``exact_rollout=True``, see the module docs).
    per_position : bool
        One operator over positions' features instead of the flattened state.

    Returns
    -------
    DepthHybrid
        An ``nn.Module`` with the model's input and output shapes, in eval mode, holding
        ``dmd_`` and ``observable``.

    Shape: data [n, ...] -> states [n, T+1, W] (or [n*L, T+1, d]) -> hybrid(x) as model(x).
    """
    spec = _make_spec(spec, n_delays, rank, tikhonov, constant)
    names = resolve_blocks(model, blocks)
    if not isinstance(per_position, bool):
        raise TypeError(f"per_position={per_position!r} must be True or False.")
    batch_size = check_int(batch_size, "batch_size", low=1)
    n_states = len(names) + 1
    check_delays(spec.n_delays, n_states, fix="name more blocks")
    for key, value in model.state_dict().items():
        check_finite(value, f"model parameter '{key}'",
                     " The model diverged or was saved broken; retrain or re-export it.")
    X = _check_data(model, data)
    runs = _runs(model, names, X, batch_size)
    try:
        return _fit(model, names, X, spec, runs, per_position, batch_size)
    finally:
        runs.close()  # removes the hooks at once, even when the fit fails


def _fit(model, names, X, spec, runs, per_position, batch_size) -> DepthHybrid:
    n_states, h = len(names) + 1, spec.n_delays
    first = torch.stack([_to_rows(s, per_position) for s in next(runs)], dim=1)  # [N, T, W]
    rows_per_sample, width = len(first) // min(len(X), batch_size), first.shape[2]
    observable = spec.observable().fit(first[:1])
    check_rank_limit(spec.rank, observable.n_output_features_,
                     len(X) * rows_per_sample * (n_states - 1 - h))
    dmd = spec.dmd()
    if len(X) * rows_per_sample * n_states * width * 8 <= _IN_MEMORY_BYTES:
        states = torch.cat([first, *(torch.stack([_to_rows(s, per_position) for s in batch], 1)
                                     for batch in runs)]).to(torch.float64)  # [N, T, W]
        check_finite(states, "depth states", " Rescale the inputs or check the model's weights.")
        dmd.fit(observable.transform(states))  # lifted [N, T-h, D]
    else:
        moments = TrajectoryMoments(n_states, width).update(first.to(torch.float64))
        for batch in runs:
            moments.update(torch.stack([_to_rows(s, per_position) for s in batch], 1))
        check_finite(moments.moments, "depth state moments",
                     " Rescale the inputs or check the model's weights.")
        dmd.fit_statistics(moments.pair_statistics(h, constant=spec.constant))
    return DepthHybrid(model, names, observable, dmd, per_position=per_position).eval()

