"""Data sets as plain tensors: ``X [n, features]`` (float32) and ``y [n]`` (int64).

Yin-Yang follows the reference generator of Kriener et al. 2021 (arXiv 2102.08211): rejection
sampling on the unit disk with a per-sample goal class drawn first, all from one
``np.random.RandomState(seed)`` stream, so a seed gives the same points as the reference code.
``yinyang`` is the paper's variant (Aswani et al. 2024): 2 features, 2 classes, the dots left
empty. ``yinyang3`` is the original: 4 mirrored features, 3 classes, canonical seeds.

MNIST and any MNIST-format set come from :mod:`koopnet.io.idx`; they are scaled to [0, 1],
normalised with MNIST's mean and standard deviation and flattened, as the paper did.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from koopnet._checks import check_int

log = logging.getLogger("koopnet")

R_SMALL, R_BIG = 0.1, 0.5


def yinyang_class(x: float, y: float) -> int:
    """Class of a point in the Yin-Yang disk: 0 yang, 1 yin, 2 dot (Kriener's rule)."""
    d_right = np.hypot(x - 1.5 * R_BIG, y - R_BIG)
    d_left = np.hypot(x - 0.5 * R_BIG, y - R_BIG)
    if d_right < R_SMALL or d_left < R_SMALL:
        return 2
    is_yin = (
        d_right <= R_SMALL
        or R_SMALL < d_left <= 0.5 * R_BIG
        or (y > R_BIG and d_right > 0.5 * R_BIG)
    )
    return int(is_yin)


def make_yinyang(n: int, seed: int, *, n_classes: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw ``n`` balanced Yin-Yang points.

    ``n_classes=2`` gives the paper's variant: features (x, y), goals yin/yang only, so dot points
    are never accepted. ``n_classes=3`` gives the original set with features (x, y, 1-x, 1-y).

    Shape: X [n, 2] or [n, 4] float32, y [n] int64.

    >>> X, y = make_yinyang(4, seed=0)
    >>> tuple(X.shape), y.dtype
    ((4, 2), torch.int64)
    """
    if n_classes not in (2, 3):
        raise ValueError(f"n_classes={n_classes} must be 2 (paper variant) or 3 (original).")
    n = check_int(n, "n", low=1)
    rng = np.random.RandomState(check_int(seed, "seed", low=0, high=2**32 - 1))
    points = np.empty((n, 2))
    labels = np.empty(n, dtype=np.int64)
    for i in range(n):
        goal = rng.randint(n_classes)
        while True:
            x, y = rng.rand(2) * 2.0 * R_BIG
            if np.hypot(x - R_BIG, y - R_BIG) > R_BIG:
                continue
            if yinyang_class(x, y) == goal:
                break
        points[i], labels[i] = (x, y), goal
    if n_classes == 3:
        points = np.concatenate([points, 1.0 - points], axis=1)
    return torch.tensor(points, dtype=torch.float32), torch.from_numpy(labels)


@dataclass
class Split:
    """Inputs and labels of one split. Shape: X [n, features], y [n]."""

    X: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, index) -> Split:
        return Split(self.X[index], self.y[index])

    def to(self, device: torch.device | str) -> Split:
        """The split with inputs and labels on ``device`` (the data follows the model)."""
        return Split(self.X.to(device), self.y.to(device))


@dataclass
class DataSplits:
    """Train / validation / test splits plus what a model needs to know about them."""

    name: str
    train: Split
    val: Split
    test: Split
    n_features: int
    n_classes: int


def yinyang_splits(
    variant: str = "yinyang", *, n_train: int = 5000, n_val: int = 2000, n_test: int = 4000
) -> DataSplits:
    """Splits drawn with the canonical Yin-Yang seeds: train 42, validation 41, test 40.

    Each split is its own stream, so the test points never overlap the training points.
    """
    n_classes = {"yinyang": 2, "yinyang3": 3}.get(variant)
    if n_classes is None:
        raise ValueError(f"unknown Yin-Yang variant {variant!r}; use 'yinyang' or 'yinyang3'.")
    parts = [Split(*make_yinyang(n, s, n_classes=n_classes))
             for n, s in ((n_train, 42), (n_val, 41), (n_test, 40))]
    return DataSplits(variant, *parts, n_features=parts[0].X.shape[1], n_classes=n_classes)


def normalize_images(images: np.ndarray, mean: float, std: float) -> torch.Tensor:
    """uint8 images [n, rows, cols] -> float32 [n, rows*cols]: ToTensor's /255, then Normalize."""
    x = torch.from_numpy(images.reshape(len(images), -1).astype(np.float32) / 255.0)
    return (x - mean) / std


def load_idx_arrays(root: str | None, *, name: str = "mnist", download: bool = True):
    """The four uint8 arrays (train images, train labels, test images, test labels) of MNIST
    (``name="mnist"``, fetched when missing, refused when the folder holds another set) or of
    any MNIST-format folder (``name="idx"``)."""
    from koopnet.io.idx import check_is_mnist, load_idx_dataset, load_mnist, mnist_root

    if name == "mnist":
        arrays = load_mnist(root, download=download)
        check_is_mnist(mnist_root(root))
        return arrays
    if root is None:
        raise ValueError("an MNIST-format data set needs a folder; pass idx:PATH.")
    return load_idx_dataset(root)


def raw_images(images: np.ndarray) -> torch.Tensor:
    """uint8 images [n, rows, cols] -> float32 [n, rows*cols] of raw pixel values 0..255.

    The paper extracted its MNIST trajectories from these (``train_set.data.float()``), not from
    the normalised inputs the networks were trained on (paper-method section 2.3).
    """
    return torch.from_numpy(images.reshape(len(images), -1).astype(np.float32))


def idx_splits(
    root: str | None, *, name: str = "mnist", n_val: int | None = 5000, seed: int = 0,
    download: bool = True,
) -> DataSplits:
    """MNIST (``root`` None or a data folder) or any MNIST-format folder, as normalised vectors.

    The validation split is carved from the training set with a seeded permutation; the test set
    is the file's own test split. MNIST's mean/std are used for every IDX set, as the paper did.
    ``n_val=None`` takes min(5000, a tenth of the training set), which suits small IDX sets.
    """
    from koopnet.io.idx import MNIST_MEAN, MNIST_STD

    train_x, train_y, test_x, test_y = load_idx_arrays(root, name=name, download=download)
    if n_val is None:
        n_val = min(5000, len(train_x) // 10)
        log.info("%s: validation split of %d of the %d training images (pass n_val / --n-val "
                 "to choose)", name, n_val, len(train_x))
    n_val = check_int(n_val, "n_val")
    if not 0 <= n_val < len(train_x):
        raise ValueError(f"n_val={n_val} must be in [0, {len(train_x)}) for '{name}' (its "
                         f"training set has {len(train_x)} images); pass a smaller --n-val.")
    order = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(seed))
    X = normalize_images(train_x, MNIST_MEAN, MNIST_STD)
    y = torch.from_numpy(train_y.astype(np.int64))
    train = Split(X[order[n_val:]], y[order[n_val:]])
    val = Split(X[order[:n_val]], y[order[:n_val]])
    test = Split(normalize_images(test_x, MNIST_MEAN, MNIST_STD),
                 torch.from_numpy(test_y.astype(np.int64)))
    n_classes = int(max(train_y.max(), test_y.max())) + 1
    return DataSplits(name, train, val, test, n_features=X.shape[1], n_classes=n_classes)
