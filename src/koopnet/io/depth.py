"""Depth hybrids of a user's own network on disk: a factory, a state dict and the fitted map.

A :class:`~koopnet.depth.DepthHybrid` wraps an arbitrary ``nn.Module`` (a ViT, a ResNet, a
residual MLP), which koopnet cannot describe in JSON the way it describes Sequential MLPs
(:mod:`koopnet.io.serialize`). So the network is named, not stored: by the import path of a
*factory* (``"mypkg.models:make_vit"``, a callable returning the module, called with JSON
keyword arguments) and a safetensors file of its ``state_dict()``. The artifact
``depth_hybrid.safetensors/json`` (:mod:`koopnet.io.artifacts`: hashed, atomic, no pickle)
holds what the fit added: the DMD tensors, the observable (a delay lifting's settings; a
learned one's settings and psi's architecture in the JSON, psi's weights and standardisation as
tensors, as :mod:`koopnet.io.observables` stores them for every hybrid), the block names,
``per_position``, the precomputed linear map, the factory path and keyword arguments, and the
SHA-256 of the weights file as its parent. Loading imports the factory again (running the
user's code, which the user chose by naming it) and refuses a weights file whose hash differs
from the recorded one, so a reloaded hybrid computes exactly what the saved one did.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import nn

from koopnet._checks import as_tensor
from koopnet.depth import DepthHybrid
from koopnet.dmd import DMD
from koopnet.io.artifacts import ArtifactError, file_sha256, load_artifact, save_artifact
from koopnet.io.observables import observable_entry, restore_observable
from koopnet.io.serialize import _build, _load_state, module_spec, read_safetensors
from koopnet.io.sources import read_array, read_data_file
from koopnet.learned import LearnedObservable
from koopnet.observables import TimeDelay

__all__ = ["build_model", "import_factory", "load_depth_files", "load_depth_hybrid",
           "read_inputs", "save_depth_hybrid"]

KIND = "depth_hybrid"
_DMD_TENSORS = ("basis_", "operator_", "singular_values_", "_projected")
_DTYPES = {"float32": torch.float32, "float64": torch.float64}
_RESERVED = {"blocks", "per_position", "n_delays", "linear_steps", "observable", "dmd",
             "factory", "weights"}


# ----------------------------------------------------------------------------- the network


def import_factory(path: str) -> Callable:
    """The callable named ``"package.module:name"`` (or ``"package.module.name"``).

    Importing runs that module's code: naming it is the user's explicit choice. Every failure
    (no such module, an error while importing, no such name, not callable) is one ValueError.
    """
    if not isinstance(path, str) or not path.strip():
        raise ValueError("--model-factory is empty; name a callable as package.module:function.")
    module_name, sep, attr = path.strip().partition(":")
    if not sep:
        module_name, _, attr = module_name.rpartition(".")
    if not module_name or not attr:
        raise ValueError(f"--model-factory {path!r} is not of the form package.module:function "
                         "(e.g. koopnet.lab.residual:ResidualMLP).")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        raise ValueError(f"--model-factory {path!r}: module '{module_name}' cannot be imported "
                         f"({err}); install it or put its folder on PYTHONPATH.") from err
    except Exception as err:  # the user's module failed while importing: name how
        raise ValueError(f"--model-factory {path!r}: importing '{module_name}' raised "
                         f"{type(err).__name__}: {err}; fix that module.") from err
    target = module
    for part in attr.split("."):
        if not hasattr(target, part):
            raise ValueError(f"--model-factory {path!r}: module '{module_name}' defines no "
                             f"'{attr}'; check the name after the colon.")
        target = getattr(target, part)
    if not callable(target):
        raise ValueError(f"--model-factory {path!r} is a {type(target).__name__}, not a "
                         "callable; name a function or class that returns the nn.Module.")
    return target


def _few(names: list[str]) -> str:
    shown = ", ".join(repr(n) for n in names[:4])
    return f"[{shown}{', ...' if len(names) > 4 else ''}] ({len(names)} in all)"


def load_weights(module: nn.Module, tensors: Mapping[str, torch.Tensor], source: str) -> None:
    """``module.load_state_dict(tensors)`` after checking names and shapes, naming a few of
    any missing, unexpected or misshapen tensors instead of torch's multi-line report."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        which = [f"{what} tensors {_few(names)}" for what, names in
                 (("missing", missing), ("unexpected", unexpected)) if names]
        raise ArtifactError(f"'{source}' does not fit the module the factory builds: "
                            f"{' and '.join(which)}. Check the factory and --factory-kwargs, or "
                            "export with safetensors.torch.save_file(model.state_dict(), path).")
    for key, value in expected.items():
        if tuple(tensors[key].shape) != tuple(value.shape):
            raise ArtifactError(f"'{source}' tensor '{key}' has shape {list(tensors[key].shape)}"
                                f", but the module the factory builds needs {list(value.shape)};"
                                " check --factory-kwargs (sizes, depth).")
    module.load_state_dict(dict(tensors), strict=True)


