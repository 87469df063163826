"""Artifacts round trip bit-exactly, refuse every kind of bad file, and survive interruption."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from koopnet.io import artifacts
from koopnet.io.artifacts import (
    FORMAT_VERSION,
    ArtifactError,
    atomic_write_text,
    file_sha256,
    load_artifact,
    prepare_output_dir,
    save_artifact,
    write_json,
)

SRC = Path(__file__).resolve().parents[1] / "src"


def _tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "operator": torch.randn(4, 4, generator=gen),
        "basis": torch.randn(6, 3, generator=gen, dtype=torch.float64),
        "widths": torch.tensor([2, 5, 5, 3]),
        "transposed": torch.randn(3, 5, generator=gen).T,  # non-contiguous on purpose
    }


@pytest.fixture
def saved(tmp_path):
    save_artifact(tmp_path, "dmd", _tensors(), {"rank": 3, "tikhonov": None}, kind="dmd")
    return tmp_path


def _temp_files(folder: Path) -> list[Path]:
    return sorted(folder.glob(".*.tmp"))


def test_round_trip_is_bit_identical(tmp_path):
    original = _tensors()
    parents = {"model": "ab" * 32}
    json_path = save_artifact(tmp_path, "dmd", original, {"rank": 3}, kind="dmd", parents=parents)
    assert json_path == tmp_path / "dmd.json"
    tensors, meta = load_artifact(tmp_path, "dmd", kind="dmd")
    assert set(tensors) == set(original)
    for key, value in original.items():
        assert tensors[key].dtype == value.dtype
        assert torch.equal(tensors[key], value)
    assert tensors["basis"].dtype == torch.float64 and tensors["widths"].dtype == torch.int64
    assert meta["config"] == {"rank": 3}
    assert meta["parents"] == parents
    assert meta["format_version"] == FORMAT_VERSION
    assert meta["tensors"]["operator"] == {"shape": [4, 4], "dtype": "float32"}
    assert meta["sha256"] == file_sha256(tmp_path / "dmd.safetensors")
    assert isinstance(meta["koopnet_version"], str) and meta["koopnet_version"]
    assert _temp_files(tmp_path) == []


def test_json_is_sorted_and_indented(saved, tmp_path):
    text = (saved / "dmd.json").read_text()
    meta = json.loads(text)
    assert text == json.dumps(meta, indent=2, sort_keys=True) + "\n"
    write_json(tmp_path / "r.json", {"b": 1, "a": [1, 2]})
    assert (tmp_path / "r.json").read_text() == '{\n  "a": [\n    1,\n    2\n  ],\n  "b": 1\n}\n'


def test_flipped_byte_is_detected(saved):
    path = saved / "dmd.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"does not match the hash recorded in .*re-create it"):
        load_artifact(saved, "dmd")


def test_truncated_file_is_detected(saved):
    path = saved / "dmd.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ArtifactError, match=r"dmd.safetensors' does not match the hash"):
        load_artifact(saved, "dmd")


def test_invalid_safetensors_with_matching_hash_is_detected(saved):
    (saved / "dmd.safetensors").write_bytes(b"not safetensors at all")
    meta = json.loads((saved / "dmd.json").read_text())
    meta["sha256"] = file_sha256(saved / "dmd.safetensors")
    write_json(saved / "dmd.json", meta)
    with pytest.raises(ArtifactError, match="is not a valid safetensors file"):
        load_artifact(saved, "dmd")


def _edit_meta(folder: Path, **changes) -> None:
    meta = json.loads((folder / "dmd.json").read_text())
    meta.update(changes)
    write_json(folder / "dmd.json", meta)


def test_too_new_version_is_refused(saved):
    _edit_meta(saved, format_version=FORMAT_VERSION + 2)
    match = rf"'.*dmd.json' has format_version 3; this koopnet reads versions <= {FORMAT_VERSION}"
    with pytest.raises(ArtifactError, match=match):
        load_artifact(saved, "dmd")


def test_wrong_kind_is_refused(saved):
    with pytest.raises(ArtifactError, match=r"dmd.json' holds a 'dmd' artifact, expected 'hybrid'"):
        load_artifact(saved, "dmd", kind="hybrid")


def test_missing_artifact(tmp_path, saved):
    with pytest.raises(ArtifactError, match=r"no artifact 'model' in .*expected model.json and"):
        load_artifact(saved, "model")
    (saved / "dmd.safetensors").unlink()
    with pytest.raises(ArtifactError, match="no artifact 'dmd'"):
        load_artifact(saved, "dmd")


def test_tampered_shape_is_detected(saved):
    meta = json.loads((saved / "dmd.json").read_text())
    meta["tensors"]["operator"]["shape"] = [2, 8]
    write_json(saved / "dmd.json", meta)
    with pytest.raises(ArtifactError, match=r"holds tensors .* but '.*dmd.json' records"):
        load_artifact(saved, "dmd")


def test_missing_tensor_is_detected(saved):
    meta = json.loads((saved / "dmd.json").read_text())
    meta["tensors"]["extra"] = {"shape": [1], "dtype": "float32"}
    write_json(saved / "dmd.json", meta)
    with pytest.raises(ArtifactError, match="re-create the artifact"):
        load_artifact(saved, "dmd")


def test_not_json_is_refused(saved):
    (saved / "dmd.json").write_text("{ this is not json")
    with pytest.raises(ArtifactError, match=r"dmd.json' is not valid JSON"):
        load_artifact(saved, "dmd")
    (saved / "dmd.json").write_text("[1, 2]")
    with pytest.raises(ArtifactError, match=r"lacks the keys .*not a koopnet artifact"):
        load_artifact(saved, "dmd")


def test_bad_inputs_to_save(tmp_path):
    with pytest.raises(TypeError, match=r"dict of str -> torch.Tensor"):
        save_artifact(tmp_path, "x", {"a": [1.0]}, {}, kind="x")
    with pytest.raises(TypeError, match="not JSON-serialisable"):
        save_artifact(tmp_path, "x", {}, {"f": object()}, kind="x")
    with pytest.raises(ValueError, match="plain file name"):
        save_artifact(tmp_path, "../x", {}, {}, kind="x")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("fail_on_call", [1, 2])
def test_interrupted_save_keeps_previous_artifact(saved, monkeypatch, interrupt_on_replace,
                                                  fail_on_call):
    """Ctrl-C on the tensor rename (1) leaves the old pair; on the JSON rename (2) the new tensor
    file sits beside the old JSON, which the hash check refuses instead of loading mixed data."""
    before = (saved / "dmd.json").read_bytes(), (saved / "dmd.safetensors").read_bytes()
    interrupt_on_replace(fail_on_call)
    with pytest.raises(KeyboardInterrupt):
        save_artifact(saved, "dmd", {"operator": torch.ones(100)}, {"rank": 9}, kind="dmd")
    monkeypatch.undo()
    assert _temp_files(saved) == []
    assert (saved / "dmd.json").read_bytes() == before[0]
    if fail_on_call == 1:
        assert (saved / "dmd.safetensors").read_bytes() == before[1]
        tensors, meta = load_artifact(saved, "dmd")
        assert meta["config"]["rank"] == 3
        assert all(torch.equal(tensors[k], v) for k, v in _tensors().items())
    else:
        with pytest.raises(ArtifactError, match="does not match the hash"):
            load_artifact(saved, "dmd")


def test_interrupted_text_write_keeps_old_file(tmp_path, monkeypatch):
    target = tmp_path / "report.md"
    atomic_write_text(target, "old\n")
    monkeypatch.setattr(artifacts.os, "fsync", lambda fd: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        atomic_write_text(target, "new\n")
    assert target.read_text() == "old\n"
    assert _temp_files(tmp_path) == []


_CHILD = textwrap.dedent(
    """
    import sys, torch
    from koopnet.io.artifacts import save_artifact
    folder = sys.argv[1]
    save_artifact(folder, "big", {"w": torch.zeros(3)}, {"i": 0}, kind="test")
    print("ready", flush=True)
    i = 0
    while True:
        i += 1
        save_artifact(folder, "big", {"w": torch.full((12_500_000,), float(i))}, {"i": i},
                      kind="test")
    """
)


def test_sigkill_mid_save_never_yields_corrupt_data(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(tmp_path)], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert child.stdout.readline().strip() == "ready"
        time.sleep(0.3)
        assert child.poll() is None, "the child stopped before it could be killed"
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=10)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        child.stdout.close()
    assert child.returncode == -signal.SIGKILL
    # SIGKILL cannot be cleaned up after, so stray ".big.*.tmp" files may remain; the pair may
    # not mix: either it loads and the tensor agrees with its own JSON, or the hash refuses it
    # (the kill fell in the microseconds between the two renames).
    try:
        tensors, meta = load_artifact(tmp_path, "big", kind="test")
    except ArtifactError as err:
        assert "does not match the hash" in str(err)
        return
    size = 3 if meta["config"]["i"] == 0 else 12_500_000
    assert torch.equal(tensors["w"], torch.full((size,), float(meta["config"]["i"])))


def test_prepare_output_dir(tmp_path):
    fresh = prepare_output_dir(tmp_path / "a" / "b")
    assert fresh.is_dir()
    assert prepare_output_dir(fresh) == fresh  # empty existing folder is fine
    (fresh / "results.json").write_text("{}")
    with pytest.raises(FileExistsError, match=r"output folder '.*b' already exists and is not "):
        prepare_output_dir(fresh)
    with pytest.raises(FileExistsError, match="pass --force to write into it"):
        prepare_output_dir(str(fresh))
    assert prepare_output_dir(fresh, force=True) == fresh
    assert (fresh / "results.json").read_text() == "{}"
    with pytest.raises(FileExistsError, match="is a file"):
        prepare_output_dir(fresh / "results.json", force=True)


_shapes = st.lists(st.integers(0, 4), min_size=0, max_size=3)


@settings(max_examples=25, deadline=None)
@given(
    st.dictionaries(st.text("abcdefgh_.", min_size=1, max_size=8), _shapes, max_size=4),
    st.integers(0, 2**32 - 1),
)
def test_any_float32_dict_round_trips(tmp_path_factory, shapes, seed):
    folder = tmp_path_factory.mktemp("prop")
    gen = torch.Generator().manual_seed(seed)
    original = {k: torch.randn(s, generator=gen) for k, s in shapes.items()}
    save_artifact(folder, "p", original, {"seed": seed}, kind="prop")
    tensors, meta = load_artifact(folder, "p", kind="prop")
    assert tensors.keys() == original.keys()
    assert all(
        torch.equal(tensors[k], v) and tensors[k].dtype == torch.float32
        for k, v in original.items()
    )
    assert meta["config"] == {"seed": seed}
