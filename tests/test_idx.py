"""IDX reader and MNIST loader: round trips through an independent writer, every error message,
folder layouts, and the offline/download paths with urlopen patched (these tests never download)."""

from __future__ import annotations

import gzip
import hashlib
import io
import struct
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from koopnet.io import idx
from koopnet.io.idx import find_idx_files, load_idx_dataset, load_mnist, read_idx

_CODES = {"u1": 0x08, "i1": 0x09, "i2": 0x0B, "i4": 0x0C, "f4": 0x0D, "f8": 0x0E}
_NAMES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def idx_bytes(array: np.ndarray) -> bytes:
    """Encode ``array`` as IDX with struct (independent of the reader's numpy decoding)."""
    code = _CODES[array.dtype.str[1:]]
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def write_idx(path: Path, array: np.ndarray) -> Path:
    data = idx_bytes(np.asarray(array))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


def write_dataset(folder: Path, *, n_train=6, n_test=4, size=(3, 4), n_classes=10, gz=True):
    """Write a tiny MNIST-format set into ``folder``; return its four arrays."""
    rng = np.random.default_rng(0)
    arrays = {
        "train_images": rng.integers(0, 256, (n_train, *size), dtype=np.uint8),
        "train_labels": rng.integers(0, n_classes, n_train, dtype=np.uint8),
        "test_images": rng.integers(0, 256, (n_test, *size), dtype=np.uint8),
        "test_labels": rng.integers(0, n_classes, n_test, dtype=np.uint8),
    }
    for key, array in arrays.items():
        write_idx(folder / (_NAMES[key] + (".gz" if gz else "")), array)
    return arrays


@pytest.fixture
def no_network(monkeypatch):
    """Make every download attempt fail as it would offline; record the URLs tried."""
    tried = []

    def offline(url, *args, **kwargs):
        tried.append(url)
        raise urllib.error.URLError("offline in tests")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    return tried


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_uint8_round_trip(tmp_path, suffix):
    images = np.arange(60, dtype=np.uint8).reshape(5, 3, 4)
    result = read_idx(write_idx(tmp_path / f"images-idx3-ubyte{suffix}", images))
    np.testing.assert_array_equal(result, images)
    assert result.dtype == np.uint8 and result.flags.writeable


@pytest.mark.parametrize("dtype", ["i1", "i2", "i4", "f4", "f8"])
def test_multibyte_types_are_big_endian_and_come_back_native(tmp_path, dtype):
    values = np.array([[1, -2, 256], [70000, 2**20 + 3, -(2**14)]]).astype(dtype)
    path = write_idx(tmp_path / "values.idx", values)
    # the payload really is big-endian: the first value's bytes are struct's '>' encoding of it
    fmt = ">" + {"i1": "b", "i2": "h", "i4": "i", "f4": "f", "f8": "d"}[dtype]
    assert path.read_bytes()[12 : 12 + values.itemsize] == struct.pack(fmt, values[0, 0])
    result = read_idx(path)
    assert result.dtype == np.dtype(dtype) and result.dtype.isnative
    np.testing.assert_array_equal(result, values)


def test_gzip_is_detected_by_content_not_suffix(tmp_path):
    labels = np.array([7, 2, 1], dtype=np.uint8)
    path = tmp_path / "labels-idx1-ubyte"
    path.write_bytes(gzip.compress(idx_bytes(labels)))
    np.testing.assert_array_equal(read_idx(path), labels)


def test_truncated_file(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(idx_bytes(np.zeros((5, 3, 4), np.uint8))[:-10])
    with pytest.raises(
        ValueError,
        match=r"train-images-idx3-ubyte' is truncated: header promises "
        r"60 bytes of data, found 50\.",
    ):
        read_idx(path)


def test_extra_bytes(tmp_path):
    path = tmp_path / "x.idx"
    path.write_bytes(idx_bytes(np.zeros(4, np.uint8)) + b"\0")
    with pytest.raises(ValueError, match=r"is corrupt .*promises 4 bytes of data, found 5\."):
        read_idx(path)


def test_truncated_header(tmp_path):
    path = tmp_path / "x.idx"
    path.write_bytes(bytes([0, 0, 8, 3, 0, 0, 0, 5]))
    with pytest.raises(ValueError, match=r"truncated: its header promises 3 dimensions"):
        read_idx(path)


@pytest.mark.parametrize(
    ("content", "shown"),
    [
        (b"\x89PNG\r\n\x1a\n", "89 50 4e 47"),
        (bytes([0, 0, 0x0A, 1, 0, 0, 0, 0]), "00 00 0a 01"),  # 0x0A is not a type code
        (b"", "none"),
    ],
)
def test_wrong_magic(tmp_path, content, shown):
    path = tmp_path / "image.png"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=rf"\.png' is not an IDX file \(magic bytes {shown}\)"):
        read_idx(path)


