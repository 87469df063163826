"""Bring your own model: linearise a layer in one call, and save every stage safely.

``linearize(model, layer=k, data=X)`` runs the whole method on any ``nn.Sequential`` MLP of
``[Linear, activation, ..., Linear]`` blocks (a trailing Softmax is ignored): it scales hidden
layer k (inserts ``steps`` width-preserving blocks and trains them, originals frozen), collects
the trajectories of ``data`` through them, lifts them into ``n_delays`` delay coordinates, fits a
DMD and returns the :class:`~koopnet.hybrid.KoopmanHybrid`. The pieces stay usable alone
(``scale_layer``, ``collect_trajectories``, ``TimeDelay``, ``DMD``, ``KoopmanHybrid``);
:func:`fit_hybrid` is the second half of ``linearize`` for an already scaled model.

Saving: ``save_model`` / ``save_scaled`` / ``save_hybrid`` write a safetensors + JSON artifact
(:mod:`koopnet.artifacts`: atomic, hashed, no pickle) whose JSON records the architecture
(module types, widths, activation names and their arguments), so the ``load_*`` functions
rebuild the modules without running any stored code. A round trip gives bit-identical outputs.

The ``stage_*`` functions are the bodies of the staged command line (``koopnet train``,
``scale``, ``fit``, ``evaluate``): each reads the previous stage's folder, checks the hashes it
recorded, and writes its own folder, so a user can enter at any stage with their own model.

Shape: data [n, features] -> hybrid(x) [n, classes].
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import numbers
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import safetensors.torch
import torch
from torch import nn

from koopnet._checks import as_tensor, check_finite, check_int, check_width_preserving
from koopnet.artifacts import (
    ArtifactError,
    file_sha256,
    load_artifact,
    prepare_output_dir,
    save_artifact,
    write_json,
)
from koopnet.datasets import Split
from koopnet.dmd import DMD
from koopnet.experiments import ExperimentConfig, default_config
from koopnet.hybrid import KoopmanHybrid
from koopnet.models import ACTIVATIONS, TrainConfig, activation_name, build_mlp, train_classifier
from koopnet.observables import TimeDelay, snapshot_pairs
from koopnet.scaling import ScaledMLP, scale_layer
from koopnet.trajectories import collect_trajectories

__all__ = [
    "DEFAULT_SCALING",
    "fit_hybrid",
    "linearize",
    "load_data",
    "load_hybrid",
    "load_model",
    "load_model_files",
    "load_scaled",
    "save_hybrid",
    "save_model",
    "save_scaled",
    "stage_evaluate",
    "stage_fit",
    "stage_scale",
    "stage_train",
]

log = logging.getLogger(__name__)

#: Scaling recipe of ``linearize`` and ``koopnet scale``: the clean protocol's (full-batch
#: AdamW at lr 1e-2, 1000 steps; the Huber loss reaches ~1e-5 on the Yin-Yang layers).
DEFAULT_SCALING: TrainConfig = ExperimentConfig().scaling
_SOFTMAX = (nn.Softmax, nn.LogSoftmax)


# --------------------------------------------------------------------------------------------
# Input checks


def _inputs(data, labels=None, *, dtype=torch.float32, name: str = "data"):
    """A tensor, array or DataLoader (yielding x or (x, y)) -> X [n, features], y [n] or None.

    Inputs with more than 2 dimensions (images) are flattened per sample, as the paper's MLP did.
    """
    loader_labels = None
    if isinstance(data, torch.utils.data.DataLoader):
        xs, ys = [], []
        for batch in data:
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


def _mlp_modules(model) -> list[nn.Module]:
    if not isinstance(model, nn.Sequential):
        raise TypeError(f"model must be an nn.Sequential MLP [Linear, activation, ..., Linear]; "
                        f"got {type(model).__name__}.")
    modules = list(model)
    if modules and isinstance(modules[-1], _SOFTMAX):
        modules = modules[:-1]  # a final softmax does not change the argmax
    if not modules or not isinstance(modules[0], nn.Linear):
        first = type(modules[0]).__name__ if modules else "nothing"
        raise ValueError(f"model[0] is {first}; koopnet expects an MLP that starts with a Linear "
                         "layer: [Linear, activation, ..., Linear].")
    return modules


def _check_layer(model, layer) -> tuple[int, int]:
    """Check that hidden layer ``layer`` can start a trajectory; return (w, w') around it."""
    modules = _mlp_modules(model)
    layer = check_int(layer, "layer")
    linears = [i for i, m in enumerate(modules) if isinstance(m, nn.Linear)]
    n_hidden = len(linears) - 1
    if n_hidden < 2:
        raise ValueError(f"model has {n_hidden} hidden layer(s); linearising needs at least 2 "
                         "(one to start the trajectory, one to replace). Use a deeper MLP.")
    if not 1 <= layer <= n_hidden - 1:
        raise ValueError(f"layer={layer} is out of range: this model has {n_hidden} hidden "
                         f"layers, so layer must be in 1..{n_hidden - 1} (hidden layer k+1 is "
                         "the one replaced).")
    for k in (layer, layer + 1):
        index = 2 * k - 1  # where hidden layer k's activation must sit
        after = modules[index] if index < len(modules) else None
        linear = modules[index - 1] if index - 1 < len(modules) else None
        if not isinstance(linear, nn.Linear) or activation_name(after) is None:
            found = type(after).__name__ if after is not None else "the end of the model"
            raise ValueError(f"layer={layer}: hidden layer {k} (model[{index - 1}]) is not "
                             f"followed by an activation: model[{index}] is {found}. koopnet "
                             "needs [Linear, activation, ...] blocks with activations "
                             f"{sorted(ACTIVATIONS)}; fix the model or pick another layer.")
    s = 2 * layer - 1
    return modules[s - 1].out_features, modules[s + 1].out_features


def _check_model(model, X: torch.Tensor, layer: int) -> None:
    """Finite parameters, the right input width and finite activations, each named."""
    modules = _mlp_modules(model)
    for key, value in model.state_dict().items():
        check_finite(value, f"model parameter '{key}'",
                     " The model diverged or was saved broken; retrain or re-export it.")
    expected = modules[0].in_features
    if X.shape[1] != expected:
        raise ValueError(f"data has {X.shape[1]} features per sample but the model's first layer "
                         f"expects {expected}; pass inputs of width {expected} (flattened).")
    with torch.no_grad():
        state = X
        for i, module in enumerate(modules):
            state = module(state)
            check_finite(state, f"activations of model[{i}] ({type(module).__name__})",
                         " Rescale the inputs or check the model's weights.")
            if i >= 2 * layer + 1:
                break


def _check_rank(rank, n_delays: int, width: int, n_samples: int, n_states: int,
                constant: bool, protocol: str) -> None:
    """Fail before any training on a rank DMD would refuse (same wording as DMD)."""
    if rank is None:
        return
    if isinstance(rank, bool) or not isinstance(rank, numbers.Real):
        raise TypeError(f"rank={rank!r} must be None, an int or a float.")
    if (not isinstance(rank, numbers.Integral) and not 0.0 < rank < 1.0) or rank < 0:
        raise ValueError(f"rank={rank!r} is ambiguous: pass an int >= 1, a float in (0, 1), 0 "
                         "for the optimal threshold, or None for full rank.")
    if not isinstance(rank, numbers.Integral) or rank == 0:
        return  # fractions and the optimal threshold are resolved from the data by DMD
    D = width * (n_delays + 1) + int(constant)
    if protocol == "concatenated":
        pairs = n_samples * n_states - n_delays - 1
    else:
        pairs = n_samples * (n_states - 1 - n_delays)
    limit = min(D, pairs)
    if rank > limit:
        raise ValueError(f"rank={rank} exceeds what the data supports: min(D={D}, pairs={pairs})"
                         f"={limit}. Lower rank to <= {limit}, pass None for full rank, or use "
                         "more samples.")


def _check_delays(n_delays, n_inserted: int) -> int:
    h = check_int(n_delays, "n_delays", low=0)
    n_states = n_inserted + 2
    if h > n_states - 2:
        raise ValueError(f"n_delays={h} needs trajectories of at least {h + 2} states; got "
                         f"T={n_states} ({n_inserted} inserted blocks + 2). Lower n_delays to "
                         f"<= {n_states - 2} or insert more blocks (steps >= {h}).")
    return h


def _check_fit(scaled, data, n_delays, rank, constant, protocol) -> tuple[torch.Tensor, int]:
    """Every check of :func:`fit_hybrid` that needs no trajectories; returns (X, h)."""
    if not isinstance(scaled, ScaledMLP):
        raise TypeError(f"scaled must be a ScaledMLP (from scale_layer); got "
                        f"{type(scaled).__name__}.")
    if protocol not in ("trajectory", "concatenated"):
        raise ValueError(f"protocol={protocol!r} must be 'trajectory' or 'concatenated'.")
    X, _ = _inputs(data, dtype=next(scaled.parameters()).dtype)
    check_width_preserving(scaled.inserts, scaled.width)
    expected = scaled.head[0].in_features
    if X.shape[1] != expected:
        raise ValueError(f"data has {X.shape[1]} features per sample but the model's first layer "
                         f"expects {expected}; pass inputs of width {expected} (flattened).")
    h = _check_delays(n_delays, scaled.n_inserted)
    width = max(scaled.width, scaled.out_width)
    _check_rank(rank, h, width, len(X), scaled.n_states, bool(constant), protocol)
    return X, h


# --------------------------------------------------------------------------------------------
# The method in one call


def fit_hybrid(scaled: ScaledMLP, data, *, n_delays: int = 10, rank=None,
               tikhonov: float = 0.0, constant: bool = False,
               protocol: str = "trajectory") -> KoopmanHybrid:
    """Collect trajectories of ``data`` through ``scaled``, lift them, fit a DMD, build a hybrid.

    Parameters
    ----------
    scaled : ScaledMLP
        A scaled network (see :func:`koopnet.scaling.scale_layer`).
    data : Tensor, array or DataLoader
        Inputs whose trajectories the DMD is fitted on.
    n_delays : int
        Time delays h; the hybrid runs the first h inserted blocks and replaces the rest.
    rank, tikhonov : see :class:`koopnet.dmd.DMD`.
    constant : bool
        Append the constant observable (affine operator).
    protocol : {"trajectory", "concatenated"}
        Pairs inside each trajectory, or the paper's one concatenated series.

    Returns
    -------
    KoopmanHybrid
        With ``dmd_`` (the fitted :class:`~koopnet.dmd.DMD`) attached.

    Shape: data [n, features] -> trajectories [n, T, W] -> lifted [n, T-h, W(h+1)].
    """
    X, h = _check_fit(scaled, data, n_delays, rank, constant, protocol)
    trajectories = collect_trajectories(scaled, X)  # states [n, T, W]
    observable = TimeDelay(h, constant=bool(constant)).fit(trajectories.states)
    dmd = DMD(rank, tikhonov=tikhonov)
    if protocol == "trajectory":
        dmd.fit(observable.transform(trajectories.states))  # lifted [n, T-h, D]
    else:
        dmd.fit_pairs(*snapshot_pairs(observable.transform(trajectories.concatenated())))
    hybrid = KoopmanHybrid(scaled, observable, dmd)
    hybrid.dmd_ = dmd
    return hybrid


def linearize(model: nn.Sequential, layer: int, data, *, steps: int = 10, n_delays: int = 10,
              rank=None, tikhonov: float = 0.0, constant: bool = False, init: str = "he",
              labels=None, seed: int = 0, scaling_config: TrainConfig | None = None,
              protocol: str = "trajectory", progress: bool = False) -> KoopmanHybrid:
    """Replace hidden layer ``layer + 1`` of ``model`` by a linear Koopman operator.

    Parameters
    ----------
    model : nn.Sequential
        A trained MLP ``[Linear, activation, ..., Linear]`` (optional final Softmax ignored);
        it is not modified.
    layer : int
        1-based hidden layer k whose output starts the trajectory (the paper's numbering).
    data : Tensor, array or DataLoader
        Training inputs ``[n, features]``; a DataLoader may yield ``x`` or ``(x, y)``.
    steps : int
        Inserted blocks N; trajectories have T = N + 2 states.
    n_delays : int
        Time delays h <= steps; the hybrid runs h inserted blocks and T-1-h linear steps.
    rank, tikhonov : see :class:`koopnet.dmd.DMD`.
    constant : bool
        Append the constant observable 1.
    init : {"he", "identity"}
        Initialisation of the inserted blocks.
    labels : Tensor or array, optional
        Only used to judge whether scaling worked (else agreement with the original).
    seed : int
        Seed of the inserted blocks and of the scaling mini-batches: the same seed gives the
        same hybrid.
    scaling_config : TrainConfig, optional
        Scaling recipe; default :data:`DEFAULT_SCALING`.
    protocol : {"trajectory", "concatenated"}
        DMD pairs inside each trajectory, or the paper's concatenated series.

    Returns
    -------
    KoopmanHybrid
        An ``nn.Module`` with ``dmd_``, ``scaling_report_`` and ``scaled_`` attached.

    Shape: data [n, features] -> hybrid(x) [n, classes].

    >>> torch.manual_seed(0) and None
    >>> model = build_mlp([2, 6, 6, 2], "tanh")
    >>> hybrid = linearize(model, layer=1, data=torch.rand(50, 2), steps=3, n_delays=1,
    ...                    scaling_config=TrainConfig(epochs=2, batch_size=50))
    >>> hybrid(torch.rand(4, 2)).shape, hybrid.linear_steps
    (torch.Size([4, 2]), 3)
    """
    dtype = next(model.parameters()).dtype if isinstance(model, nn.Module) else torch.float32
    X, y = _inputs(data, labels, dtype=dtype)
    w, w_out = _check_layer(model, layer)
    _check_model(model, X, layer)
    steps = check_int(steps, "steps", low=0)
    h = _check_delays(n_delays, steps)
    _check_rank(rank, h, max(w, w_out), len(X), steps + 2, bool(constant), protocol)
    scaled, report = scale_layer(model, layer, X, y, n_inserted=steps, init=init,
                                 config=scaling_config or DEFAULT_SCALING, seed=seed,
                                 progress=progress)
    hybrid = fit_hybrid(scaled, X, n_delays=h, rank=rank, tikhonov=tikhonov, constant=constant,
                        protocol=protocol)
    hybrid.scaling_report_ = report
    # kept out of the module tree, so the hybrid's parameters and state_dict stay its own
    hybrid.__dict__["scaled_"] = scaled
    return hybrid


# --------------------------------------------------------------------------------------------
# Architecture as JSON, modules rebuilt without running stored code

_ACTIVATION_ARGS = {"leaky_relu": ("negative_slope",), "elu": ("alpha",),
                    "gelu": ("approximate",)}


def module_spec(module: nn.Module, where: str = "model") -> dict:
    """JSON description of a Sequential of Linear / activation / Softmax modules."""
    if isinstance(module, nn.Sequential):
        return {"type": "sequential",
                "modules": [module_spec(m, f"{where}[{i}]") for i, m in enumerate(module)]}
    if type(module) is nn.Linear:
        return {"type": "linear", "in_features": module.in_features,
                "out_features": module.out_features, "bias": module.bias is not None}
    name = activation_name(module)
    if name is not None:
        return {"type": "activation", "name": name,
                "args": {a: getattr(module, a) for a in _ACTIVATION_ARGS.get(name, ())}}
    if type(module) in _SOFTMAX:
        return {"type": "softmax" if type(module) is nn.Softmax else "log_softmax",
                "dim": module.dim}
    raise TypeError(f"{where} is {type(module).__name__}; koopnet saves nn.Sequential MLPs of "
                    f"Linear, activations {sorted(ACTIVATIONS)} and a final Softmax only.")


def _build(spec, where: str) -> nn.Module:
    """Inverse of :func:`module_spec`; parameters are left uninitialised (filled by loading)."""
    try:
        kind = spec["type"]
        if kind == "sequential":
            return nn.Sequential(*[_build(s, f"{where}[{i}]")
                                   for i, s in enumerate(spec["modules"])])
        if kind == "linear":  # skip_init: no RNG draws, the weights come from the file
            return torch.nn.utils.skip_init(nn.Linear, int(spec["in_features"]),
                                            int(spec["out_features"]), bias=bool(spec["bias"]))
        if kind == "activation":
            if spec["name"] not in ACTIVATIONS:
                raise ArtifactError(f"{where}: unknown activation {spec['name']!r}; this koopnet "
                                    f"knows {sorted(ACTIVATIONS)}.")
            return ACTIVATIONS[spec["name"]](**spec.get("args", {}))
        if kind in ("softmax", "log_softmax"):
            return (nn.Softmax if kind == "softmax" else nn.LogSoftmax)(dim=spec["dim"])
    except ArtifactError:
        raise
    except (KeyError, TypeError, ValueError) as err:
        raise ArtifactError(f"{where}: malformed architecture entry {spec!r} ({err}).") from err
    raise ArtifactError(f"{where}: unknown module type {kind!r}; expected sequential, linear, "
                        "activation or softmax.")


def mlp_spec(widths, activation="relu", *, softmax: bool = False) -> dict:
    """Architecture of ``build_mlp(widths, activation)``; ``activation`` may be a list per layer.

    >>> [m["type"] for m in mlp_spec([2, 4, 2])["modules"]]
    ['linear', 'activation', 'linear']
    """
    widths = [check_int(w, "width", low=1) for w in widths]
    if len(widths) < 2:
        raise ValueError(f"widths={widths} needs at least an input and an output width.")
    names = [activation] * (len(widths) - 2) if isinstance(activation, str) else list(activation)
    if len(names) != len(widths) - 2:
        raise ValueError(f"{len(names)} activations given for {len(widths) - 2} hidden layers; "
                         "pass one name, or one per hidden layer.")
    modules = []
    for i, name in enumerate(names):
        if name not in ACTIVATIONS:
            raise ValueError(f"activation={name!r} is not supported; use one of "
                             f"{sorted(ACTIVATIONS)}.")
        modules += [{"type": "linear", "in_features": widths[i], "out_features": widths[i + 1],
                     "bias": True}, {"type": "activation", "name": name, "args": {}}]
    modules.append({"type": "linear", "in_features": widths[-2], "out_features": widths[-1],
                    "bias": True})
    if softmax:
        modules.append({"type": "softmax", "dim": -1})
    return {"type": "sequential", "modules": modules}


def _strip_prefix(tensors: dict, expected: set) -> dict:
    """Accept ``features.0.weight`` style keys (a Sequential held as an attribute)."""
    if set(tensors) == expected or not tensors:
        return tensors
    prefixes = {key.split(".", 1)[0] for key in tensors}
    if len(prefixes) == 1 and all("." in key for key in tensors):
        stripped = {key.split(".", 1)[1]: value for key, value in tensors.items()}
        if set(stripped) == expected:
            return stripped
    return tensors


def _load_state(module: nn.Module, tensors: dict, source: str) -> nn.Module:
    """Load ``tensors`` into ``module`` after checking names and shapes, naming any mismatch."""
    expected = module.state_dict()
    tensors = _strip_prefix(tensors, set(expected))
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ArtifactError(
            f"'{source}' does not fit the architecture: missing tensors {missing[:4]}, "
            f"unexpected {unexpected[:4]}. Export with "
            "safetensors.torch.save_file(model.state_dict(), path) and describe that model.")
    for key, value in expected.items():
        if tuple(tensors[key].shape) != tuple(value.shape):
            raise ArtifactError(
                f"'{source}' tensor '{key}' has shape {list(tensors[key].shape)}, but the "
                f"architecture needs {list(value.shape)}; the config does not describe these "
                "weights.")
        if not tensors[key].is_floating_point():
            raise ArtifactError(f"'{source}' tensor '{key}' has dtype {tensors[key].dtype}; "
                                "weights must be floating point.")
    module.load_state_dict(tensors, strict=True, assign=True)  # keeps the saved dtypes
    return module.eval()


def _parse_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ArtifactError(f"'{path}' is not valid JSON ({err}); re-create it.") from err


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a plain safetensors file; anything else (a pickle, a truncated file) is
    refused with the reason."""
    if not path.is_file():
        raise FileNotFoundError(f"weights file '{path}' does not exist.")
    blob = path.read_bytes()
    try:
        return safetensors.torch.load(blob)
    except Exception as err:  # SafetensorError and friends; pickles land here too
        hint = (" It looks like a pickle (torch.save); koopnet never unpickles. Re-export with "
                "safetensors.torch.save_file(model.state_dict(), path)."
                if blob[:1] == b"\x80" or blob[:2] == b"PK" else
                " It is truncated or not a safetensors file; re-export it.")
        raise ArtifactError(f"'{path}' is not a valid safetensors file ({err}).{hint}") from err


# --------------------------------------------------------------------------------------------
# Save / load


def _metadata(config: Mapping | None, reserved: set) -> dict:
    config = dict(config or {})
    clash = sorted(reserved & set(config))
    if clash:
        raise ValueError(f"metadata keys {clash} are reserved for the architecture; rename them.")
    return config


def save_model(model: nn.Sequential, directory, name: str = "model", *,
               metadata: Mapping | None = None, parents: Mapping | None = None) -> Path:
    """Save an MLP as ``<directory>/<name>.safetensors`` + ``.json`` (architecture inside).

    ``metadata`` (data set, seed, ...) and ``parents`` (hashes) go into the JSON; the folder
    is created if needed and an existing artifact of that name is replaced atomically.
    Returns the JSON path.
    """
    if not isinstance(model, nn.Sequential):
        raise TypeError(f"model must be an nn.Sequential; got {type(model).__name__}.")
    config = {**_metadata(metadata, {"architecture"}), "architecture": module_spec(model)}
    Path(directory).mkdir(parents=True, exist_ok=True)
    return save_artifact(directory, name, dict(model.state_dict()), config, kind="model",
                         parents=dict(parents or {}))


def _load_model(directory, name: str = "model") -> tuple[nn.Sequential, dict]:
    tensors, meta = load_artifact(directory, name, kind="model")
    try:
        spec = meta["config"]["architecture"]
    except (KeyError, TypeError) as err:
        raise ArtifactError(f"'{Path(directory) / name}.json' records no architecture; "
                            "re-save the model with koopnet.save_model.") from err
    model = _build(spec, "model")
    return _load_state(model, tensors, f"{Path(directory) / name}.safetensors"), meta


def load_model(directory, name: str = "model") -> nn.Sequential:
    """Load a model saved by :func:`save_model`, checking version, hash and shapes."""
    return _load_model(directory, name)[0]


def load_model_files(weights, config) -> tuple[nn.Sequential, dict]:
    """Load a user's model from a safetensors state dict and a JSON description.

    ``config`` is either ``{"widths": [5, 12, 12, 7, 4], "activation": "tanh"}`` (optionally
    ``"activation": [...]`` per hidden layer and ``"softmax": true``), ``{"architecture": ...}``
    as koopnet writes it, or a koopnet ``model.json`` artifact (then its hash is checked).
    ``weights`` holds ``model.state_dict()`` (keys ``0.weight``, ``0.bias``, ...).
    Returns (model, the parsed config).
    """
    weights, config = Path(weights), Path(config)
    if not config.is_file():
        raise FileNotFoundError(f"model config '{config}' does not exist.")
    spec = _parse_json(config)
    if not isinstance(spec, dict):
        raise ArtifactError(f"'{config}' must hold a JSON object such as "
                            '{"widths": [2, 8, 2], "activation": "relu"}.')
    tensors = _read_safetensors(weights)
    if "format_version" in spec and "sha256" in spec:  # a koopnet artifact JSON
        if spec.get("kind") != "model":
            raise ArtifactError(f"'{config}' holds a '{spec.get('kind')}' artifact, expected "
                                "'model'.")
        if file_sha256(weights) != spec["sha256"]:
            raise ArtifactError(f"'{weights}' does not match the hash recorded in '{config}' "
                                "(file changed or truncated); re-create it.")
        spec = spec.get("config", {})
    if "architecture" in spec:
        architecture = spec["architecture"]
    elif "widths" in spec:
        try:
            architecture = mlp_spec(spec["widths"], spec.get("activation", "relu"),
                                    softmax=bool(spec.get("softmax", False)))
        except (TypeError, ValueError) as err:
            raise ArtifactError(f"'{config}': {err}") from err
    else:
        raise ArtifactError(f"'{config}' describes no model: give "
                            '{"widths": [...], "activation": "relu"}.')
    model = _load_state(_build(architecture, "model"), tensors, str(weights))
    return model, spec


def save_scaled(scaled: ScaledMLP, directory, name: str = "scaled", *,
                metadata: Mapping | None = None, parents: Mapping | None = None) -> Path:
    """Save a :class:`~koopnet.scaling.ScaledMLP` (the original network is inside it)."""
    if not isinstance(scaled, ScaledMLP):
        raise TypeError(f"scaled must be a ScaledMLP; got {type(scaled).__name__}.")
    architecture = {part: module_spec(getattr(scaled, part), part)
                    for part in ("head", "inserts", "replaced", "tail")}
    config = {**_metadata(metadata, {"architecture", "layer"}), "architecture": architecture,
              "layer": scaled.layer}
    Path(directory).mkdir(parents=True, exist_ok=True)
    return save_artifact(directory, name, dict(scaled.state_dict()), config, kind="scaled",
                         parents=dict(parents or {}))


def _load_scaled(directory, name: str = "scaled") -> tuple[ScaledMLP, dict]:
    tensors, meta = load_artifact(directory, name, kind="scaled")
    source = f"{Path(directory) / name}.safetensors"
    try:
        arch, layer = meta["config"]["architecture"], int(meta["config"]["layer"])
        parts = {part: _build(arch[part], part)
                 for part in ("head", "inserts", "replaced", "tail")}
    except (KeyError, TypeError, ValueError) as err:
        raise ArtifactError(f"'{Path(directory) / name}.json' has no valid scaled-model "
                            f"architecture ({err}); re-save it with koopnet.save_scaled.") from err
    scaled = _load_state(ScaledMLP(**parts, layer=layer), tensors, source)
    for part in ("head", "replaced", "tail"):  # as scale_layer leaves them: originals frozen
        for p in getattr(scaled, part).parameters():
            p.requires_grad_(False)
    return scaled, meta


def load_scaled(directory, name: str = "scaled") -> ScaledMLP:
    """Load a scaled model saved by :func:`save_scaled`."""
    return _load_scaled(directory, name)[0]


def save_hybrid(hybrid: KoopmanHybrid, directory, name: str = "hybrid", *,
                metadata: Mapping | None = None, parents: Mapping | None = None) -> Path:
    """Save a :class:`~koopnet.hybrid.KoopmanHybrid`: its modules, operator buffers and the
    observable's settings (everything its forward pass uses)."""
    if not isinstance(hybrid, KoopmanHybrid):
        raise TypeError(f"hybrid must be a KoopmanHybrid; got {type(hybrid).__name__}.")
    observable = hybrid.observable
    if type(observable) is not TimeDelay:
        raise TypeError(f"save_hybrid stores hybrids with TimeDelay observables; this one uses "
                        f"{type(observable).__name__}. Save its pieces with save_scaled instead.")
    structure = {
        "architecture": {part: module_spec(getattr(hybrid, part), part)
                         for part in ("head", "prefix", "tail")},
        "layer": hybrid.layer, "width": hybrid.width, "out_width": hybrid.out_width,
        "linear_steps": hybrid.linear_steps, "pad_value": hybrid.pad_value,
        "operator_rank": int(hybrid.operator.shape[0]),
        "observable": {"type": "time_delay", "n_delays": observable.n_delays_,
                       "constant": bool(observable.constant),
                       "n_features_in": observable.n_features_in_},
    }
    config = {**_metadata(metadata, set(structure)), **structure}
    Path(directory).mkdir(parents=True, exist_ok=True)
    return save_artifact(directory, name, dict(hybrid.state_dict()), config, kind="hybrid",
                         parents=dict(parents or {}))


def _load_hybrid(directory, name: str = "hybrid") -> tuple[KoopmanHybrid, dict]:
    tensors, meta = load_artifact(directory, name, kind="hybrid")
    config = meta["config"]
    try:
        arch, obs = config["architecture"], config["observable"]
        parts = {part: _build(arch[part], part) for part in ("head", "prefix", "tail")}
        h, width = int(obs["n_delays"]), int(obs["n_features_in"])
        observable = TimeDelay(h, constant=bool(obs["constant"]))
        observable.fit(torch.zeros(1, h + 1, width))  # sets the fitted widths, no data needed
        D, R = observable.n_output_features_, int(config["operator_rank"])
        w_out = int(config["out_width"])
        shapes = {"basis": (D, R), "operator": (R, R), "readout": (w_out, D),
                  "linear_map": (w_out, D)}
        buffers = {key: torch.empty(shape, dtype=torch.float64) for key, shape in shapes.items()}
        hybrid = KoopmanHybrid.from_buffers(
            parts["head"], parts["prefix"], parts["tail"], observable, buffers,
            layer=int(config["layer"]), width=int(config["width"]), out_width=w_out,
            linear_steps=int(config["linear_steps"]), pad_value=float(config["pad_value"]))
    except (KeyError, TypeError, ValueError) as err:
        if isinstance(err, ArtifactError):
            raise
        raise ArtifactError(f"'{Path(directory) / name}.json' has no valid hybrid description "
                            f"({err}); re-save it with koopnet.save_hybrid.") from err
    return _load_state(hybrid, tensors, f"{Path(directory) / name}.safetensors"), meta


def load_hybrid(directory, name: str = "hybrid") -> KoopmanHybrid:
    """Load a hybrid saved by :func:`save_hybrid`; its outputs equal the saved one's exactly."""
    return _load_hybrid(directory, name)[0]


# --------------------------------------------------------------------------------------------
# Data sources of the staged command line

_NAMED = ("yinyang", "yinyang3", "mnist")


@functools.lru_cache(maxsize=4)
def _named_splits(source: str, data_dir: str | None, seed: int) -> dict[str, Split]:
    from koopnet.datasets import idx_splits, yinyang_splits

    if source in ("yinyang", "yinyang3"):
        splits = yinyang_splits(source)
    else:
        root = source[4:] if source.startswith("idx:") else data_dir
        splits = idx_splits(root, name="mnist" if source == "mnist" else "idx", seed=seed)
    return {"train": splits.train, "val": splits.val, "test": splits.test}


def _read_array(path: Path, what: str) -> torch.Tensor:
    if not path.is_file():
        raise FileNotFoundError(f"{what} file '{path}' does not exist.")
    if path.suffix == ".npy":
        try:
            array = np.load(path, allow_pickle=False)
        except ValueError as err:
            if "allow_pickle" in str(err):
                raise ArtifactError(f"'{path}' holds Python objects (pickle), which koopnet "
                                    "refuses; save a numeric array with np.save.") from err
            raise ArtifactError(f"'{path}' is not a valid .npy file ({err}).") from err
        except (OSError, EOFError) as err:
            raise ArtifactError(f"'{path}' is not a valid .npy file ({err}).") from err
        if array.dtype.kind not in "biuf":
            raise ArtifactError(f"'{path}' has dtype {array.dtype}; save numbers.")
        return torch.from_numpy(np.ascontiguousarray(array))
    raise ValueError(f"{what} file '{path}' must be a .npy file.")


def load_data(source: str, *, labels: str | None = None, data_dir: str | None = None,
              seed: int = 0) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor | None]], dict]:
    """Resolve a data source of the command line into splits, plus a record for provenance.

    ``source``: ``yinyang``, ``yinyang3``, ``mnist``, ``idx:PATH`` (splits train/val/test), a
    ``.npy`` array of inputs or a ``.safetensors`` file with tensors ``X`` (and ``y``) (one
    split ``data``). ``labels``: a ``.npy`` file of class indices for a file source. The record
    holds the file hashes, which later stages check.
    """
    if not isinstance(source, str) or not source:
        raise ValueError("a data source is needed: yinyang, yinyang3, mnist, idx:PATH, a .npy "
                         "file or a .safetensors file with tensors 'X' (and 'y').")
    record = {"source": source, "labels": labels, "data_dir": data_dir, "seed": seed,
              "sha256": {}}
    if source in _NAMED or source.startswith("idx:"):
        if labels is not None:
            raise ValueError(f"--labels is for file data; '{source}' brings its own labels.")
        seed = seed if source == "mnist" or source.startswith("idx:") else 0  # yinyang: fixed
        record["seed"] = seed
        splits = _named_splits(source, data_dir, seed)
        return {k: (v.X, v.y) for k, v in splits.items()}, record
    path = Path(source)
    if path.suffix == ".safetensors":
        if not path.is_file():
            raise FileNotFoundError(f"data file '{path}' does not exist.")
        tensors = _read_safetensors(path)
        if "X" not in tensors:
            raise ArtifactError(f"'{path}' has no tensor 'X' (it holds {sorted(tensors)}); "
                                "store inputs as 'X' [n, features] and labels as 'y' [n].")
        X, y = tensors["X"], tensors.get("y")
    elif path.suffix == ".npy":
        X, y = _read_array(path, "data"), None
    else:
        raise ValueError(f"unknown data source '{source}': use yinyang, yinyang3, mnist, "
                         "idx:PATH, a .npy file or a .safetensors file with tensors 'X' "
                         "(and 'y').")
    record["source"] = str(path.resolve())
    record["sha256"]["data"] = file_sha256(path)
    if labels is not None:
        labels_path = Path(labels)
        y = _read_array(labels_path, "labels")
        record["labels"] = str(labels_path.resolve())
        record["sha256"]["labels"] = file_sha256(labels_path)
    X, y = _inputs(X, y, name=f"data '{path.name}'")
    return {"data": (X, y)}, record


