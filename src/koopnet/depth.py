"""Depth as a trajectory: residual streams of MLPs, CNNs and transformers, with no scaling.

In a residual network the state that flows through a stack of same-shape blocks already is a
trajectory: s_0 is the input of the first block and s_t the output of block t. No layer has to
be scaled (no blocks inserted, nothing trained) before a DMD is fitted on it, so
:func:`linearize_depth` only runs the model with forward hooks, lifts the states with delays
(or, with ``FitSpec(observable_kind="learned")``, delays plus an encoder psi trained on the
states: :class:`~koopnet.learned.LearnedObservable`), fits the operator and returns
:class:`DepthHybrid`, a copy of the model that runs the first h blocks, advances the remaining
``len(blocks) - h`` steps with one precomputed linear map and carries on after the last block
as the original would. The states come from :mod:`koopnet.depth_states` (forward hooks, with
every rule about the blocks checked there).

Two views of a state that is more than a vector (tokens [B, L, d], feature maps [B, C, H, W]):

- ``per_position=False`` (default): one operator over the whole state flattened per sample,
  W = L*d or C*H*W. It can mix positions (as attention does) but its size grows as W^2.
- ``per_position=True``: positions are samples over the feature dimension, states
  [B*L, T, d] (for feature maps [B*H*W, T, C]); one shared d x d-sized operator, as in
  per-token DMD along the depth of vision transformers. It cannot move information between
  positions, which is the price of its much smaller size.

Large states, and every fit under an initialised ``torch.distributed`` group of more than one
rank (``torchrun --nproc_per_node N script.py``), take the streamed route: the states are
summed into :class:`~koopnet.streaming.TrajectoryMoments` batch by batch, each rank running
the model on its own contiguous shard of ``data`` only, and one all-reduce adds the moments
up, so every rank returns the same hybrid. Smaller states in one process are fitted in memory
(SVD of the lifted pairs). A learned observable needs that route: psi is trained on the states
themselves, which moments do not hold, so a learned spec on the streamed route is refused. The
two routes fit the same pairs, without centering, and give the same operator up to rounding,
which the Gram route's squared condition number amplifies to about eps * cond(X)^2; a singular
value between the two routes' noise floors (SVD: max(n, D) eps S_max, Gram: sqrt(D eps) S_max)
is kept by one and cut by the other, so compare near-singular lifts at an explicit ``rank``.

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
import functools

import torch
from torch import nn

from koopnet._checks import check_delays, check_finite, check_int, check_is_fitted, check_rank_limit
from koopnet.depth_states import (
    check_data,
    collect_depth_states,
    depth_runs,
    from_rows,
    resolve_blocks,
    to_rows,
)
from koopnet.distributed import is_distributed, sharded_statistics
from koopnet.dmd import DMD
from koopnet.learned import LearnedObservable, PsiFollowsDevice
from koopnet.models import model_device
from koopnet.observables import TimeDelay
from koopnet.spec import FitSpec
from koopnet.submodule import fit_states

__all__ = ["DepthHybrid", "collect_depth_states", "linearize_depth"]

# States up to this size are fitted in memory (SVD of the lifted pairs, best conditioned);
# larger ones are streamed into trajectory moments (O((T*W)^2) memory whatever n is).
_IN_MEMORY_BYTES = 256 * 2**20


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
        rows = torch.stack([to_rows(s, self.per_position) for s in (*earlier, x)], dim=1)
        width = self.observable.n_features_in_
        if rows.shape[2] != width:
            raise ValueError(f"the state has {rows.shape[2]} features per row; this hybrid was "
                             f"fitted on {width} (per_position={self.per_position}).")
        lifted = self.observable.transform(rows)[:, -1]  # [N, D]
        predicted = lifted @ self._map_as(lifted.dtype).T  # [N, W]
        return from_rows(predicted, x, self.per_position)

    def _map_as(self, dtype: torch.dtype) -> torch.Tensor:
        """``linear_map`` cast to ``dtype``, cached: casting a [W, D] map on every call cost
        more than the product itself at small batches. The cache is keyed on the buffer itself,
        its version (in-place edits), device and the dtype, so it never goes stale."""
        source = self.linear_map
        key = (source._version, source.device, dtype)
        cached = self.__dict__.get("_cast")  # (source, key, cast); holding source keeps it
        if cached is None or cached[0] is not source or cached[1] != key:  # from being reused
            cached = (source, key, source.to(dtype))
            self.__dict__["_cast"] = cached
        return cached[2]

    def extra_repr(self) -> str:
        return f"n_delays={self.n_delays}, linear_map={list(self.linear_map.shape)}"


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


class DepthHybrid(PsiFollowsDevice, nn.Module):
    """A copy of ``model`` whose blocks h..end are replaced by one linear map (h = delays).

    Calling it runs the model as usual, except that blocks[0..h-1] run and record their
    inputs, blocks[h..-2] pass the state through, and the last block lifts s_0..s_h with
    ``observable`` and returns ``linear_map @ g_h``: the state the DMD predicts after
    ``len(blocks) - h`` steps, reshaped back; what follows the last block runs unchanged.
    ``model`` itself is deep-copied, never modified.

    Build one with :func:`linearize_depth`; the constructor takes a fitted observable (whose
    ``n_delays_`` is h): a :class:`~koopnet.observables.TimeDelay` or a
    :class:`~koopnet.learned.LearnedObservable` (copied, so that its psi can follow this
    module), and a DMD fitted on its lifted states. ``linear_map`` [W, D] is stored in float64
    and applied in the states' dtype; it and psi start on the model's device and move with
    ``.to(device)``.
    """

    def __init__(self, model: nn.Module, blocks, observable: TimeDelay | LearnedObservable,
                 dmd: DMD, *,
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
        readout = observable.readout(observable.n_features_in_).to(dmd.dtype)  # [W, D]
        linear_map = dmd.transition(self.linear_steps, readout).to(model_device(model))
        observable = self._own_observable(observable, linear_map.device)
        self.observable, self.dmd_ = observable, dmd
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
        How to fit (pairing must be "trajectory"; ``observable_kind="learned"`` trains psi on
        all the states in memory, so it is refused where they would be streamed); or the
        loose keywords ``n_delays``
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
    X = check_data(model, data)
    states_of = functools.partial(_states, model, names, X, per_position, batch_size)
    probe = _probe(model, names, X, per_position)  # [2 or 2L, T, W]
    rows_per_sample, width = len(probe) // 2, probe.shape[2]
    # fitted on the probe for its widths only (psi untrained); checks the spec before any work
    observable = spec.replace(n_steps=0).observable().fit(probe[:1])
    check_rank_limit(spec.rank, observable.n_output_features_,
                     len(X) * rows_per_sample * (n_states - 1 - spec.n_delays))
    sample_bytes = rows_per_sample * n_states * width * 8
    if not is_distributed() and len(X) * sample_bytes <= _IN_MEMORY_BYTES:
        states = states_of(0, len(X)).to(torch.float64)  # [N, T, W]
        check_finite(states, "depth states", " Rescale the inputs or check the model's weights.")
        observable, dmd = fit_states(states, spec)  # psi, if any, trained on all the states
    else:  # streamed; under torch.distributed each rank runs its shard, one all-reduce
        _check_streamable(spec, len(X), sample_bytes)
        stats = sharded_statistics(states_of, len(X), spec.n_delays, constant=spec.constant,
                                   batch_size=batch_size)
        check_finite(stats.xx, "depth state moments",  # the same on every rank: all raise
                     " Rescale the inputs or check the model's weights.")
        dmd = spec.dmd().fit_statistics(stats)
    return DepthHybrid(model, names, observable, dmd, per_position=per_position).eval()


def _check_streamable(spec: FitSpec, n_samples: int, sample_bytes: int) -> None:
    """Refuse a learned observable on the streamed route: moments cannot train psi, which
    needs the states themselves (the same decision, and error, on every rank)."""
    if spec.observable_kind == "delay":
        return
    if is_distributed():
        why = ("under torch.distributed every rank holds only its shard of them; run this fit "
               "in one process (without torchrun)")
    else:
        why = (f"the states of these {n_samples} samples take "
               f"{n_samples * sample_bytes / 2**20:.1f} MiB, over the "
               f"{_IN_MEMORY_BYTES / 2**20:.1f} MiB fitted in memory; pass at most "
               f"{_IN_MEMORY_BYTES // sample_bytes} samples")
    raise ValueError(f"spec.observable_kind={spec.observable_kind!r} trains psi on all the depth "
                     f"states at once, which the streamed fit (moments only) never holds: {why}, "
                     "or pass FitSpec(..., observable_kind='delay').")


def _states(model, names, X, per_position, batch_size, start: int, stop: int) -> torch.Tensor:
    """Depth states of samples start..stop-1, run ``batch_size`` at a time. Shape: [b, T, W]."""
    runs = depth_runs(model, names, X[start:stop], batch_size)
    try:
        return torch.cat([torch.stack([to_rows(s, per_position) for s in batch], dim=1)
                          for batch in runs])
    finally:
        runs.close()  # removes the hooks at once, even when a batch fails


def _probe(model, names, X, per_position) -> torch.Tensor:
    """States of the first two samples; data that does not fit the model fails here, named
    by its whole shape, on every rank before any collective. Shape: [2 or 2L, T, W]."""
    runs = depth_runs(model, names, X, 2)
    try:
        return torch.stack([to_rows(s, per_position) for s in next(runs)], dim=1)
    finally:
        runs.close()