def test_corrupt_gzip(tmp_path):
    path = tmp_path / "x.gz"
    path.write_bytes(gzip.compress(idx_bytes(np.zeros(100, np.uint8)))[:-8])
    with pytest.raises(ValueError, match=r"x\.gz' is a corrupt or truncated gzip file"):
        read_idx(path)


def test_load_round_trip_raw_and_gz(tmp_path):
    for gz, folder in ((False, tmp_path / "raw_files"), (True, tmp_path / "gz_files")):
        arrays = write_dataset(folder, gz=gz)
        loaded = load_idx_dataset(folder)
        for key, array in zip(_NAMES, loaded, strict=True):
            expected = arrays[key].astype(np.int64) if key.endswith("labels") else arrays[key]
            assert array.dtype == expected.dtype
            np.testing.assert_array_equal(array, expected)


def test_three_classes_and_7x5_images(tmp_path):
    arrays = write_dataset(tmp_path, n_train=9, n_test=3, size=(7, 5), n_classes=3)
    train_images, train_labels, test_images, test_labels = load_idx_dataset(tmp_path)
    assert train_images.shape == (9, 7, 5) and test_images.shape == (3, 7, 5)
    assert train_labels.dtype == np.int64 and set(train_labels) <= {0, 1, 2}
    np.testing.assert_array_equal(test_labels, arrays["test_labels"])


def test_torchvision_layout_is_found(tmp_path):
    write_dataset(tmp_path / "MNIST" / "raw")
    files = find_idx_files(tmp_path)
    assert list(files) == ["train_images", "train_labels", "test_images", "test_labels"]
    assert files["test_labels"] == tmp_path / "MNIST" / "raw" / "t10k-labels-idx1-ubyte.gz"


def test_plain_raw_layout_and_uncompressed_preferred(tmp_path):
    write_dataset(tmp_path / "raw", gz=True)
    write_dataset(tmp_path / "raw", gz=False)
    assert find_idx_files(tmp_path)["train_images"].name == "train-images-idx3-ubyte"


def test_a_complete_folder_beats_a_partial_one(tmp_path):
    write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((1, 2, 2), np.uint8))
    write_dataset(tmp_path / "MNIST" / "raw")
    assert find_idx_files(tmp_path)["train_images"].parent == tmp_path / "MNIST" / "raw"