def _reload_data(meta: dict, where: Path, stage: str, fix: str) -> tuple[dict, dict]:
    """Load the data set recorded in an artifact's config (``where``, written by ``stage``),
    refusing files that changed since. Returns (splits, record)."""
    record = meta["config"].get("data")
    if not isinstance(record, dict):
        raise ArtifactError(f"'{where}' records no data set; {fix}.")
    splits, fresh = load_data(record["source"], labels=record.get("labels"),
                              data_dir=record.get("data_dir"), seed=record.get("seed", 0))
    for key, digest in record.get("sha256", {}).items():
        if fresh["sha256"].get(key) != digest:
            path = record["source"] if key == "data" else record.get("labels")
            raise ArtifactError(f"'{path}' changed since the {stage} stage recorded it (sha256 "
                                f"{digest[:12]}...); restore it or re-run `koopnet {stage}`.")
    return splits, record


def _fit_split(splits: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
    return splits["train"] if "train" in splits else splits["data"]


# --------------------------------------------------------------------------------------------
# Stages of the command line


def _stage_folder(path, name: str, stage: str, previous: str) -> Path:
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"'{folder}' is not a folder; pass the output folder of "
                                f"`koopnet {previous}`.")
    if not (folder / f"{name}.json").is_file():
        raise FileNotFoundError(f"'{folder}' holds no {name}.json: it is not the output of "
                                f"`koopnet {previous}` (or that run was interrupted; re-run it).")
    return folder


