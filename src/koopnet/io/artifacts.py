"""Safe, atomic artifact storage: tensors in safetensors, metadata in versioned JSON.

An artifact ``name`` in a folder is the pair ``name.safetensors`` (tensors only: no pickle, so
loading a file can never run code) and ``name.json`` (format version, kind, configuration,
provenance, the SHA-256 of the tensor file in ``sha256`` and, from format version 2, the
SHA-256 of the JSON's own other fields in ``metadata_sha256``, so an edited ``activation`` or
``layer`` is refused instead of silently loading with other outputs).

Why the pair can never mix, even under SIGKILL: two files cannot be renamed in one step, so the
JSON is the commit point. :func:`save_artifact` first writes the new tensors, fsynced, to
``.name.safetensors.<sha256>.pending`` (a name the new JSON's hash determines), then renames the
new JSON into place, then renames the pending file onto ``name.safetensors``. Before the JSON
rename the old JSON describes the old tensor file; after it, :func:`load_artifact` finds the
new tensors either in ``name.safetensors`` or, if the process died before the last rename, in
the pending file the JSON names (checked against the same hash). A later save of the same
artifact removes such leftovers. Single files (results, reports) go through a fsynced
temporary and ``os.replace``; whole run folders through :func:`staged_folder`. New files get
``0o666 & ~umask`` like ``open()`` would give them, and staged folders ``0o777 & ~umask``.

>>> import tempfile
>>> with tempfile.TemporaryDirectory() as folder:
...     _ = save_artifact(folder, "dmd", {"operator": torch.eye(2)}, {"rank": 2}, kind="dmd")
...     tensors, meta = load_artifact(folder, "dmd", kind="dmd")
>>> tensors["operator"], meta["config"]
(tensor([[1., 0.],
        [0., 1.]]), {'rank': 2})
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import re
import tempfile
from pathlib import Path

import safetensors.torch
import torch

from koopnet.io.folders import (  # re-exported: callers import them from here
    _fsync_dir,
    _umask,
    check_output_dir,
    prepare_output_dir,
    staged_folder,
)

__all__ = ["ArtifactError", "atomic_write_bytes", "atomic_write_text", "check_metadata",
           "check_output_dir", "file_sha256", "load_artifact", "prepare_output_dir",
           "save_artifact", "staged_folder", "write_json"]

FORMAT_VERSION = 2
_HASH_KEYS = ("sha256", "metadata_sha256")
_REQUIRED_KEYS = ("format_version", "kind", "sha256", "tensors")


class ArtifactError(ValueError):
    """Raised for a file that is not what it claims: corrupt, truncated, too new or altered."""


def _write_temp(path: Path, data: bytes) -> Path:
    """Write ``data`` to a fsynced temporary file next to ``path`` (same filesystem, so the
    later ``os.replace`` is atomic) and return its path; on any failure remove it."""
    with tempfile.NamedTemporaryFile(
        dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False
    ) as handle:
        tmp = Path(handle.name)
        try:
            handle.write(data)
            handle.flush()
            os.fchmod(handle.fileno(), 0o666 & ~_umask())  # as open() would: the umask decides
            os.fsync(handle.fileno())
        except BaseException:  # KeyboardInterrupt included: never leave a half-written temp
            handle.close()
            tmp.unlink(missing_ok=True)
            raise
    return tmp


def _replace_all(pairs: list[tuple[Path, bytes]]) -> None:
    """Stage every file first, then rename them back to back: the window in which a crash can
    leave a mixed pair shrinks to the gap between two ``rename`` calls."""
    staged: list[tuple[Path, Path]] = []
    try:
        for path, data in pairs:
            staged.append((_write_temp(path, data), path))
        for tmp, path in staged:
            os.replace(tmp, path)
    finally:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)  # no-op for the ones already renamed
    _fsync_dir(pairs[0][0].parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically: readers see the old or new file, never half."""
    _replace_all([(Path(path), bytes(data))])


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Atomic UTF-8 text write; see :func:`atomic_write_bytes`."""
    atomic_write_bytes(path, text.encode("utf-8"))


def _json_bytes(obj: object) -> bytes:
    # sorted keys, indented, trailing newline: the same object always gives the same text
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode("utf-8")


def write_json(path: str | os.PathLike, obj: object) -> None:
    """Write ``obj`` as sorted, indented JSON atomically, so result files diff well."""
    atomic_write_bytes(path, _json_bytes(obj))


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks so large files need little memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _koopnet_version() -> str:
    try:  # imported lazily: koopnet/__init__ may import this module
        from koopnet import __version__

        return str(__version__)
    except ImportError:
        pass
    try:
        return importlib.metadata.version("koopnet")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _describe(tensors: dict[str, torch.Tensor]) -> dict[str, dict]:
    """Shape and dtype of each tensor, as recorded in the JSON and checked on load."""
    return {
        key: {"shape": list(value.shape), "dtype": str(value.dtype).removeprefix("torch.")}
        for key, value in tensors.items()
    }


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not name or Path(name).name != name or name in (".", ".."):
        raise ValueError(f"artifact name {name!r} must be a plain file name without folders.")


def save_artifact(
    directory: str | os.PathLike,
    name: str,
    tensors: dict[str, torch.Tensor],
    config: dict,
    *,
    kind: str,
    parents: dict[str, str] | None = None,
) -> Path:
    """Save ``tensors`` and ``config`` as ``<directory>/<name>.safetensors`` + ``<name>.json``.

    The JSON is the commit point (see the module docstring): after a crash or kill at any
    moment :func:`load_artifact` returns the whole old pair or the whole new one.

    Parameters
    ----------
    directory : str or PathLike
        Existing folder (see :func:`prepare_output_dir`).
    name : str
        File stem of the pair.
    tensors : dict of str to Tensor
        Stored as contiguous CPU copies; dtypes are kept.
    config : dict
        JSON-serialisable settings that produced the tensors.
    kind : str
        What the artifact is ("dmd", "hybrid", ...); :func:`load_artifact` can check it.
    parents : dict of str to str, optional
        Provenance, e.g. ``{"model": "<sha256 of model.safetensors>"}``.

    Returns
    -------
    Path
        The JSON file.
    """
    _check_name(name)
    if not isinstance(tensors, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in tensors.items()
    ):
        raise TypeError("tensors must be a dict of str -> torch.Tensor; convert arrays first.")
    cpu = {
        key: value.detach().to("cpu", memory_format=torch.contiguous_format, copy=True)
        for key, value in tensors.items()
    }  # copies: safetensors refuses tensors that share memory
    blob = safetensors.torch.save(cpu)
    meta = {
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "koopnet_version": _koopnet_version(),
        "config": config,
        "tensors": _describe(cpu),
        "sha256": hashlib.sha256(blob).hexdigest(),
        "parents": dict(parents or {}),
    }
    try:
        meta = json.loads(_json_bytes(meta))  # hash what a reader will parse (keys become str)
        meta["metadata_sha256"] = _metadata_sha256(meta)
        meta_bytes = _json_bytes(meta)
    except (TypeError, ValueError) as err:
        raise TypeError(
            f"config or parents of artifact '{name}' is not JSON-serialisable ({err}); "
            "use dicts, lists, str, int, float, bool and None only."
        ) from err
    folder = Path(directory)
    json_path, st_path = folder / f"{name}.json", folder / f"{name}.safetensors"
    pending = _pending_path(folder, name, meta["sha256"])
    _replace_all([(pending, blob)])  # complete and durable before the JSON points to it
    try:
        _replace_all([(json_path, meta_bytes)])  # the commit point
    except BaseException:
        pending.unlink(missing_ok=True)  # the old JSON still stands; the new tensors are unused
        raise
    os.replace(pending, st_path)  # a kill before this line leaves the pending file the JSON names
    _fsync_dir(folder)
    for stale in folder.iterdir():  # pending files of earlier, killed saves of this artifact
        if _pending_name(name).fullmatch(stale.name):
            stale.unlink(missing_ok=True)
    return json_path


def _pending_path(folder: Path, name: str, sha256: str) -> Path:
    return folder / f".{name}.safetensors.{sha256}.pending"


def _pending_name(name: str) -> re.Pattern:
    return re.compile(rf"\.{re.escape(name)}\.safetensors\.[0-9a-f]{{64}}\.pending")


def _metadata_sha256(meta: dict) -> str:
    """SHA-256 of the canonical JSON (sorted keys, no spaces) of every field but the hashes."""
    body = {key: value for key, value in meta.items() if key not in _HASH_KEYS}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def load_artifact(
    directory: str | os.PathLike, name: str, *, kind: str | None = None
) -> tuple[dict[str, torch.Tensor], dict]:
    """Load an artifact written by :func:`save_artifact` and verify it before trusting it.

    Checks, in order: the JSON parses and has the required keys, its ``format_version`` is one
    this koopnet reads, its other fields hash to ``metadata_sha256`` (format version 2; version
    1 files have no such hash and are read as before), ``kind`` matches (when given), the tensor
    file's SHA-256 equals the recorded one, and the tensor names, shapes and dtypes equal those
    recorded.

    Returns
    -------
    tensors : dict of str to Tensor
        On CPU, with the dtypes they were saved with.
    metadata : dict
        The full JSON: format_version, kind, koopnet_version, config, tensors, parents, sha256
        (of the tensor file) and metadata_sha256.

    Raises
    ------
    ArtifactError
        For any missing, corrupt, altered or too-new file.
    """
    _check_name(name)
    folder = Path(directory)
    json_path, st_path = folder / f"{name}.json", folder / f"{name}.safetensors"
    if not json_path.is_file():
        raise ArtifactError(
            f"no artifact '{name}' in '{folder}': expected {name}.json and {name}.safetensors."
        )
    try:
        meta = json.loads(json_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ArtifactError(f"'{json_path}' is not valid JSON ({err}); re-create it.") from err
    missing = [key for key in _REQUIRED_KEYS if not isinstance(meta, dict) or key not in meta]
    if missing:
        raise ArtifactError(
            f"'{json_path}' lacks the keys {missing}; it is not a koopnet artifact. Re-create it."
        )
    version = meta["format_version"]
    if isinstance(version, bool) or not isinstance(version, int) or version > FORMAT_VERSION:
        raise ArtifactError(
            f"'{json_path}' has format_version {version}; this koopnet reads versions "
            f"<= {FORMAT_VERSION}. Upgrade koopnet or re-create the artifact."
        )
    check_metadata(meta, json_path)
    if kind is not None and meta["kind"] != kind:
        raise ArtifactError(f"'{json_path}' holds a '{meta['kind']}' artifact, expected '{kind}'.")
    blob = _tensor_bytes(st_path, _pending_path(folder, name, str(meta["sha256"])),
                         meta["sha256"])
    if blob is None:
        raise ArtifactError(
            f"no artifact '{name}' in '{folder}': expected {name}.json and {name}.safetensors."
        )
    if hashlib.sha256(blob).hexdigest() != meta["sha256"]:
        raise ArtifactError(
            f"'{st_path}' does not match the hash recorded in '{json_path}' "
            "(file changed or truncated); re-create it."
        )
    try:
        tensors = safetensors.torch.load(blob)
    except Exception as err:  # SafetensorError and friends: the file is not valid safetensors
        raise ArtifactError(f"'{st_path}' is not a valid safetensors file ({err}).") from err
    found = _describe(tensors)
    if found != meta["tensors"]:
        raise ArtifactError(
            f"'{st_path}' holds tensors {found}, but '{json_path}' records {meta['tensors']}; "
            "re-create the artifact."
        )
    return tensors, meta


def check_metadata(meta: dict, json_path: str | os.PathLike) -> None:
    """Refuse an artifact JSON whose fields no longer hash to its ``metadata_sha256`` (required
    from format version 2; version 1 files predate it). For readers that parse a JSON
    themselves, such as a user's ``--config model.json``."""
    version = meta.get("format_version")
    if ((isinstance(version, int) and version >= 2) or "metadata_sha256" in meta) and (
            meta.get("metadata_sha256") != _metadata_sha256(meta)):
        raise ArtifactError(f"'{json_path}' was edited after it was written (metadata hash "
                            "mismatch); re-create it.")


def _tensor_bytes(st_path: Path, pending: Path, sha256: str) -> bytes | None:
    """The tensor file the JSON describes: ``name.safetensors``, or the pending file a save that
    was killed after its JSON rename left (only if it holds exactly the recorded bytes)."""
    blob = st_path.read_bytes() if st_path.is_file() else None
    if (blob is None or hashlib.sha256(blob).hexdigest() != sha256) and pending.is_file():
        candidate = pending.read_bytes()
        if hashlib.sha256(candidate).hexdigest() == sha256:
            return candidate
    return blob
