"""Data sources of the staged command line: a name, an IDX folder or a file -> splits + record.

The record (source, labels, seed, file hashes) goes into each stage's JSON, so a later stage
reloads exactly the same data, or refuses if a file changed since.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch

from koopnet.io.artifacts import ArtifactError, file_sha256
from koopnet.io.datasets import Split
from koopnet.io.serialize import read_safetensors
from koopnet.linearization import check_inputs

__all__ = ["NAMED", "fit_split", "load_data", "reload_data"]

NAMED = ("yinyang", "yinyang3", "mnist")


@functools.lru_cache(maxsize=4)
def _named_splits(source: str, data_dir: str | None, seed: int,
                  n_val: int | None = None) -> dict[str, Split]:
    from koopnet.io.datasets import idx_splits, yinyang_splits

    if source in ("yinyang", "yinyang3"):
        splits = yinyang_splits(source)
    else:
        root = source[4:] if source.startswith("idx:") else data_dir
        splits = idx_splits(root, name="mnist" if source == "mnist" else "idx", seed=seed,
                            n_val=n_val)
    return {"train": splits.train, "val": splits.val, "test": splits.test}


def read_array(path: Path, what: str) -> torch.Tensor:
    if not path.is_file():
        raise FileNotFoundError(f"{what} file '{path}' does not exist.")
    if path.suffix == ".npy":
        with open(path, "rb") as file:
            magic = file.read(6)
        if magic != b"\x93NUMPY":
            raise ArtifactError(f"'{path}' is not a valid .npy file (it does not start with the "
                                "NumPy magic bytes); save it with np.save.")
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


def read_data_file(path: Path, unknown: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Inputs (and labels) of ``X.npy`` or a ``.safetensors`` file holding ``X`` (and ``y``);
    ``unknown`` is the message for any other kind of file. Shapes as stored."""
    if path.suffix == ".safetensors":
        if not path.is_file():
            raise FileNotFoundError(f"data file '{path}' does not exist.")
        tensors = read_safetensors(path)
        if "X" not in tensors:
            raise ArtifactError(f"'{path}' has no tensor 'X' (it holds {sorted(tensors)}); "
                                "store inputs as 'X' [n, ...] and labels as 'y' [n].")
        return tensors["X"], tensors.get("y")
    if path.suffix == ".npy":
        return read_array(path, "data"), None
    raise ValueError(unknown)


def load_data(source: str, *, labels: str | None = None, data_dir: str | None = None,
              seed: int = 0, n_val: int | None = None,
              ) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor | None]], dict]:
    """Resolve a data source of the command line into splits, plus a record for provenance.

    ``source``: ``yinyang``, ``yinyang3``, ``mnist``, ``idx:PATH`` (splits train/val/test), a
    ``.npy`` array of inputs or a ``.safetensors`` file with tensors ``X`` (and ``y``) (one
    split ``data``). ``labels``: a ``.npy`` file of class indices for a file source. ``n_val``:
    the validation split of an IDX source (default min(5000, a tenth of its training set)). The
    record holds the file hashes, which later stages check, and the validation size.
    """
    if not isinstance(source, str) or not source:
        raise ValueError("a data source is needed: yinyang, yinyang3, mnist, idx:PATH, a .npy "
                         "file or a .safetensors file with tensors 'X' (and 'y').")
    record = {"source": source, "labels": labels, "data_dir": data_dir, "seed": seed,
              "sha256": {}}
    is_idx = source == "mnist" or source.startswith("idx:")
    if n_val is not None and not is_idx:
        raise ValueError(f"--n-val is for idx:PATH and mnist; '{source}' has fixed splits.")
    if source in NAMED or is_idx:
        if labels is not None:
            raise ValueError(f"--labels is for file data; '{source}' brings its own labels.")
        seed = seed if is_idx else 0  # yinyang: fixed
        record["seed"] = seed
        splits = _named_splits(source, data_dir, seed, n_val)
        if is_idx:
            record["n_val"] = len(splits["val"])
        return {k: (v.X, v.y) for k, v in splits.items()}, record
    path = Path(source)
    X, y = read_data_file(path, f"unknown data source '{source}': use yinyang, yinyang3, "
                          "mnist, idx:PATH, a .npy file or a .safetensors file with tensors "
                          "'X' (and 'y').")
    record["source"] = str(path.resolve())
    record["sha256"]["data"] = file_sha256(path)
    if labels is not None:
        labels_path = Path(labels)
        y = read_array(labels_path, "labels")
        record["labels"] = str(labels_path.resolve())
        record["sha256"]["labels"] = file_sha256(labels_path)
    X, y = check_inputs(X, y, name=f"data '{path.name}'")
    return {"data": (X, y)}, record


def reload_data(meta: dict, where: Path, stage: str, fix: str) -> tuple[dict, dict]:
    """Load the data set recorded in an artifact's config (``where``, written by ``stage``),
    refusing files that changed since. Returns (splits, record)."""
    record = meta["config"].get("data")
    if not isinstance(record, dict):
        raise ArtifactError(f"'{where}' records no data set; {fix}.")
    splits, fresh = load_data(record["source"], labels=record.get("labels"),
                              data_dir=record.get("data_dir"), seed=record.get("seed", 0),
                              n_val=record.get("n_val"))
    for key, digest in record.get("sha256", {}).items():
        if fresh["sha256"].get(key) != digest:
            path = record["source"] if key == "data" else record.get("labels")
            raise ArtifactError(f"'{path}' changed since the {stage} stage recorded it (sha256 "
                                f"{digest[:12]}...); restore it or re-run `koopnet {stage}`.")
    return splits, record


def fit_split(splits: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
    return splits["train"] if "train" in splits else splits["data"]