def stage_train(out, *, dataset: str, widths=None, activation: str = "relu", labels=None,
                epochs: int | None = None, lr: float | None = None,
                batch_size: int | None = None, seed: int = 0, data_dir: str | None = None,
                force: bool = False, progress: bool = False) -> Path:
    """``koopnet train``: train an MLP on a data set's training split -> ``out/model.*``."""
    splits, record = load_data(dataset, labels=labels, data_dir=data_dir, seed=seed)
    X, y = _fit_split(splits)
    if y is None:
        raise ValueError(f"training needs labels; '{dataset}' has none. Pass --labels y.npy or a "
                         ".safetensors file with a tensor 'y'.")
    n_classes = int(y.max()) + 1
    named = dataset in _NAMED or dataset.startswith("idx:")
    recipe = default_config(dataset).base if named else ExperimentConfig().base
    if widths is None:
        hidden = default_config(dataset).widths[1:-1] if named else [16, 16]
        widths = [X.shape[1], *hidden, n_classes]
    widths = [check_int(w, "width", low=1) for w in widths]
    if widths[0] != X.shape[1]:
        raise ValueError(f"--widths starts with {widths[0]} but the data has {X.shape[1]} "
                         f"features; start the widths with {X.shape[1]}.")
    if widths[-1] < n_classes:
        raise ValueError(f"--widths ends with {widths[-1]} outputs but the labels have "
                         f"{n_classes} classes; end the widths with {n_classes}.")
    overrides = {k: v for k, v in (("epochs", epochs), ("lr", lr), ("batch_size", batch_size))
                 if v is not None}
    recipe = dataclasses.replace(recipe, **overrides)
    check_int(recipe.epochs, "epochs", low=1)
    folder = prepare_output_dir(out, force=force)
    clock = time.perf_counter()
    torch.manual_seed(seed)  # build_mlp draws the initial weights from the global generator
    model = build_mlp(widths, activation)
    history = train_classifier(model, X, y, recipe, seed=seed, progress=progress)
    check_finite(torch.tensor(history), "training loss",
                 " Training diverged; lower --lr or check the data scale.")
    from koopnet.models import accuracy

    metrics = {f"{name}_accuracy": accuracy(model, *split) for name, split in splits.items()
               if name in ("train", "val", "data") and split[1] is not None}
    metadata = {"stage": "train", "data": record, "seed": seed, "widths": widths,
                "activation": activation, "train": dataclasses.asdict(recipe),
                "final_loss": history[-1], "metrics": metrics,
                "seconds": round(time.perf_counter() - clock, 3)}
    return save_model(model, folder, "model", metadata=metadata, parents=dict(record["sha256"]))