def test_missing_files(tmp_path):
    write_dataset(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(
        FileNotFoundError,
        match=r"looked in .*MNIST.raw.*; missing "
        r"t10k-labels-idx1-ubyte\[\.gz\]\. Put all four files",
    ):
        find_idx_files(tmp_path)


def test_count_mismatch(tmp_path):
    write_dataset(tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros(5, np.uint8))
    with pytest.raises(ValueError, match=r"train images \(6\) and labels \(5\) disagree in count"):
        load_idx_dataset(tmp_path)


def test_image_size_mismatch(tmp_path):
    write_dataset(tmp_path)
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", np.zeros((4, 3, 5), np.uint8))
    with pytest.raises(ValueError, match=r"train images are 3x4 but test images are 3x5"):
        load_idx_dataset(tmp_path)


@pytest.mark.parametrize(
    ("key", "array", "message"),
    [
        ("train_images", np.zeros((6, 12), np.uint8), r"train images .* must be uint8 \[n, rows"),
        ("test_images", np.zeros((4, 3, 4), np.float32), r"got float32 with shape \(4, 3, 4\)"),
        ("test_labels", np.zeros((4, 1), np.uint8), r"test labels .* must be integers \[n\]"),
    ],
)
def test_wrong_array_kind(tmp_path, key, array, message):
    write_dataset(tmp_path)
    write_idx(tmp_path / (_NAMES[key] + ".gz"), array)
    with pytest.raises(ValueError, match=message):
        load_idx_dataset(tmp_path)


def test_offline_message_says_where_to_put_the_files(tmp_path, no_network):
    with pytest.raises(
        FileNotFoundError,
        match=r"MNIST not found under .* Put "
        r"train-images-idx3-ubyte\.gz, .*t10k-labels-idx1-ubyte\.gz into '.*"
        r"MNIST.raw/' or pass --data-dir / set KOOPNET_DATA; download failed: "
        r".*offline in tests",
    ):
        load_mnist(tmp_path)
    assert no_network == [mirror + "train-images-idx3-ubyte.gz" for mirror in idx._MIRRORS]
    assert not any((tmp_path / "MNIST" / "raw").iterdir())  # nothing half-written


def test_download_false_never_touches_the_network(tmp_path, no_network):
    with pytest.raises(FileNotFoundError, match=r"download=False, so nothing was fetched\."):
        load_mnist(tmp_path, download=False)
    assert no_network == [] and not (tmp_path / "MNIST").exists()


def test_data_dir_from_env_then_home(tmp_path, monkeypatch, no_network):
    write_dataset(tmp_path / "env")
    monkeypatch.setenv("KOOPNET_DATA", str(tmp_path / "env"))
    assert load_mnist(download=False)[0].shape == (6, 3, 4)
    monkeypatch.delenv("KOOPNET_DATA")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    with pytest.raises(FileNotFoundError, match=r"home.\.cache.koopnet'"):
        load_mnist(download=False)


def test_unwritable_target_is_reported(tmp_path, no_network):
    (tmp_path / "MNIST").write_text("a file where the folder should be")
    with pytest.raises(FileNotFoundError, match=r"download failed: '.*raw' is not writable"):
        load_mnist(tmp_path)
    assert no_network == []  # refused before downloading anything


@pytest.mark.parametrize("folder", ["MNIST/raw", "MNIST", "."])
def test_read_only_folder_is_reported(tmp_path, no_network, folder):
    read_only = tmp_path / "data" / folder
    read_only.mkdir(parents=True)
    read_only.chmod(0o555)  # root ignores this when writing, so koopnet must check it itself
    try:
        with pytest.raises(FileNotFoundError, match=r"not writable \('.*' is read-only\)"):
            load_mnist(tmp_path / "data")
    finally:
        read_only.chmod(0o755)
    assert no_network == [] and not any(read_only.iterdir())  # nothing fetched, nothing created


def fake_mirror(monkeypatch, files: dict[str, bytes]):
    """Serve ``files`` from every URL and make their MD5s the expected ones."""
    monkeypatch.setattr(idx, "_MD5", {n: hashlib.md5(d).hexdigest() for n, d in files.items()})
    monkeypatch.setattr(
        urllib.request, "urlopen", lambda url, timeout: io.BytesIO(files[url.rsplit("/", 1)[1]])
    )


def test_download_verifies_and_writes_atomically(tmp_path, monkeypatch):
    arrays = write_dataset(tmp_path / "source")
    files = {p.name: p.read_bytes() for p in (tmp_path / "source").iterdir()}
    fake_mirror(monkeypatch, files)
    loaded = load_mnist(tmp_path / "data")
    np.testing.assert_array_equal(loaded[0], arrays["train_images"])
    raw = tmp_path / "data" / "MNIST" / "raw"
    assert sorted(p.name for p in raw.iterdir()) == sorted(files)  # no temp files left


def test_download_rejects_a_bad_checksum(tmp_path, monkeypatch):
    write_dataset(tmp_path / "source")
    files = {p.name: p.read_bytes() for p in (tmp_path / "source").iterdir()}
    fake_mirror(monkeypatch, files)
    monkeypatch.setitem(idx._MD5, "train-images-idx3-ubyte.gz", "0" * 32)
    with pytest.raises(FileNotFoundError, match=r"download failed: .*MD5 \w{32}, expected 0+"):
        load_mnist(tmp_path / "data")
    assert not (tmp_path / "data" / "MNIST" / "raw" / "train-images-idx3-ubyte.gz").exists()


def test_real_mnist(mnist_dir):
    try:
        train_images, train_labels, test_images, test_labels = load_idx_dataset(mnist_dir)
    except FileNotFoundError as err:
        pytest.skip(f"real MNIST not under '{mnist_dir}': {err}")
    assert train_images.shape == (60000, 28, 28) and test_images.shape == (10000, 28, 28)
    assert train_images.dtype == np.uint8 and train_labels.dtype == np.int64
    assert test_labels[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
    counts = np.bincount(train_labels, minlength=10).tolist()
    assert counts == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert len(test_labels) == 10000
