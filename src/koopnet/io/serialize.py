"""Save and load every stage as safetensors + JSON; modules are rebuilt from JSON, never run.

``save_model`` / ``save_scaled`` / ``save_hybrid`` write an artifact (:mod:`koopnet.io.artifacts`:
atomic, hashed, no pickle) whose JSON records the architecture (module types, widths, activation
names and their arguments), so the ``load_*`` functions rebuild the modules without running any
stored code. Everything a forward pass depends on (the architecture, the layer, the number of
linear steps, the observable, ``compute_dtype``) lives in the hashed part of the JSON, so an
edited file is refused instead of silently computing something else. A round trip gives
bit-identical outputs.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import safetensors.torch
import torch
from torch import nn

from koopnet._checks import check_int
from koopnet.hybrid import KoopmanHybrid
from koopnet.io.artifacts import (
    ArtifactError,
    check_metadata,
    file_sha256,
    load_artifact,
    save_artifact,
)
from koopnet.io.observables import observable_entry, restore_observable
from koopnet.models import ACTIVATIONS, activation_name
from koopnet.scaling import ResidualBlock, ScaledMLP, ScalingSpec, tie_blocks, tied_steps

__all__ = ["load_hybrid", "load_model", "load_model_files", "load_scaled", "mlp_spec",
           "module_spec", "read_safetensors", "save_hybrid", "save_model", "save_scaled"]

_SOFTMAX = (nn.Softmax, nn.LogSoftmax)
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32,
           "float64": torch.float64}

_ACTIVATION_ARGS = {"leaky_relu": ("negative_slope",), "elu": ("alpha",),
                    "gelu": ("approximate",)}
# norms between a Linear and its activation (koopnet.models.NORMS) and their settings
_NORMS = {nn.LayerNorm: "layer_norm", nn.BatchNorm1d: "batch_norm"}
_NORM_ARGS = {"layer_norm": ("normalized_shape", "eps", "elementwise_affine"),
              "batch_norm": ("num_features", "eps", "momentum", "affine", "track_running_stats")}


def module_spec(module: nn.Module, where: str = "model") -> dict:
    """JSON description of a Sequential of Linear / activation / Softmax modules (and of the
    residual or weight-tied blocks that :func:`koopnet.scaling.make_inserts` builds)."""
    if tied_steps(module):  # one block applied len(module) times: stored once
        return {"type": "tied", "n_steps": len(module), "step": module_spec(module[0],
                                                                             f"{where}[0]")}
    if isinstance(module, ResidualBlock):
        return {"type": "residual", "body": module_spec(module.body, f"{where}.body")}
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
    if type(module) in _NORMS:  # settings here; weights and running statistics in the file
        kind = _NORMS[type(module)]
        return {"type": kind, **{a: getattr(module, a) for a in _NORM_ARGS[kind]},
                **({"bias": module.bias is not None} if kind == "layer_norm" else {})}
    raise TypeError(f"{where} is {type(module).__name__}; koopnet saves nn.Sequential MLPs of "
                    f"Linear, activations {sorted(ACTIVATIONS)}, LayerNorm, BatchNorm1d and a "
                    "final Softmax only.")


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
        if kind in _NORM_ARGS:
            cls = next(c for c, k in _NORMS.items() if k == kind)
            return cls(**{a: spec[a] for a in _NORM_ARGS[kind]},
                       **({"bias": bool(spec["bias"])} if kind == "layer_norm" else {}))
        if kind == "residual":
            return ResidualBlock(_build(spec["body"], f"{where}.body"))
        if kind == "tied":
            n_steps = check_int(spec["n_steps"], f"{where} n_steps", low=2)
            return tie_blocks(_build(spec["step"], f"{where}[0]"), n_steps)
    except ArtifactError:
        raise
    except (KeyError, TypeError, ValueError) as err:
        raise ArtifactError(f"{where}: malformed architecture entry {spec!r} ({err}).") from err
    raise ArtifactError(f"{where}: unknown module type {kind!r}; expected sequential, linear, "
                        "activation, softmax, layer_norm, batch_norm, residual or tied.")


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
        if not tensors[key].is_floating_point() and value.is_floating_point():
            raise ArtifactError(f"'{source}' tensor '{key}' has dtype {tensors[key].dtype}; "
                                "weights must be floating point.")
    module.load_state_dict(tensors, strict=True, assign=True)  # keeps the saved dtypes
    return module.eval()


def _parse_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ArtifactError(f"'{path}' is not valid JSON ({err}); re-create it.") from err


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
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
    tensors = read_safetensors(weights)
    if "format_version" in spec and "sha256" in spec:  # a koopnet artifact JSON
        if spec.get("kind") != "model":
            raise ArtifactError(f"'{config}' holds a '{spec.get('kind')}' artifact, expected "
                                "'model'.")
        check_metadata(spec, config)
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
    config = {**_metadata(metadata, {"architecture", "layer", "scaling_spec"}),
              "architecture": architecture, "layer": scaled.layer}
    if scaled.spec != ScalingSpec():  # default scaled models keep their old JSON
        config["scaling_spec"] = scaled.spec.to_dict()
    Path(directory).mkdir(parents=True, exist_ok=True)
    # a tied block's tensors appear once per step in state_dict(); save_artifact copies each
    return save_artifact(directory, name, dict(scaled.state_dict()), config, kind="scaled",
                         parents=dict(parents or {}))


def _load_scaled(directory, name: str = "scaled") -> tuple[ScaledMLP, dict]:
    tensors, meta = load_artifact(directory, name, kind="scaled")
    source = f"{Path(directory) / name}.safetensors"
    try:
        arch, layer = meta["config"]["architecture"], int(meta["config"]["layer"])
        parts = {part: _build(arch[part], part)
                 for part in ("head", "inserts", "replaced", "tail")}
        spec = ScalingSpec.from_dict(meta["config"].get("scaling_spec", {}))
    except (KeyError, TypeError, ValueError) as err:
        raise ArtifactError(f"'{Path(directory) / name}.json' has no valid scaled-model "
                            f"architecture ({err}); re-save it with koopnet.save_scaled.") from err
    _check_shared(parts["inserts"], tensors, source, "inserts.")
    scaled = _load_state(ScaledMLP(**parts, layer=layer, spec=spec), tensors, source)
    for part in ("head", "replaced", "tail"):  # as scale_layer leaves them: originals frozen
        for p in getattr(scaled, part).parameters():
            p.requires_grad_(False)
    return scaled, meta


def _check_shared(module: nn.Module, tensors: dict, source: str, prefix: str) -> None:
    """Tensors that one shared (tied) parameter is saved under must all be equal: loading keeps
    only one of them, so a file whose copies differ is refused rather than half-read."""
    by_parameter: dict[int, list[str]] = {}
    for key, value in module.state_dict(keep_vars=True).items():
        by_parameter.setdefault(id(value), []).append(prefix + key)
    for keys in by_parameter.values():
        present = [k for k in keys if k in tensors]
        if any(not torch.equal(tensors[present[0]], tensors[k]) for k in present[1:]):
            raise ArtifactError(f"'{source}' tensors {present[:3]} belong to one tied "
                                "parameter but differ; the file was not written by save_scaled.")


def load_scaled(directory, name: str = "scaled") -> ScaledMLP:
    """Load a scaled model saved by :func:`save_scaled`."""
    return _load_scaled(directory, name)[0]


def save_hybrid(hybrid: KoopmanHybrid, directory, name: str = "hybrid", *,
                metadata: Mapping | None = None, parents: Mapping | None = None) -> Path:
    """Save a :class:`~koopnet.hybrid.KoopmanHybrid`: its modules, operator buffers and the
    observable's settings (everything its forward pass uses)."""
    if not isinstance(hybrid, KoopmanHybrid):
        raise TypeError(f"hybrid must be a KoopmanHybrid; got {type(hybrid).__name__}.")
    entry, observable_tensors = observable_entry(hybrid.observable, module_spec)
    structure = {
        "architecture": {part: module_spec(getattr(hybrid, part), part)
                         for part in ("head", "prefix", "tail")},
        "layer": hybrid.layer, "width": hybrid.width, "out_width": hybrid.out_width,
        "linear_steps": hybrid.linear_steps, "pad_value": hybrid.pad_value,
        "rank_": hybrid.rank_,
        "compute_dtype": (None if hybrid.compute_dtype is None
                          else str(hybrid.compute_dtype).removeprefix("torch.")),
        "observable": entry,
    }
    config = {**_metadata(metadata, set(structure)), **structure}
    Path(directory).mkdir(parents=True, exist_ok=True)
    tensors = {**hybrid.state_dict(), **observable_tensors}
    return save_artifact(directory, name, tensors, config, kind="hybrid",
                         parents=dict(parents or {}))