def stage_scale(out, *, run=None, model=None, config=None, data=None, labels=None,
                layer: int, n_inserted: int = 10, init: str = "he", epochs: int | None = None,
                seed: int = 0, data_dir: str | None = None, force: bool = False,
                progress: bool = False) -> Path:
    """``koopnet scale``: insert and train blocks after hidden layer ``layer`` -> ``out/scaled.*``.

    The model comes from a train folder ``run`` or from a user's ``model`` (safetensors state
    dict) + ``config`` (JSON); the inputs from the train folder's data set or ``data``.
    """
    if (run is None) == (model is None):
        raise ValueError("pass either a train folder (koopnet scale RUN ...) or --model "
                         "weights.safetensors --config model.json, not both.")
    if model is not None:
        if config is None:
            raise ValueError("--model needs --config model.json describing the architecture, "
                             'e.g. {"widths": [5, 12, 12, 7, 4], "activation": "tanh"}.')
        if data is None:
            raise ValueError("--model needs --data: a data set name, a .npy file or a "
                             ".safetensors file with 'X' (and 'y').")
        network, _ = load_model_files(model, config)
        parents = {"model": file_sha256(model)}
        sources = {"model": str(Path(model).resolve()), "config": str(Path(config).resolve())}
        splits, record = load_data(data, labels=labels, data_dir=data_dir, seed=seed)
    else:
        folder = _stage_folder(run, "model", "scale", "train")
        network, meta = _load_model(folder, "model")
        parents = {"model": meta["sha256"]}
        sources = {"model": str(folder.resolve())}
        if data is None:
            splits, record = _reload_data(meta, folder / "model.json", "train", "pass --data")
        else:
            splits, record = load_data(data, labels=labels, data_dir=data_dir, seed=seed)
    parents.update(record["sha256"])
    X, y = _fit_split(splits)
    _check_layer(network, layer)
    _check_model(network, X, layer)
    n_inserted = check_int(n_inserted, "n_inserted", low=0)
    recipe = DEFAULT_SCALING if epochs is None else dataclasses.replace(
        DEFAULT_SCALING, epochs=check_int(epochs, "epochs", low=1))
    out = prepare_output_dir(out, force=force)
    clock = time.perf_counter()
    scaled, report = scale_layer(network, layer, X, y, n_inserted=n_inserted, init=init,
                                 config=recipe, seed=seed, progress=progress)
    metadata = {"stage": "scale", "data": record, "seed": seed, "init": init,
                "n_inserted": n_inserted, "scaling": dataclasses.asdict(recipe),
                "report": {"ok": report.ok, "agreement": report.agreement, "init": report.init,
                           "attempts": report.attempts},
                "sources": sources, "seconds": round(time.perf_counter() - clock, 3)}
    return save_scaled(scaled, out, "scaled", metadata=metadata, parents=parents)