def build_model(factory: str, weights, factory_kwargs: Mapping | None = None) -> nn.Module:
    """``factory(**factory_kwargs)`` with the state dict of the safetensors file ``weights``
    loaded into it, in eval mode, on the CPU. Never unpickles; imports the factory's module."""
    kwargs = dict(factory_kwargs or {})
    make = import_factory(factory)
    try:
        model = make(**kwargs)
    except Exception as err:  # the user's code: say which call failed and how
        raise ValueError(f"calling --model-factory {factory!r} with {json.dumps(kwargs)} raised "
                         f"{type(err).__name__}: {err}; check --factory-kwargs.") from err
    if not isinstance(model, nn.Module):
        raise TypeError(f"--model-factory {factory!r} returned a {type(model).__name__}, not a "
                        "torch.nn.Module; name a callable that builds the network.")
    load_weights(model, read_safetensors(Path(weights)), str(weights))
    return model.eval()


def read_inputs(data, labels=None) -> tuple[torch.Tensor, torch.Tensor | None, dict]:
    """Inputs ``X.npy`` or a ``.safetensors`` file with ``X`` (and ``y``), shaped as the model
    takes them ([n, ...]: vectors, images or token ids; nothing is flattened), and optional
    labels ``y.npy``. Returns (X, y or None, a record with the files' paths and hashes)."""
    path = Path(data)
    if not path.is_file():
        raise FileNotFoundError(f"data file '{path}' does not exist.")
    X, y = read_data_file(path, f"data file '{path}' must be X.npy or a .safetensors file "
                          "with tensors 'X' (and 'y').")
    record = {"source": str(path.resolve()), "labels": None,
              "sha256": {"data": file_sha256(path)}}
    if X.ndim < 1 or len(X) < 2:
        raise ValueError(f"data '{path.name}' has shape {list(X.shape)}; pass at least 2 "
                         "samples along the first dimension, shaped as the model takes them.")
    if labels is not None:
        y = read_array(Path(labels), "labels")
        record["labels"] = str(Path(labels).resolve())
        record["sha256"]["labels"] = file_sha256(labels)
    if y is not None:
        y = as_tensor(y, "labels", ndim=1)
        if y.is_floating_point() and not bool((y == y.round()).all()):
            raise ValueError("labels must be integer class indices; got fractional values.")
        if len(y) != len(X):
            raise ValueError(f"labels has {len(y)} entries but data '{path.name}' has {len(X)} "
                             "samples; pass one label per sample.")
        y = y.to(torch.int64)
    return X, y, record


# ----------------------------------------------------------------------------- save / load


def _dmd_entry(dmd: DMD) -> dict:
    return {"rank": dmd.rank, "tikhonov": dmd.tikhonov, "tikhonov_": dmd.tikhonov_,
            "exact_rollout": dmd.exact_rollout, "dtype": str(dmd.dtype).removeprefix("torch."),
            "rank_": dmd.rank_, "n_pairs": dmd.n_pairs_, "n_features": dmd.n_features_in_}


def _restore_dmd(entry: dict, tensors: dict) -> DMD:
    """A fitted DMD from its saved tensors, without refitting (no data needed)."""
    if entry["dtype"] not in _DTYPES:
        raise ValueError(f"unknown DMD dtype {entry['dtype']!r}")
    dmd = DMD(entry["rank"], tikhonov=entry["tikhonov"], dtype=_DTYPES[entry["dtype"]],
              exact_rollout=bool(entry["exact_rollout"]))
    return dmd.restore(**{name.strip("_"): tensors[f"dmd.{name.strip('_')}"]
                          for name in _DMD_TENSORS},
                       tikhonov_=entry["tikhonov_"], n_pairs=entry["n_pairs"])


def _rebuild(model: nn.Module, config: dict, tensors: dict) -> DepthHybrid:
    observable = restore_observable(config["observable"], tensors, _build, _load_state)
    dmd = _restore_dmd(config["dmd"], tensors)
    hybrid = DepthHybrid(model, list(config["blocks"]), observable, dmd,
                         per_position=bool(config["per_position"]))
    saved = tensors["linear_map"]
    if saved.shape != hybrid.linear_map.shape:
        raise ValueError(f"linear_map has shape {list(saved.shape)}; these blocks need "
                         f"{list(hybrid.linear_map.shape)}")
    with torch.no_grad():  # the saved map, bit for bit (it may have been edited after the fit)
        hybrid.linear_map.copy_(saved)
    return hybrid.eval()


