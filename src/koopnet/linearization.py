"""The method in one call: scale a layer, collect trajectories, lift, fit, build the hybrid.

``linearize(model, layer=k, data=X)`` runs the whole method on an ``nn.Sequential`` MLP of
``[Linear, activation, ..., Linear]`` blocks (Dropout, a LayerNorm or BatchNorm1d before an
activation and a trailing Softmax are allowed): it
scales hidden layer k (inserts ``n_inserted`` width-preserving blocks and trains them, originals
frozen), collects the trajectories of ``data`` through them, lifts them as a
:class:`~koopnet.spec.FitSpec` says, fits a DMD and returns the
:class:`~koopnet.hybrid.KoopmanHybrid`. :func:`fit_hybrid` is the second half of ``linearize``
for an already scaled model. ``linearize(model, target="blocks.2.mlp", data=X)`` scales one
submodule of any ``nn.Module`` instead (:mod:`koopnet.submodule`) and returns a copy of the whole
model with the target behind the operator. Everything is checked before any training, so a bad
argument fails in a second, not after minutes.

No I/O happens here: saving is :mod:`koopnet.io.serialize`.

Shape: data [n, features] -> hybrid(x) [n, classes].
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import sys
import warnings

import numpy as np
import torch
from torch import nn

from koopnet._checks import (
    as_tensor,
    check_delays,
    check_finite,
    check_int,
    check_rank_limit,
    check_width_preserving,
)
from koopnet.distributed import is_distributed, sharded_statistics
from koopnet.hybrid import KoopmanHybrid
from koopnet.models import (
    TrainConfig,
    check_layer,
    mlp_blocks,
    mlp_layout,
    model_device,
    model_dtype,
)
from koopnet.observables import TimeDelay
from koopnet.scaling import DEFAULT_SCALING, ScaledMLP, scale_layer
from koopnet.spec import FitSpec
from koopnet.submodule import capture_target, fit_states, scale_target
from koopnet.trajectories import collect_trajectories

__all__ = ["check_inputs", "describe_recipe", "fit_hybrid", "linearize", "model_dtype",
           "scaling_recipe"]

log = logging.getLogger(__name__)

_HALF = (torch.float16, torch.bfloat16)






def check_inputs(data, labels=None, *, dtype=torch.float32, name: str = "data"):
    """A tensor, array or DataLoader (yielding x or (x, y)) -> X [n, features], y [n] or None.

    Inputs with more than 2 dimensions (images) are flattened per sample, as the paper's MLP did.
    """
    loader_labels = None
    if isinstance(data, torch.utils.data.DataLoader):
        xs, ys = [], []
        for batch in data:
            if isinstance(batch, dict):
                raise TypeError(f"{name} (a DataLoader) yields dicts (keys {sorted(batch)}); "
                                "koopnet needs batches of x or (x, y): wrap the dataset so "
                                "that it returns tuples.")
            if isinstance(batch, (tuple, list)):
                xs.append(torch.as_tensor(batch[0]))
                if len(batch) > 1:
                    ys.append(torch.as_tensor(batch[1]))
            else:
                xs.append(torch.as_tensor(batch))
        if not xs:
            raise ValueError(f"{name} (a DataLoader) yielded no batches; pass at least 2 samples.")
        data = torch.cat([x.reshape(len(x), -1) for x in xs])
        loader_labels = torch.cat(ys) if len(ys) == len(xs) else None
    elif isinstance(data, (np.ndarray, torch.Tensor)) and data.ndim > 2:
        data = data.reshape(len(data), -1)  # [n, features]
    elif isinstance(data, (np.ndarray, torch.Tensor)) and data.ndim < 2:
        raise ValueError(f"{name} has shape {tuple(data.shape)}; pass [n_samples, n_features] "
                         "(one sample as x[None], one feature as x[:, None]).")
    X = as_tensor(data, name, ndim=2, dtype=dtype)
    if len(X) < 2:
        raise ValueError(f"{name} has {len(X)} sample; koopnet needs at least 2 (one trajectory "
                         "per sample, fitted jointly). Pass more inputs.")
    y = loader_labels if labels is None else labels
    if y is not None:
        y = as_tensor(y, "labels", ndim=1)
        if y.is_floating_point():
            if not bool((y == y.round()).all()):
                raise ValueError("labels must be integer class indices; got fractional values.")
        y = y.to(torch.int64)
        if len(y) != len(X):
            raise ValueError(f"labels has {len(y)} entries but {name} has {len(X)} samples; "
                             "pass one label per sample.")
        if int(y.min()) < 0:
            raise ValueError(f"labels must be class indices >= 0; got {int(y.min())}.")
    return X, y


def check_model(model, X: torch.Tensor, layer: int, y=None) -> None:
    """Finite parameters of one dtype, the right input width, labels within the model's classes
    and finite activations, each named.

    The activations are computed in the model's dtype (``X`` is cast to it): a data file is
    read as float32 whatever precision the weights were saved in.
    """
    modules = mlp_layout(model)
    dtypes = {str(p.dtype).removeprefix("torch.") for p in model.parameters()
              if p.is_floating_point()}
    if len(dtypes) > 1:
        raise ValueError(f"the model's parameters mix the dtypes {sorted(dtypes)}; save them in "
                         "one precision (e.g. model.double() or model.float() before export).")
    for key, value in model.state_dict().items():
        check_finite(value, f"model parameter '{key}'",
                     " The model diverged or was saved broken; retrain or re-export it.")
    expected = modules[0].in_features
    if X.shape[1] != expected:
        raise ValueError(f"data has {X.shape[1]} features per sample but the model's first layer "
                         f"expects {expected}; pass inputs of width {expected} (flattened).")
    n_classes = modules[-1].out_features
    if y is not None and int(y.max()) >= n_classes:
        raise ValueError(f"labels go up to {int(y.max())} but the model has {n_classes} "
                         f"outputs (classes 0..{n_classes - 1}); pass the labels the model was "
                         "trained on.")
    with torch.no_grad():  # up to the replaced layer's activation
        state = X.to(model_dtype(model))
        for i, module in enumerate(modules[:sum(map(len, mlp_blocks(model)[:layer + 1]))]):
            state = module(state)
            check_finite(state, f"activations of model[{i}] ({type(module).__name__})",
                         " Rescale the inputs or check the model's weights.")


def scaling_recipe(n_samples: int, *, steps: int = 1000,
                   base: TrainConfig = DEFAULT_SCALING) -> TrainConfig:
    """The default scaling recipe sized to the data: about ``steps`` AdamW steps whatever the
    number of samples, and an early stop once the loss stops improving.

    Scaling regresses fixed pairs, so the step count, not the number of epochs, is what the
    fit needs; a recipe in epochs sized for 5k Yin-Yang points would run 4x longer on 20k
    images for nothing. Up to ``base.batch_size`` samples this is ``base`` itself (full batch).
    """
    n_samples = check_int(n_samples, "n_samples", low=1)
    batch = min(base.batch_size, n_samples)
    per_epoch = math.ceil(n_samples / batch)
    if per_epoch == 1:
        return base
    patience = max(1, (base.plateau_patience or 100) // per_epoch)
    return dataclasses.replace(base, batch_size=batch, epochs=math.ceil(steps / per_epoch),
                               plateau_patience=patience, stop_patience=3 * patience)


def describe_recipe(recipe: TrainConfig, n_samples: int) -> str:
    """One line saying what a scaling recipe will do on ``n_samples`` samples."""
    steps = recipe.epochs * math.ceil(n_samples / recipe.batch_size)
    stop = (f", early stop after {recipe.stop_patience} epochs without improvement"
            if recipe.stop_patience else "")
    return (f"scaling on {n_samples} samples: up to {steps} AdamW steps ({recipe.epochs} epochs "
            f"of batch {min(recipe.batch_size, n_samples)}, lr {recipe.lr:g}){stop}")


def _check_spec(spec: FitSpec, n_states: int, width: int, n_samples: int,
                fix: str = "insert more blocks (n_inserted >= n_delays)") -> None:
    """Every check of a fit that needs no trajectories (the DMD would refuse the same later)."""
    if not isinstance(spec, FitSpec):
        raise TypeError(f"spec must be a koopnet.FitSpec; got {type(spec).__name__}.")
    check_delays(spec.n_delays, n_states, fix=fix)
    D = spec.observable().lifted_width(width)
    if spec.pairing == "concatenated":
        pairs = n_samples * n_states - spec.n_delays - 1
    else:
        pairs = n_samples * (n_states - 1 - spec.n_delays)
    check_rank_limit(spec.rank, D, pairs)


def _make_spec(spec: FitSpec | None, n_delays, rank, tikhonov, constant, pairing) -> FitSpec:
    """``spec``, or one built from the loose keywords (not both)."""
    loose = {k: v for k, v in (("n_delays", n_delays), ("rank", rank), ("tikhonov", tikhonov),
                               ("constant", constant), ("pairing", pairing)) if v is not None}
    if spec is not None:
        if loose:
            raise ValueError(f"pass either spec=FitSpec(...) or the keywords {sorted(loose)}, "
                             "not both.")
        return spec
    return FitSpec(**loose)


def _renamed(old: str, new: str, value, current):
    """A keyword renamed in 0.2: the old spelling still works, with a DeprecationWarning."""
    if value is None:
        return current
    warnings.warn(f"'{old}' is deprecated and will be removed in koopnet 0.3; use '{new}'.",
                  DeprecationWarning, stacklevel=3)
    if current is not None:
        raise ValueError(f"pass '{new}' only ('{old}' is its deprecated name).")
    return value


def fit_hybrid(scaled: ScaledMLP, data, *, spec: FitSpec | None = None, n_delays: int | None = None,
               rank=None, tikhonov: float | None = None, constant: bool | None = None,
               pairing: str | None = None, protocol: str | None = None) -> KoopmanHybrid:
    """Collect trajectories of ``data`` through ``scaled``, lift them, fit a DMD, build a hybrid.

    Parameters
    ----------
    scaled : ScaledMLP
        A scaled network (see :func:`koopnet.scaling.scale_layer`).
    data : Tensor, array or DataLoader
        Inputs whose trajectories the DMD is fitted on.
    spec : FitSpec, optional
        How to fit (delays, rank, Tikhonov, constant, pairing, roll-out); or give the loose
        keywords ``n_delays``, ``rank``, ``tikhonov``, ``constant``, ``pairing`` (FitSpec's
        defaults for the rest). ``protocol`` is the deprecated name of ``pairing``.

    Returns
    -------
    KoopmanHybrid
        Holding the fitted :class:`~koopnet.dmd.DMD` as ``dmd_``.

    Shape: data [n, features] -> trajectories [n, T, W] -> lifted [n, T-h, W(h+1)].
    """
    pairing = _renamed("protocol", "pairing", protocol, pairing)
    spec = _make_spec(spec, n_delays, rank, tikhonov, constant, pairing)
    if not isinstance(scaled, ScaledMLP):
        raise TypeError(f"scaled must be a ScaledMLP (from scale_layer); got "
                        f"{type(scaled).__name__}.")
    X, _ = check_inputs(data, dtype=model_dtype(scaled))
    X = X.to(model_device(scaled))  # the data follows the model (CPU or GPU)
    check_width_preserving(scaled.inserts, scaled.width)
    expected = scaled.head[0].in_features
    if X.shape[1] != expected:
        raise ValueError(f"data has {X.shape[1]} features per sample but the model's first layer "
                         f"expects {expected}; pass inputs of width {expected} (flattened).")
    _check_spec(spec, scaled.n_states, max(scaled.width, scaled.out_width), len(X))
    return (_fit_sharded if is_distributed() else _fit)(scaled, X, spec)


def _fit_sharded(scaled: ScaledMLP, X: torch.Tensor, spec: FitSpec) -> KoopmanHybrid:
    """``_fit`` under torch.distributed: each rank collects only its shard's trajectories,
    their statistics are all-reduced once and every rank builds the same hybrid."""
    observable = spec.observable()
    if not isinstance(observable, TimeDelay):
        raise ValueError(f"FitSpec(observable_kind={spec.observable_kind!r}) trains on whole "
                         "trajectories, which a sharded fit never holds at once; run this fit "
                         "in one process (without torchrun).")
    observable.fit(collect_trajectories(scaled, X[:1]).states)  # only the shapes are read
    stats = sharded_statistics(lambda start, stop: collect_trajectories(scaled, X[start:stop])
                               .states, len(X), spec.n_delays, constant=spec.constant,
                               pairing=spec.pairing)
    return KoopmanHybrid.from_dmd(scaled, observable, spec.dmd().fit_statistics(stats))


def _fit(scaled: ScaledMLP, X: torch.Tensor, spec: FitSpec, **extra) -> KoopmanHybrid:
    observable, dmd = fit_states(collect_trajectories(scaled, X).states, spec)  # [n, T, W]
    return KoopmanHybrid.from_dmd(scaled, observable, dmd, **extra)


def linearize(model: nn.Module, layer: int | None = None, data=None, *,
              target: str | None = None, n_inserted: int = 10,
              spec: FitSpec | None = None, n_delays: int | None = None, rank=None,
              tikhonov: float | None = None, constant: bool | None = None,
              pairing: str | None = None, init: str = "he", labels=None, seed: int = 0,
              scaling_config: TrainConfig | None = None, progress: bool | None = None,
              steps: int | None = None, protocol: str | None = None) -> KoopmanHybrid:
    """Replace hidden layer ``layer + 1`` of ``model`` by a linear Koopman operator.

    Parameters
    ----------
    model : nn.Module
        With ``layer``: a trained MLP ``[Linear, (norm), activation, ..., Linear]`` as an
        ``nn.Sequential`` (Dropout and a final Softmax are allowed); with ``target``: any
        module. It is not modified. float64 models run in float64; float16/bfloat16 models
        are scaled in float32 and their hybrid runs in the model's dtype.
    layer : int
        1-based hidden layer k whose output starts the trajectory (the paper's numbering).
    data : Tensor, array or DataLoader
        Training inputs ``[n, features]``; a DataLoader may yield ``x`` or ``(x, y)``. With
        ``target``: inputs ``[n, ...]`` as the model takes them.
    target : str, optional
        Instead of ``layer``: the qualified name (``model.named_modules()``) of a submodule
        mapping [..., w] -> [..., w'], scaled as :mod:`koopnet.submodule` describes (positions
        of [B, L, d] inputs are samples over the last dimension). Returns a copy of ``model``
        with ``dmd_``, ``observable``, ``rank_``, ``n_inserted`` and ``scaled``.
    n_inserted : int
        Inserted blocks N; trajectories have T = N + 2 states (N + 1 with ``target``;
        ``steps`` is its old name).
    spec : FitSpec, optional
        How to fit; or the loose keywords ``n_delays`` (default 10), ``rank``, ``tikhonov``,
        ``constant``, ``pairing`` (``protocol`` is its old name).
    init : {"he", "identity"}
        Initialisation of the inserted blocks.
    labels : Tensor or array, optional
        Only used to judge whether scaling worked (else agreement with the original).
    seed : int
        Seed of the inserted blocks and of the scaling mini-batches: the same seed gives the
        same hybrid.
    scaling_config : TrainConfig, optional
        Scaling recipe; default :func:`scaling_recipe` of the data (about 1000 AdamW steps,
        early stop on a plateau), said in one log line.
    progress : bool, optional
        Progress bars on stderr; default: when stderr is a terminal.

    Returns
    -------
    KoopmanHybrid
        An ``nn.Module`` holding ``dmd_``, ``scaling_report_`` and ``scaled_``; with
        ``target``, the copy of ``model`` described above.

    Shape: data [n, features] -> hybrid(x) [n, classes].

    >>> torch.manual_seed(0) and None
    >>> from koopnet.models import build_mlp
    >>> model = build_mlp([2, 6, 6, 2], "tanh")
    >>> hybrid = linearize(model, layer=1, data=torch.rand(50, 2), n_inserted=3, n_delays=1,
    ...                    scaling_config=TrainConfig(epochs=2, batch_size=50))
    >>> hybrid(torch.rand(4, 2)).shape, hybrid.linear_steps
    (torch.Size([4, 2]), 3)
    """
    n_inserted = _renamed("steps", "n_inserted", steps, None) if steps is not None else n_inserted
    pairing = _renamed("protocol", "pairing", protocol, pairing)
    spec = _make_spec(spec, n_delays, rank, tikhonov, constant, pairing)
    if target is not None or layer is None:
        return _linearize_target(model, layer, target, data, spec, n_inserted=n_inserted,
                                 init=init, labels=labels, seed=seed,
                                 scaling_config=scaling_config, progress=progress)
    dtype = model_dtype(model) if isinstance(model, nn.Module) else torch.float32
    work = torch.float32 if dtype in _HALF else dtype  # half precision is scaled in float32
    layer = check_layer(model, layer)
    X, y = check_inputs(data, labels, dtype=work)
    device = model_device(model)  # the data follows the model (CPU or GPU)
    X, y = X.to(device), (None if y is None else y.to(device))
    model = copy.deepcopy(model).to(work).eval()  # a BatchNorm in train mode stays untouched
    check_model(model, X, layer, y)
    n_inserted = check_int(n_inserted, "n_inserted", low=0)
    seed = check_int(seed, "seed")
    _check_scaling_config(scaling_config)
    blocks = mlp_blocks(model)
    w, w_out = blocks[layer - 1][0].out_features, blocks[layer][0].out_features
    _check_spec(spec, n_inserted + 2, max(w, w_out), len(X))
    recipe = scaling_config or scaling_recipe(len(X))
    log.info("%s", describe_recipe(recipe, len(X)))
    progress = sys.stderr.isatty() if progress is None else bool(progress)
    scaled, report = scale_layer(model, layer, X, y, n_inserted=n_inserted, init=init,
                                 config=recipe, seed=seed, progress=progress)
    hybrid = _fit(scaled, X, spec, keep_scaled=True, scaling_report=report)
    if work != dtype:  # the network parts in the model's precision; the map stays float64
        for part in (hybrid.head, hybrid.prefix, hybrid.tail):
            part.to(dtype)
    return hybrid


def _check_scaling_config(config) -> None:
    if config is not None and not isinstance(config, TrainConfig):
        raise TypeError(f"scaling_config must be a koopnet.TrainConfig; got "
                        f"{type(config).__name__}.")


def _linearize_target(model, layer, target, data, spec: FitSpec, *, n_inserted, init, labels,
                      seed, scaling_config, progress) -> nn.Module:
    """``linearize(model, target=...)``: checks, the data-sized recipe, then
    :func:`koopnet.submodule.scale_target`."""
    if layer is not None or target is None:
        raise ValueError("pass exactly one of layer=k (a hidden layer of a Sequential MLP) and "
                         "target='name' (any submodule, see model.named_modules()).")
    if labels is not None:
        raise ValueError("labels judge a layer's scaling (layer=k) only; with target=... "
                         "pass no labels.")
    n_inserted = check_int(n_inserted, "n_inserted", low=1)
    seed = check_int(seed, "seed")
    _check_scaling_config(scaling_config)
    pairs = capture_target(model, target, data)
    _check_spec(spec, n_inserted + 1, pairs.width, pairs.n_positions,
                fix="insert more blocks (n_inserted >= n_delays + 1)")
    recipe = scaling_config or scaling_recipe(len(pairs.a))
    log.info("target '%s': %s", pairs.name, describe_recipe(recipe, len(pairs.a)))
    progress = sys.stderr.isatty() if progress is None else bool(progress)
    return scale_target(pairs, spec, n_inserted=n_inserted, init=init, seed=seed,
                        config=recipe, progress=progress)
