"""The staged command line: ``koopnet train``, ``scale``, ``fit`` and ``evaluate``.

Each stage reads the previous stage's folder, checks the hashes it recorded, and writes its own
folder, so a user can enter at any stage with their own model. A stage computes first and then
writes its whole folder through :func:`koopnet.io.artifacts.staged_folder`: an interrupted or
killed stage leaves the earlier folder (``--force``) whole, never a mix of two runs.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from pathlib import Path

import torch

from koopnet._checks import check_finite, check_int
from koopnet._version import __version__
from koopnet.distributed import agree, is_main, process_group
from koopnet.io.artifacts import (
    ArtifactError,
    check_output_dir,
    file_sha256,
    save_artifact,
    staged_folder,
    write_json,
)
from koopnet.io.serialize import (
    load_model_files,
    load_with_meta,
    save_hybrid,
    save_model,
    save_scaled,
)
from koopnet.io.sources import NAMED, fit_split, load_data, reload_data
from koopnet.io.trajectories import dmd_tensors
from koopnet.lab.protocols import environment
from koopnet.lab.recipes import ExperimentConfig, default_config
from koopnet.linearization import check_model, describe_recipe, fit_hybrid, scaling_recipe
from koopnet.models import (
    accuracy,
    build_mlp,
    check_layer,
    model_dtype,
    predict_logits,
    train_classifier,
)
from koopnet.scaling import scale_layer
from koopnet.spec import FitSpec

log = logging.getLogger(__name__)

__all__ = ["stage_evaluate", "stage_fit", "stage_scale", "stage_train"]


def _stage_folder(path, name: str, stage: str, previous: str) -> Path:
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"'{folder}' is not a folder; pass the output folder of "
                                f"`koopnet {previous}`.")
    if not (folder / f"{name}.json").is_file():
        raise FileNotFoundError(f"'{folder}' holds no {name}.json: it is not the output of "
                                f"`koopnet {previous}` (or that run was interrupted; re-run it).")
    return folder


def _check_inputs_outside(out, *inputs) -> None:
    """Refuse an ``out`` that holds one of the stage's inputs: the finished stage replaces the
    whole folder, which would delete them."""
    folder = Path(out)
    if not folder.is_dir():
        return
    root = folder.resolve()
    for item in inputs:
        if not item:
            continue
        path = Path(str(item).removeprefix("idx:"))
        if path.exists() and (path.resolve() == root or root in path.resolve().parents):
            raise ValueError(f"--out '{folder}' holds this stage's input '{item}', and a stage "
                             "replaces its whole output folder; pick another --out.")


def _data_inputs(record: dict) -> list:
    return [record.get("source"), record.get("labels"), record.get("data_dir")]


def stage_train(out, *, dataset: str, widths=None, activation: str = "relu", labels=None,
                epochs: int | None = None, lr: float | None = None,
                batch_size: int | None = None, seed: int = 0, data_dir: str | None = None,
                n_val: int | None = None, force: bool = False, progress: bool = False,
                device="cpu") -> Path:
    """``koopnet train``: train an MLP on a data set's training split -> ``out/model.*``.

    ``n_val``: validation images of an IDX source (default min(5000, a tenth of the set)).
    """
    check_output_dir(out, force=force)  # a bad --out fails before the data is even loaded
    splits, record = load_data(dataset, labels=labels, data_dir=data_dir, seed=seed,
                               n_val=n_val)
    X, y = fit_split(splits)
    if y is None:
        raise ValueError(f"training needs labels; '{dataset}' has none. Pass --labels y.npy or a "
                         ".safetensors file with a tensor 'y'.")
    n_classes = int(y.max()) + 1
    named = dataset in NAMED or dataset.startswith("idx:")
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
    check_int(recipe.batch_size, "batch_size", low=1)
    if not math.isfinite(recipe.lr) or recipe.lr <= 0:
        raise ValueError(f"lr={recipe.lr} must be a finite number > 0 (e.g. --lr 1e-3).")
    _check_inputs_outside(out, dataset, labels, data_dir)
    clock = time.perf_counter()
    torch.manual_seed(seed)  # build_mlp draws the initial weights from the global generator
    model = build_mlp(widths, activation).to(device)  # drawn on the CPU, trained on device
    history = train_classifier(model, X.to(device), y.to(device), recipe, seed=seed,
                               progress=progress)
    model = model.cpu()  # scored and saved on the CPU
    check_finite(torch.tensor(history), "training loss",
                 " Training diverged; lower --lr or check the data scale.")
    metrics = {f"{name}_accuracy": accuracy(model, *split) for name, split in splits.items()
               if name in ("train", "val", "data") and split[1] is not None}
    metadata = {"stage": "train", "data": record, "seed": seed, "widths": widths,
                "activation": activation, "train": dataclasses.asdict(recipe),
                "final_loss": history[-1], "metrics": metrics, "device": str(device),
                "seconds": round(time.perf_counter() - clock, 3)}
    with staged_folder(out, force=force) as stage:
        path = save_model(model, stage, "model", metadata=metadata,
                          parents=dict(record["sha256"]))
    return Path(out) / path.name


def stage_scale(out, *, run=None, model=None, config=None, data=None, labels=None,
                layer: int, n_inserted: int = 10, init: str = "he", epochs: int | None = None,
                seed: int = 0, data_dir: str | None = None, force: bool = False,
                progress: bool = False, device="cpu") -> Path:
    """``koopnet scale``: insert and train blocks after hidden layer ``layer`` -> ``out/scaled.*``.

    The model comes from a train folder ``run`` or from a user's ``model`` (safetensors state
    dict) + ``config`` (JSON); the inputs from the train folder's data set or ``data``.
    """
    if (run is None) == (model is None):
        raise ValueError("pass either a train folder (koopnet scale RUN ...) or --model "
                         "weights.safetensors --config model.json, not both.")
    check_output_dir(out, force=force)  # a bad --out fails before anything is loaded
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
        network, meta = load_with_meta(folder, "model")
        parents = {"model": meta["sha256"]}
        sources = {"model": str(folder.resolve())}
        if data is None:
            splits, record = reload_data(meta, folder / "model.json", "train", "pass --data")
        else:
            splits, record = load_data(data, labels=labels, data_dir=data_dir, seed=seed)
    parents.update(record["sha256"])
    if model_dtype(network) in (torch.float16, torch.bfloat16):  # as koopnet.linearize does
        log.info("the %s model is scaled in float32", model_dtype(network))
        network = network.float()
    X, y = fit_split(splits)
    X = X.to(model_dtype(network))  # data reads as float32 whatever precision the weights have
    layer = check_layer(network, layer)
    check_model(network, X, layer)
    n_inserted = check_int(n_inserted, "n_inserted", low=0)
    recipe = scaling_recipe(len(X))
    if epochs is not None:
        recipe = dataclasses.replace(recipe, epochs=check_int(epochs, "epochs", low=1))
    log.info("%s", describe_recipe(recipe, len(X)))
    _check_inputs_outside(out, run, model, config, data, labels, data_dir, *_data_inputs(record))
    clock = time.perf_counter()
    scaled, report = scale_layer(network.to(device), layer, X.to(device),
                                 None if y is None else y.to(device), n_inserted=n_inserted,
                                 init=init, config=recipe, seed=seed, progress=progress)
    scaled = scaled.cpu()  # saved on the CPU
    metadata = {"stage": "scale", "data": record, "seed": seed, "init": init,
                "n_inserted": n_inserted, "scaling": dataclasses.asdict(recipe),
                "report": {"ok": report.ok, "agreement": report.agreement, "init": report.init,
                           "attempts": report.attempts},
                "sources": sources, "device": str(device),
                "seconds": round(time.perf_counter() - clock, 3)}
    with staged_folder(out, force=force) as stage:
        path = save_scaled(scaled, stage, "scaled", metadata=metadata, parents=parents)
    return Path(out) / path.name


def stage_fit(out, *, scale_dir, spec: FitSpec, force: bool = False, device="cpu") -> Path:
    """``koopnet fit SCALE_DIR``: trajectories of the recorded inputs -> DMD -> hybrid.

    Writes ``out/dmd.*`` (the same format as ``koopnet fit --trajectories``) and
    ``out/hybrid.*``. Under torchrun every rank collects the trajectories of its shard of the
    inputs, the statistics are all-reduced once (see :func:`koopnet.fit_hybrid`), and rank 0
    alone writes the folder while the others wait for it to be complete.
    """
    with process_group() as (_, world):
        check_output_dir(out, force=force)
        folder = _stage_folder(scale_dir, "scaled", "fit", "scale")
        scaled, meta = load_with_meta(folder, "scaled")
        splits, record = reload_data(meta, folder / "scaled.json", "scale",
                                     "re-run koopnet scale")
        X, _ = fit_split(splits)
        _check_inputs_outside(out, folder, *_data_inputs(record))
        clock = time.perf_counter()
        hybrid = fit_hybrid(scaled.to(device), X, spec=spec).cpu()  # saved on the CPU
        dmd = hybrid.dmd_.to("cpu")
        settings = {"stage": "fit", "data": record, "fit": spec.as_dict(),
                    "n_features": dmd.n_features_in_, "n_pairs": dmd.n_pairs_,
                    "world_size": world, "sources": {"scaled": str(folder.resolve())},
                    "device": str(device),
                    "seconds": round(time.perf_counter() - clock, 3)}
        parents = {"scaled": meta["sha256"]}

        def write() -> None:
            with staged_folder(out, force=force) as stage:
                save_artifact(stage, "dmd", dmd_tensors(dmd), {**settings, "rank_": dmd.rank_},
                              kind="dmd", parents=parents)
                save_hybrid(hybrid, stage, "hybrid", metadata=settings, parents=parents)

        # rank 0 writes; the others wait in agree's all-reduce until the folder is whole
        agree(write if is_main() else lambda: None)
    return Path(out) / "hybrid.json"


def stage_evaluate(out, *, fit_dir, data=None, labels=None, data_dir: str | None = None,
                   force: bool = False, device="cpu") -> Path:
    """``koopnet evaluate FIT_DIR``: accuracy of original, scaled and hybrid -> results.json.

    Named data sets are scored on their validation and test splits; file data on the file
    (accuracy with labels, else agreement with the original network's predictions).
    """
    check_output_dir(out, force=force)  # a bad --out fails before anything is loaded
    folder = _stage_folder(fit_dir, "hybrid", "evaluate", "fit")
    clock = time.perf_counter()
    hybrid, hmeta = load_with_meta(folder, "hybrid")
    scale_dir = Path(hmeta["config"].get("sources", {}).get("scaled", ""))
    if not (scale_dir / "scaled.json").is_file():
        raise FileNotFoundError(f"the scale folder '{scale_dir}' recorded in '{folder}/hybrid"
                                ".json' is gone; restore it or re-run koopnet scale and fit.")
    scaled, smeta = load_with_meta(scale_dir, "scaled")
    if smeta["sha256"] != hmeta["parents"].get("scaled"):
        raise ArtifactError(f"'{scale_dir}/scaled.safetensors' changed since '{folder}' was "
                            "fitted from it (hash mismatch); re-run koopnet fit.")
    if data is None:
        splits, record = reload_data(hmeta, folder / "hybrid.json", "scale", "pass --data")
    else:
        splits, record = load_data(data, labels=labels, data_dir=data_dir)
    if "train" in splits:
        splits = {k: v for k, v in splits.items() if k in ("val", "test")}
    dtype = model_dtype(scaled)  # data reads as float32 whatever precision the weights have
    splits = {k: (X.to(dtype), y) for k, (X, y) in splits.items()}
    models = {"original": scaled.original(), "scaled": scaled, "hybrid": hybrid}
    for X, _ in splits.values():
        check_model(models["original"], X, hybrid.layer)
    _check_inputs_outside(out, folder, scale_dir, data, labels, data_dir, *_data_inputs(record))
    metrics = {}
    for split, (X, y) in splits.items():
        predictions = {k: predict_logits(m.to(device), X.to(device)).argmax(1).cpu()
                       for k, m in models.items()}
        reference, metric = (y, "accuracy") if y is not None else (
            predictions["original"], "agreement_with_original")
        metrics[split] = {"n": len(X), "metric": metric,
                          **{k: float((p == reference).float().mean())
                             for k, p in predictions.items()}}
    config = hmeta["config"]
    results = {
        "stage": "evaluate", "schema": 1, "koopnet_version": __version__,
        "data": record, "layer": hybrid.layer, "n_delays": hybrid.n_delays,
        "linear_steps": hybrid.linear_steps,
        "fit": {**config["fit"], "rank_": hybrid.rank_, "n_pairs": config.get("n_pairs")},
        "metrics": metrics,
        "sources": {"fit": str(folder.resolve()), "scale": str(scale_dir.resolve())},
        "parents": {"hybrid": hmeta["sha256"], "scaled": smeta["sha256"]},
        "timings_s": {"evaluate": round(time.perf_counter() - clock, 3)},
        "environment": environment(device),
    }
    with staged_folder(out, force=force) as stage:
        write_json(stage / "results.json", results)
    return Path(out) / "results.json"