def save_depth_hybrid(hybrid: DepthHybrid, directory, *, factory: str, weights,
                      factory_kwargs: Mapping | None = None, name: str = KIND,
                      metadata: Mapping | None = None, parents: Mapping | None = None) -> Path:
    """Save ``hybrid`` as ``<directory>/<name>.safetensors/json``; returns the JSON path.

    ``factory`` + ``factory_kwargs`` + ``weights`` must rebuild the network the hybrid was
    fitted on: they are checked by rebuilding it now (a mismatch names the first differing
    tensor), and the weights file's SHA-256 is recorded as the parent ``weights``.
    """
    if not isinstance(hybrid, DepthHybrid):
        raise TypeError(f"hybrid must be a koopnet DepthHybrid; got {type(hybrid).__name__}.")
    if type(hybrid.observable) not in (TimeDelay, LearnedObservable):
        raise TypeError(f"depth hybrids are saved with TimeDelay or LearnedObservable "
                        f"observables; this one uses {type(hybrid.observable).__name__}.")
    kwargs = json.loads(json.dumps(dict(factory_kwargs or {})))  # as a reader will see them
    clash = sorted(_RESERVED & set(metadata or {}))
    if clash:
        raise ValueError(f"metadata keys {clash} are reserved for the depth hybrid; rename them.")
    dmd = hybrid.dmd_
    entry, observable_tensors = observable_entry(hybrid.observable, module_spec)
    config = {**dict(metadata or {}), "blocks": list(hybrid.blocks),
              "per_position": hybrid.per_position, "n_delays": hybrid.n_delays,
              "linear_steps": hybrid.linear_steps, "observable": entry, "dmd": _dmd_entry(dmd),
              "factory": {"path": factory, "kwargs": kwargs},
              "weights": str(Path(weights).resolve())}
    tensors = {f"dmd.{n.strip('_')}": getattr(dmd, n).detach().cpu() for n in _DMD_TENSORS}
    tensors["linear_map"] = hybrid.linear_map.detach().cpu()
    tensors.update({key: value.detach().cpu() for key, value in observable_tensors.items()})
    again = _rebuild(build_model(factory, weights, kwargs), config, dict(tensors))
    _check_same(hybrid, again, weights)
    Path(directory).mkdir(parents=True, exist_ok=True)
    return save_artifact(directory, name, tensors, config, kind=KIND,
                         parents={**dict(parents or {}), "weights": file_sha256(weights)})


def _check_same(hybrid: DepthHybrid, again: DepthHybrid, weights) -> None:
    """Refuse to save a hybrid that its factory and weights would not rebuild."""
    ours, theirs = hybrid.state_dict(), again.state_dict()
    if set(ours) != set(theirs):
        raise ValueError(f"the factory builds a network whose tensors {_few(sorted(theirs))} "
                         f"differ from the hybrid's {_few(sorted(ours))}; pass the factory the "
                         "hybrid's model came from.")
    for key, value in ours.items():
        if not torch.equal(value.detach().cpu(), theirs[key].to(value.dtype)):
            raise ValueError(f"'{weights}' does not hold the weights this hybrid was fitted on "
                             f"(tensor '{key}' differs); pass the file its model was loaded "
                             "from.")


def load_depth_files(directory, *, weights=None, name: str = KIND,
                     ) -> tuple[DepthHybrid, nn.Module, dict]:
    """(hybrid, the original network, the artifact's JSON) of a saved depth hybrid.

    The network is rebuilt from the recorded factory and keyword arguments and from
    ``weights`` (default: the recorded path), which must hash to the recorded SHA-256.
    """
    tensors, meta = load_artifact(directory, name, kind=KIND)
    where = f"{Path(directory) / name}.json"
    try:
        config = meta["config"]
        factory, kwargs = config["factory"]["path"], config["factory"]["kwargs"]
        path = Path(config["weights"] if weights is None else weights)
        recorded = meta["parents"]["weights"]
    except (KeyError, TypeError) as err:
        raise ArtifactError(f"'{where}' records no factory and weights ({err}); re-create it "
                            "with koopnet depth-fit.") from err
    if not path.is_file():
        raise FileNotFoundError(f"weights file '{path}' (recorded in '{where}') does not exist; "
                                "pass its new place with --weights.")
    found = file_sha256(path)
    if found != recorded:
        raise ArtifactError(f"'{path}' is not the weights file this depth hybrid was fitted on "
                            f"(sha256 {found[:12]}..., recorded {recorded[:12]}...); pass that "
                            "file with --weights or re-run koopnet depth-fit.")
    model = build_model(factory, path, kwargs)
    try:
        hybrid = _rebuild(model, config, tensors)
    except (KeyError, TypeError, ValueError) as err:
        if isinstance(err, ArtifactError):
            raise
        raise ArtifactError(f"'{where}' has no valid depth hybrid description ({err}); re-create"
                            " it with koopnet depth-fit.") from err
    return hybrid, model, meta


def load_depth_hybrid(directory, *, weights=None, name: str = KIND) -> DepthHybrid:
    """Load a hybrid saved by :func:`save_depth_hybrid`; its outputs equal the saved one's."""
    return load_depth_files(directory, weights=weights, name=name)[0]
