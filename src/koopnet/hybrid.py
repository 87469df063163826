"""The Koopman hybrid: a network whose tail of the trajectory is one linear operator.

It runs the scaled network up to state s_h (the head and the first h inserted blocks), lifts the
states s_0..s_h into delay coordinates, advances them m = T-1-h steps with the fitted operator,
reads the last state back out as neurons, drops the padding and runs the rest of the original
network. Because every step is linear, the m steps collapse into one matrix
``linear_map = R V A~^m V^T`` [w', D] (R the read-out), so inference is a single GEMM.
As in the paper, the read-out is the real, un-activated predicted state.

The map is fitted and stored in float64 but applied in the network's own precision (float32
for a float32 network), as an ``nn.Linear`` would be: a float64 GEMM plus the casts made the
hybrid 2-3x slower for a rounding difference far below float32 activations' own. Set
``compute_dtype=torch.float64`` to apply it in double precision.

:meth:`KoopmanHybrid.fold` turns a hybrid into a plain ``nn.Sequential`` for export.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections import OrderedDict

import torch
from torch import nn

from koopnet._checks import check_delays, check_int, check_is_fitted, check_width_preserving
from koopnet.dmd import DMD
from koopnet.fold import Cast, DelayWindow, LearnedLift, linear_layers, window_map
from koopnet.learned import LearnedObservable, PsiFollowsDevice
from koopnet.models import model_device
from koopnet.observables import TimeDelay
from koopnet.scaling import ScaledMLP
from koopnet.trajectories import PAD_VALUE


class KoopmanHybrid(PsiFollowsDevice, nn.Module):
    """Scaled network with steps h+1..T-1 of its trajectory replaced by a fitted linear operator.

    Build one with :meth:`from_dmd` (from a scaled network and a fitted DMD); the constructor
    takes the parts themselves, which is how :func:`koopnet.load_hybrid` rebuilds a saved one.

    Shape: x [B, features] -> logits [B, classes]. Buffers: ``basis`` [D, R], ``operator``
    [R, R], ``readout`` [w', D] and ``linear_map`` [w', D] (all float64).
    ``compute_dtype``: precision of the map's GEMM; None = the states' dtype.
    """

    def __init__(self, head: nn.Module, prefix: nn.Sequential | TimeDelay, tail, observable=None,
                 *, basis: torch.Tensor | None = None, operator: torch.Tensor | None = None,
                 readout: torch.Tensor | None = None, linear_map: torch.Tensor | None = None,
                 layer: int = 0, width: int = 0, linear_steps: int = 1,
                 pad_value: float = PAD_VALUE, compute_dtype: torch.dtype | None = None,
                 dmd: DMD | None = None, scaled: ScaledMLP | None = None, scaling_report=None,
                 n_blocks: int | None = None) -> None:
        if isinstance(head, ScaledMLP):  # the 0.1 signature KoopmanHybrid(scaled, observable, dmd)
            warnings.warn("KoopmanHybrid(scaled, observable, dmd) is deprecated and will be "
                          "removed in koopnet 0.3; use KoopmanHybrid.from_dmd(scaled, "
                          "observable, dmd).", DeprecationWarning, stacklevel=2)
            parts = self._parts(head, prefix, tail, n_blocks)
            self.__init__(**parts, pad_value=pad_value, compute_dtype=compute_dtype, dmd=tail)
            return
        super().__init__()
        check_is_fitted(observable, "n_features_in_")
        h = observable.n_delays_
        D, R = observable.n_output_features_, operator.shape[0]
        shapes = {"basis": (D, R), "operator": (R, R), "readout": (linear_map.shape[0], D),
                  "linear_map": (linear_map.shape[0], D)}
        for name, tensor in zip(shapes, (basis, operator, readout, linear_map), strict=True):
            if tuple(tensor.shape) != shapes[name]:
                raise ValueError(f"{name} has shape {list(tensor.shape)}; this observable "
                                 f"(D={D}) and rank {R} need {list(shapes[name])}.")
        if compute_dtype is not None and not (isinstance(compute_dtype, torch.dtype)
                                              and compute_dtype.is_floating_point):
            raise TypeError(f"compute_dtype={compute_dtype!r} must be None or a floating "
                            "torch.dtype such as torch.float64.")
        self.head, self.prefix, self.tail = head, prefix, tail
        observable = self._own_observable(observable, linear_map.device)
        self.observable, self.pad_value, self.compute_dtype = observable, pad_value, compute_dtype
        self.layer, self.n_delays, self.n_blocks = layer, h, len(prefix)
        self.width, self.out_width = width, linear_map.shape[0]
        self.linear_steps = check_int(linear_steps, "linear_steps", low=1)
        self.register_buffer("basis", basis)
        self.register_buffer("operator", operator)
        self.register_buffer("readout", readout)
        self.register_buffer("linear_map", linear_map)
        self.dmd_, self.scaling_report_ = dmd, scaling_report
        self.__dict__["scaled_"] = scaled  # outside the module tree: state_dict stays the hybrid's

    @classmethod
    def from_dmd(cls, scaled: ScaledMLP, observable: TimeDelay, dmd: DMD, *,
                 n_blocks: int | None = None, pad_value: float = PAD_VALUE,
                 compute_dtype: torch.dtype | None = None, keep_scaled: bool = False,
                 scaling_report=None) -> KoopmanHybrid:
        """The hybrid of a scaled network, a fitted observable and a DMD fitted on it.

        ``n_blocks``: inserted blocks run before lifting (default h); more than h lets a
        dictionary with fewer delays (e.g. plain DMD) start its roll-out later.
        ``keep_scaled`` keeps a reference to ``scaled`` as ``scaled_`` (not a submodule).
        """
        return cls(**cls._parts(scaled, observable, dmd, n_blocks), pad_value=pad_value,
                   compute_dtype=compute_dtype, dmd=dmd,
                   scaled=scaled if keep_scaled else None, scaling_report=scaling_report)

    @staticmethod
    def _parts(scaled: ScaledMLP, observable: TimeDelay, dmd: DMD,
               n_blocks: int | None) -> dict:
        check_width_preserving(scaled.inserts, scaled.width)
        check_is_fitted(dmd, "operator_")
        check_is_fitted(observable, "n_features_in_")
        h = check_int(observable.n_delays_, "n_delays", low=0)
        blocks = h if n_blocks is None else check_int(n_blocks, "n_blocks", low=h)
        check_delays(blocks, scaled.n_states)
        linear_steps = scaled.n_states - 1 - blocks
        readout = observable.readout(scaled.out_width).to(dmd.basis_.device, dmd.dtype)
        device = model_device(scaled)  # the buffers follow the network, wherever the fit ran
        buffers = {"basis": dmd.basis_, "operator": dmd.operator_, "readout": readout,
                   "linear_map": dmd.transition(linear_steps, readout)}
        return {"head": scaled.head, "prefix": scaled.inserts[:blocks], "tail": scaled.tail,
                "observable": observable, **{k: v.to(device) for k, v in buffers.items()},
                "layer": scaled.layer, "width": scaled.width, "linear_steps": linear_steps}

    @property
    def rank_(self) -> int:
        """Rank R of the fitted operator."""
        return self.operator.shape[0]

    @property
    def nonlinear_blocks(self) -> int:
        """Inserted nonlinear blocks still run (the first h of the N)."""
        return self.n_blocks

    @property
    def encoder_blocks(self) -> int:
        """A learned observable's psi in inserted blocks (W^2 multiply-adds each, rounded up):
        nonlinear work like the blocks, so result rows count it against the linear steps
        (issue 11). 0 for a dictionary without a trained encoder."""
        macs = getattr(self.observable, "nonlinear_macs", None)
        return 0 if macs is None else math.ceil(macs() / self.width ** 2)

    @property
    def n_replacement_parameters(self) -> int:
        """Entries of the linear replacement as applied: the [w', D] map."""
        return self.linear_map.numel()

    def prefix_states(self, x: torch.Tensor) -> torch.Tensor:
        """States s_0..s_h of the scaled network. Shape: [B, features] -> [B, h+1, W_padded]."""
        state = self.head(x)
        states = [state]
        for block in self.prefix:
            state = block(state)
            states.append(state)
        states = torch.stack(states, dim=1)  # [B, h+1, W]
        pad = self.observable.n_features_in_ - states.shape[2]
        return nn.functional.pad(states, (0, pad), value=self.pad_value) if pad else states

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_states(self.prefix_states(x))

    def forward_states(self, states: torch.Tensor) -> torch.Tensor:
        """Logits from already computed states s_0..s_k (k >= h), e.g. a collected trajectory.

        Lets a sweep over h, rank and regularisation reuse one forward pass of the network.
        Shape: states [B, k+1, W] -> logits [B, classes].
        """
        states = states[:, self.n_blocks - self.n_delays: self.n_blocks + 1]  # [B, h+1, W]
        return self.forward_lifted(self.observable.transform(states)[:, -1])  # lifted [B, D]

    def forward_lifted(self, lifted: torch.Tensor) -> torch.Tensor:
        """Logits from the lifted state g_h, e.g. lifted once and scored by many fits.

        Shape: lifted [B, D] -> logits [B, classes].
        """
        dtype = self.compute_dtype or lifted.dtype
        predicted = lifted.to(dtype) @ self.linear_map.to(dtype).T  # [B, w']
        return self.tail(predicted.to(lifted.dtype))

    def fold(self, *, factored: bool | None = None) -> nn.Sequential:
        """The hybrid as a plain ``nn.Sequential`` of standard torch modules, for export.

        Children: ``head``; ``block1``.. for the inserted blocks run before the delay window
        (only when ``n_blocks`` > h); ``window``, a :class:`koopnet.fold.DelayWindow` that runs
        the last h prefix blocks and hands on [s_k, ..., s_{k-h}] (only when h > 0, because a
        Sequential passes one tensor and the map needs every state of the window); ``map``, the
        linear map; ``tail``. The padding and constant columns of ``linear_map`` are folded into
        the map's bias (they are the same for every sample), so the map reads (h+1) w inputs
        instead of D. It is applied in ``compute_dtype`` between two casts when that differs from
        the network's precision, as :meth:`forward_lifted` does.

        ``factored``: when the map's numerical rank r (float64 SVD, numerically zero singular
        values dropped) makes r ((h+1) w + w') < (h+1) w w', the map is applied in factored
        form, ``nn.Sequential(nn.Linear((h+1) w, r, bias=False), nn.Linear(r, w'))``: fewer
        multiply-adds for the same function. None (default) chooses so; True or False forces
        it. The modules are copies with gradients off, in eval mode, so the result does not
        change when the hybrid does. A :class:`~koopnet.learned.LearnedObservable` adds ``lift``
        (a :class:`koopnet.fold.LearnedLift` computing psi, which is nonlinear) before ``map``,
        and the map reads psi's r outputs too. Other dictionaries are not folded.
        Shape: x [B, features] -> logits [B, classes].
        """
        learned = type(self.observable) is LearnedObservable
        if type(self.observable) is not TimeDelay and not learned:
            raise TypeError(f"fold() needs a TimeDelay observable; this hybrid lifts with "
                            f"{self.observable!r}, whose features are not linear in the states "
                            "(a LearnedObservable, whose psi fold() runs as a module, is the "
                            "other kind it folds). Run the hybrid itself.")
        if factored is not None and not isinstance(factored, bool):
            raise TypeError(f"factored={factored!r} must be None (choose by cost), True or "
                            "False.")
        h, k = self.n_delays, self.n_blocks
        parameter = next(self.head.parameters())
        net_dtype, device = parameter.dtype, parameter.device
        weight, bias = window_map(self.linear_map, n_states=h + 1, width=self.width,
                                  padded_width=self.observable.n_features_in_,
                                  pad_value=self.pad_value, constant=self.observable.constant,
                                  n_latent=self.observable.latent_dims_ if learned else 0)
        dtype = self.compute_dtype or net_dtype
        linear = linear_layers(weight, bias, factored=factored, dtype=dtype, device=device)
        if dtype != net_dtype:
            linear = nn.Sequential(Cast(dtype), linear, Cast(net_dtype))
        blocks = [copy.deepcopy(block) for block in self.prefix]
        parts = [("head", copy.deepcopy(self.head))]
        parts += [(f"block{i + 1}", block) for i, block in enumerate(blocks[:k - h])]
        if h:
            parts.append(("window", DelayWindow(blocks[k - h:])))
        if learned:
            observable = self.observable
            parts.append(("lift", LearnedLift(
                copy.deepcopy(observable.psi_), observable.mean_, observable.std_,
                n_states=h + 1, width=self.width, padded_width=observable.n_features_in_,
                pad_value=self.pad_value)))
        parts += [("map", linear), ("tail", copy.deepcopy(self.tail))]
        return nn.Sequential(OrderedDict(parts)).requires_grad_(False).eval()

    def extra_repr(self) -> str:
        return (f"layer={self.layer}, n_delays={self.n_delays}, linear_steps={self.linear_steps}, "
                f"rank={self.rank_}")
