"""Read MNIST-format (IDX) files with numpy, and fetch MNIST itself when it is missing.

No torchvision: it is a heavy dependency for four small files, and a truncated or mixed-up file
should fail here with a message naming it. Any set in the MNIST layout (KMNIST, Fashion-MNIST, any
class count or image size) loads through :func:`load_idx_dataset`. The IDX format is described in
Y. LeCun, C. Cortes, C. J. C. Burges, "The MNIST database of handwritten digits".
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import math
import os
import tempfile
import urllib.request
import zlib
from pathlib import Path

import numpy as np

#: Mean and standard deviation of MNIST training pixels scaled to [0, 1] (the usual normalisation).
MNIST_MEAN = 0.1307
MNIST_STD = 0.3081

# IDX type code (third magic byte) -> big-endian numpy dtype.
_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_STEMS = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
_MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)
# MD5 of the upstream .gz files (the values torchvision checks).
_MD5 = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
# MD5 of the decompressed files: a folder may hold them gzipped or not, so the content is checked.
_RAW_MD5 = {
    "train_images": "6bbc9ace898e44ae57da46a324031adb",
    "train_labels": "a25bea736e30d166cdddb491f175f624",
    "test_images": "2646ac647ad5339dbf082846283269ea",
    "test_labels": "27ae3e4e09519cfbb04c329615203637",
}
_TIMEOUT_S = 20.0


def _raw_bytes(path: Path) -> bytes:
    """The file's bytes, gunzipped when it is a gzip file."""
    data = path.read_bytes()
    if data[:2] != b"\x1f\x8b":
        return data
    try:
        return gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as err:
        raise ValueError(
            f"'{path}' is a corrupt or truncated gzip file ({err}); fetch a fresh copy."
        ) from err


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one IDX file, gzipped (recognised by content, not suffix) or raw, checking its length.

    Multi-byte types are stored big-endian and come back in native order, as a writable copy.

    Shape: header dims (d1, ..., dk) -> array [d1, ..., dk] of the header's type.

    >>> import pathlib, tempfile
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "labels-idx1-ubyte"
    >>> _ = path.write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 3, 7, 2, 1]))
    >>> read_idx(path)
    array([7, 2, 1], dtype=uint8)
    """
    path = Path(path)
    data = _raw_bytes(path)
    magic = data[:4]
    if len(magic) < 4 or magic[:2] != b"\0\0" or magic[2] not in _DTYPES:
        raise ValueError(
            f"'{path}' is not an IDX file (magic bytes {magic.hex(' ') or 'none'}); an IDX file "
            "starts with 00 00, a type code (08 09 0b 0c 0d 0e) and the number of dimensions."
        )
    ndim, header = magic[3], 4 + 4 * magic[3]
    if len(data) < header:
        raise ValueError(
            f"'{path}' is truncated: its header promises {ndim} dimensions ({4 * ndim} bytes), "
            f"found {len(data) - 4}."
        )
    dims = tuple(int(d) for d in np.frombuffer(data, ">u4", count=ndim, offset=4))
    dtype = np.dtype(_DTYPES[magic[2]])
    expected, found = math.prod(dims) * dtype.itemsize, len(data) - header
    if found != expected:
        problem = "is truncated" if found < expected else "is corrupt (longer than its header says)"
        raise ValueError(
            f"'{path}' {problem}: header promises {expected} bytes of data, found {found}."
        )
    array = np.frombuffer(data, dtype, count=math.prod(dims), offset=header)
    return array.astype(dtype.newbyteorder("=")).reshape(dims)  # [d1, ..., dk]


def find_idx_files(root: str | os.PathLike) -> dict[str, Path]:
    """Locate the four MNIST-format files under ``root``, gzipped or not.

    Searches ``root``, then ``root/MNIST/raw`` (torchvision's layout), then ``root/raw``, and
    takes the first folder holding all four, so train and test never come from different sets.
    When both ``name`` and ``name.gz`` exist the uncompressed one wins (it reads faster).

    Returns a dict with keys ``train_images``, ``train_labels``, ``test_images``, ``test_labels``.
    """
    root = Path(root).expanduser()
    folders = [root, root / "MNIST" / "raw", root / "raw"]
    best: dict[str, Path] = {}
    for folder in folders:
        found = {  # the later name wins, so an uncompressed file beats its .gz
            key: folder / name
            for key, stem in _STEMS.items()
            for name in (stem + ".gz", stem)
            if (folder / name).is_file()
        }
        if len(found) == len(_STEMS):
            return found
        best = found if len(found) > len(best) else best
    missing = ", ".join(f"{stem}[.gz]" for key, stem in _STEMS.items() if key not in best)
    looked = ", ".join(f"'{folder}'" for folder in folders)
    raise FileNotFoundError(
        f"MNIST-format files not found under '{root}' (looked in {looked}); missing {missing}. "
        "Put all four files, gzipped or not, into one of those folders."
    )


def load_idx_dataset(
    root: str | os.PathLike,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Load an MNIST-format data set from ``root`` and check the splits agree with each other.

    Checking counts and image sizes here turns a mixed-up download into a clear error instead of
    a silent misalignment of images and labels.

    Shape: -> train_images [n_train, rows, cols] uint8, train_labels [n_train] int64,
    test_images [n_test, rows, cols] uint8, test_labels [n_test] int64.
    """
    files = find_idx_files(root)
    arrays = {key: read_idx(path) for key, path in files.items()}
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        image_file, label_file = files[f"{split}_images"], files[f"{split}_labels"]
        if images.ndim != 3 or images.dtype != np.uint8:
            raise ValueError(
                f"{split} images '{image_file}' must be uint8 [n, rows, cols]; got {images.dtype} "
                f"with shape {images.shape}. Check that the file holds images."
            )
        if labels.ndim != 1 or labels.dtype.kind not in "iu":
            raise ValueError(
                f"{split} labels '{label_file}' must be integers [n]; got {labels.dtype} with "
                f"shape {labels.shape}. Check that the file holds labels."
            )
        if len(images) != len(labels):
            raise ValueError(
                f"{split} images ({len(images)}) and labels ({len(labels)}) disagree in count; "
                f"'{image_file}' and '{label_file}' must come from the same data set."
            )
        arrays[f"{split}_labels"] = labels.astype(np.int64)
    train_size, test_size = arrays["train_images"].shape[1:], arrays["test_images"].shape[1:]
    if train_size != test_size:
        raise ValueError(
            f"train images are {train_size[0]}x{train_size[1]} but test images are "
            f"{test_size[0]}x{test_size[1]}; '{root}' mixes two data sets."
        )
    train_images, train_labels, test_images, test_labels = (arrays[key] for key in _STEMS)
    return train_images, train_labels, test_images, test_labels


def mnist_root(data_dir: str | os.PathLike | None = None) -> Path:
    """MNIST's data folder: ``data_dir``, else ``$KOOPNET_DATA``, else ``~/.cache/koopnet``."""
    if data_dir is None:
        data_dir = os.environ.get("KOOPNET_DATA") or Path.home() / ".cache" / "koopnet"
    return Path(data_dir).expanduser()


def check_is_mnist(root: str | os.PathLike) -> None:
    """Refuse an MNIST-format folder that is not MNIST itself (KMNIST, Fashion-MNIST, a subset).

    Results are labelled with the data set's name, so a run called "mnist" must have used
    MNIST: each file's decompressed content is compared with MNIST's known MD5.
    """
    files = find_idx_files(root)
    for key, path in files.items():
        data = _raw_bytes(path)
        digest = hashlib.md5(data, usedforsecurity=False).hexdigest()
        if digest != _RAW_MD5[key]:
            folder = path.parent
            raise ValueError(
                f"'{path}' is not MNIST's {_STEMS[key]} (MD5 {digest}, MNIST's is "
                f"{_RAW_MD5[key]}): '{folder}' holds another MNIST-format set. To use it, pass "
                f"idx:{folder} instead of mnist."
            )


def load_mnist(
    data_dir: str | os.PathLike | None = None, *, download: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Load MNIST from ``data_dir``, downloading it into ``data_dir/MNIST/raw`` if it is missing.

    ``data_dir`` defaults to ``$KOOPNET_DATA``, else ``~/.cache/koopnet``. Downloads are checked
    against the upstream MD5s and written atomically, so an interrupted download never leaves a
    half-written file that a later run would trust.

    Shape: as :func:`load_idx_dataset`; for MNIST n_train=60000, n_test=10000, rows=cols=28.
    """
    root = mnist_root(data_dir)
    try:
        find_idx_files(root)
    except FileNotFoundError as missing:
        raw_dir = root / "MNIST" / "raw"
        reason = "download=False, so nothing was fetched"
        if download:
            try:
                _download_mnist(raw_dir)
            except (OSError, http.client.HTTPException) as failure:
                reason = f"download failed: {failure}"
            else:
                return load_idx_dataset(root)
        looked = ", ".join(f"'{folder}'" for folder in (root, raw_dir, root / "raw"))
        raise FileNotFoundError(
            f"MNIST not found under '{root}' (looked in {looked}). Put {', '.join(_MD5)} "
            f"into '{raw_dir}/' or pass --data-dir / set KOOPNET_DATA; {reason}."
        ) from missing
    return load_idx_dataset(root)


def _download_mnist(raw_dir: Path) -> None:
    """Fetch the missing MNIST ``.gz`` files into ``raw_dir``, trying each mirror in turn."""
    # Fail before downloading if nothing could be saved; check mode bits too, as root ignores them.
    existing = next(folder for folder in (raw_dir, *raw_dir.parents) if folder.exists())
    if existing.is_dir() and not (existing.stat().st_mode & 0o222 and os.access(existing, os.W_OK)):
        raise OSError(f"'{raw_dir}' is not writable ('{existing}' is read-only)")
    try:
        raw_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=raw_dir):
            pass
    except OSError as err:
        raise OSError(f"'{raw_dir}' is not writable ({err.strerror or err})") from err
    for name, md5 in _MD5.items():
        if (raw_dir / name).is_file() or (raw_dir / name.removesuffix(".gz")).is_file():
            continue
        problems = []
        for mirror in _MIRRORS:
            try:
                with urllib.request.urlopen(mirror + name, timeout=_TIMEOUT_S) as response:
                    data = response.read()
            except (OSError, ValueError, http.client.HTTPException) as err:
                problems.append(f"{mirror}{name}: {err}")
                continue
            digest = hashlib.md5(data, usedforsecurity=False).hexdigest()
            if digest == md5:
                _write_atomic(raw_dir / name, data)
                break
            problems.append(f"{mirror}{name}: MD5 {digest}, expected {md5}")
        else:
            raise OSError("; ".join(problems))


def _write_atomic(target: Path, data: bytes) -> None:
    """Write ``data`` to a temp file beside ``target``, then rename it into place."""
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