def _load_hybrid(directory, name: str = "hybrid") -> tuple[KoopmanHybrid, dict]:
    tensors, meta = load_artifact(directory, name, kind="hybrid")
    config = meta["config"]
    try:
        arch, obs = config["architecture"], config["observable"]
        parts = {part: _build(arch[part], part) for part in ("head", "prefix", "tail")}
        observable = restore_observable(obs, tensors, _build, _load_state)
        D, R = observable.n_output_features_, int(config["rank_"])
        w_out = int(config["out_width"])
        shapes = {"basis": (D, R), "operator": (R, R), "readout": (w_out, D),
                  "linear_map": (w_out, D)}
        buffers = {key: torch.empty(shape, dtype=torch.float64) for key, shape in shapes.items()}
        compute = config.get("compute_dtype")
        if compute is not None and compute not in _DTYPES:
            raise ValueError(f"unknown compute_dtype {compute!r}")
        hybrid = KoopmanHybrid(
            parts["head"], parts["prefix"], parts["tail"], observable, **buffers,
            layer=int(config["layer"]), width=int(config["width"]),
            linear_steps=int(config["linear_steps"]), pad_value=float(config["pad_value"]),
            compute_dtype=None if compute is None else _DTYPES[compute])
    except (KeyError, TypeError, ValueError) as err:
        if isinstance(err, ArtifactError):
            raise
        raise ArtifactError(f"'{Path(directory) / name}.json' has no valid hybrid description "
                            f"({err}); re-save it with koopnet.save_hybrid.") from err
    return _load_state(hybrid, tensors, f"{Path(directory) / name}.safetensors"), meta


def load_hybrid(directory, name: str = "hybrid") -> KoopmanHybrid:
    """Load a hybrid saved by :func:`save_hybrid`; its outputs equal the saved one's exactly."""
    return _load_hybrid(directory, name)[0]


def load_with_meta(directory, name: str) -> tuple[nn.Module, dict]:
    """Load the artifact ``name`` (a model, scaled model or hybrid, by its recorded kind)
    together with its JSON metadata, for the stages that also read its provenance."""
    loaders = {"model": _load_model, "scaled": _load_scaled, "hybrid": _load_hybrid}
    return loaders[name](directory, name)