def stage_fit(out, *, scale_dir, n_delays: int, rank=None, tikhonov: float = 0.0,
              constant: bool = False, protocol: str = "trajectory",
              force: bool = False) -> Path:
    """``koopnet fit SCALE_DIR``: trajectories of the recorded inputs -> DMD -> hybrid.

    Writes ``out/dmd.*`` (the same format as ``koopnet fit --trajectories``) and
    ``out/hybrid.*``.
    """
    from koopnet.fitting import dmd_tensors

    folder = _stage_folder(scale_dir, "scaled", "fit", "scale")
    scaled, meta = _load_scaled(folder, "scaled")
    splits, record = _reload_data(meta, folder / "scaled.json", "scale", "re-run koopnet scale")
    X, _ = _fit_split(splits)
    _check_fit(scaled, X, n_delays, rank, constant, protocol)
    out = prepare_output_dir(out, force=force)
    clock = time.perf_counter()
    hybrid = fit_hybrid(scaled, X, n_delays=n_delays, rank=rank, tikhonov=tikhonov,
                        constant=constant, protocol=protocol)
    dmd = hybrid.dmd_
    settings = {"stage": "fit", "data": record, "n_delays": n_delays, "rank": rank,
                "tikhonov": tikhonov, "constant": constant, "protocol": protocol,
                "fitted_rank": dmd.rank_, "n_features": dmd.n_features_in_,
                "n_pairs": dmd.n_pairs_, "sources": {"scaled": str(folder.resolve())},
                "seconds": round(time.perf_counter() - clock, 3)}
    parents = {"scaled": meta["sha256"]}
    save_artifact(out, "dmd", dmd_tensors(dmd), settings, kind="dmd", parents=parents)
    return save_hybrid(hybrid, out, "hybrid", metadata=settings, parents=parents)


def stage_evaluate(out, *, fit_dir, data=None, labels=None, data_dir: str | None = None,
                   force: bool = False) -> Path:
    """``koopnet evaluate FIT_DIR``: accuracy of original, scaled and hybrid -> results.json.

    Named data sets are scored on their validation and test splits; file data on the file
    (accuracy with labels, else agreement with the original network's predictions).
    """
    from koopnet import __version__
    from koopnet.experiments import environment
    from koopnet.models import predict_logits

    folder = _stage_folder(fit_dir, "hybrid", "evaluate", "fit")
    clock = time.perf_counter()
    hybrid, hmeta = _load_hybrid(folder, "hybrid")
    scale_dir = Path(hmeta["config"].get("sources", {}).get("scaled", ""))
    if not (scale_dir / "scaled.json").is_file():
        raise FileNotFoundError(f"the scale folder '{scale_dir}' recorded in '{folder}/hybrid"
                                ".json' is gone; restore it or re-run koopnet scale and fit.")
    scaled, smeta = _load_scaled(scale_dir, "scaled")
    if smeta["sha256"] != hmeta["parents"].get("scaled"):
        raise ArtifactError(f"'{scale_dir}/scaled.safetensors' changed since '{folder}' was "
                            "fitted from it (hash mismatch); re-run koopnet fit.")
    if data is None:
        splits, record = _reload_data(hmeta, folder / "hybrid.json", "scale", "pass --data")
    else:
        splits, record = load_data(data, labels=labels, data_dir=data_dir)
    if "train" in splits:
        splits = {k: v for k, v in splits.items() if k in ("val", "test")}
    models = {"original": scaled.original(), "scaled": scaled, "hybrid": hybrid}
    for X, _ in splits.values():
        _check_model(models["original"], X, hybrid.layer)
    out = prepare_output_dir(out, force=force)
    metrics = {}
    for split, (X, y) in splits.items():
        predictions = {k: predict_logits(m, X).argmax(1) for k, m in models.items()}
        reference, metric = (y, "accuracy") if y is not None else (
            predictions["original"], "agreement_with_original")
        metrics[split] = {"n": len(X), "metric": metric,
                          **{k: float((p == reference).float().mean())
                             for k, p in predictions.items()}}
    config = hmeta["config"]
    results = {
        "stage": "evaluate", "schema": 1, "koopnet_version": __version__,
        "data": record, "layer": hybrid.layer, "n_delays": hybrid.n_delays,
        "linear_steps": hybrid.linear_steps, "rank": config.get("rank"),
        "fit": {k: config.get(k) for k in ("rank", "tikhonov", "constant", "protocol",
                                           "fitted_rank", "n_pairs")},
        "metrics": metrics,
        "sources": {"fit": str(folder.resolve()), "scale": str(scale_dir.resolve())},
        "parents": {"hybrid": hmeta["sha256"], "scaled": smeta["sha256"]},
        "timings_s": {"evaluate": round(time.perf_counter() - clock, 3)},
        "environment": environment(),
    }
    write_json(out / "results.json", results)
    return out / "results.json"


def render_evaluation(results: dict) -> str:
    """Markdown for an evaluate folder's results.json."""
    fit = results.get("fit", {})
    lines = [f"# koopnet evaluation: layer {results['layer']}, h={results['n_delays']}", "",
             f"Hidden layer {results['layer'] + 1} replaced by a linear operator of rank "
             f"{fit.get('fitted_rank')} ({results['linear_steps']} linear steps, "
             f"{fit.get('protocol')} pairs, tikhonov {fit.get('tikhonov')}, constant "
             f"{fit.get('constant')}). Data: `{results['data']['source']}`.", "",
             "| split | n | metric | original % | scaled % | hybrid % |",
             "|---|---|---|---|---|---|"]
    order = {"val": 0, "test": 1}
    for split, m in sorted(results["metrics"].items(), key=lambda kv: order.get(kv[0], 2)):
        lines.append(f"| {split} | {m['n']} | {m['metric']} | {100 * m['original']:.2f} | "
                     f"{100 * m['scaled']:.2f} | {100 * m['hybrid']:.2f} |")
    return "\n".join([*lines, ""])
