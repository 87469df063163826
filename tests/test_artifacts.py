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

from koopnet.io import artifacts, folders
from koopnet.io.artifacts import (
    FORMAT_VERSION,
    ArtifactError,
    atomic_write_text,
    file_sha256,
    load_artifact,
    prepare_output_dir,
    save_artifact,
    staged_folder,
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
    return sorted([*folder.glob(".*.tmp"), *folder.glob(".*.pending")])


def _write_meta(folder: Path, meta: dict, name: str = "dmd") -> None:
    """Write an edited JSON with a matching metadata hash, to reach the checks behind it."""
    meta["metadata_sha256"] = artifacts._metadata_sha256(meta)
    write_json(folder / f"{name}.json", meta)


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
    assert meta["metadata_sha256"] == artifacts._metadata_sha256(meta)
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
    match = (rf"'.*dmd.json' has format_version {FORMAT_VERSION + 2}; this koopnet reads "
             rf"versions <= {FORMAT_VERSION}")
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
    with pytest.raises(ArtifactError, match=r"dmd.json' was edited after it was written"):
        load_artifact(saved, "dmd")
    _write_meta(saved, meta)
    with pytest.raises(ArtifactError, match=r"holds tensors .* but '.*dmd.json' records"):
        load_artifact(saved, "dmd")


def test_missing_tensor_is_detected(saved):
    meta = json.loads((saved / "dmd.json").read_text())
    meta["tensors"]["extra"] = {"shape": [1], "dtype": "float32"}
    _write_meta(saved, meta)
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


@pytest.mark.parametrize("fail_on_call", [1, 2, 3])
def test_interrupted_save_keeps_previous_artifact(saved, monkeypatch, interrupt_on_replace,
                                                  fail_on_call):
    """save_artifact renames three times: the tensors' temporary onto their pending name (1),
    the JSON into place (2, the commit point), the pending file onto name.safetensors (3).
    Ctrl-C before the commit leaves the old pair; after it, the new pair loads (from the
    pending file the new JSON names). Never a mix."""
    before = (saved / "dmd.json").read_bytes(), (saved / "dmd.safetensors").read_bytes()
    interrupt_on_replace(fail_on_call)
    with pytest.raises(KeyboardInterrupt):
        save_artifact(saved, "dmd", {"operator": torch.ones(100)}, {"rank": 9}, kind="dmd")
    monkeypatch.undo()
    assert (saved / "dmd.safetensors").read_bytes() == before[1]
    tensors, meta = load_artifact(saved, "dmd")
    if fail_on_call < 3:
        assert _temp_files(saved) == []
        assert (saved / "dmd.json").read_bytes() == before[0]
        assert meta["config"]["rank"] == 3
        assert all(torch.equal(tensors[k], v) for k, v in _tensors().items())
    else:
        assert meta["config"]["rank"] == 9 and torch.equal(tensors["operator"], torch.ones(100))
        assert [p.name for p in _temp_files(saved)] == [f".dmd.safetensors.{meta['sha256']}"
                                                        ".pending"]
        save_artifact(saved, "dmd", _tensors(), {"rank": 3}, kind="dmd")  # cleans it up
        assert _temp_files(saved) == []
        assert load_artifact(saved, "dmd")[1]["config"]["rank"] == 3


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


@pytest.mark.parametrize("delay", [0.05, 0.2, 0.45])
def test_sigkill_mid_save_never_yields_a_mixed_pair(tmp_path, delay):
    """A child saves ever new versions of one artifact until it is killed; the folder must then
    load, and the tensors must be the ones its JSON describes (old pair or new pair)."""
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(tmp_path)], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert child.stdout.readline().strip() == "ready"
        time.sleep(delay)
        assert child.poll() is None, "the child stopped before it could be killed"
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=10)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        child.stdout.close()
    assert child.returncode == -signal.SIGKILL
    # SIGKILL cannot be cleaned up after, so stray ".big.*.tmp" / ".pending" files may remain,
    # but the artifact must load: a hash mismatch here would be a mixed pair.
    tensors, meta = load_artifact(tmp_path, "big", kind="test")
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


# --------------------------------------------------------------------------------------------
# The metadata is covered by a hash too


@pytest.fixture(scope="module")
def scaled_and_hybrid(tmp_path_factory):
    """A saved scaled model and hybrid (a few epochs: only their files matter here)."""
    from koopnet.io.datasets import make_yinyang
    from koopnet.io.serialize import save_hybrid, save_scaled
    from koopnet.linearization import fit_hybrid
    from koopnet.models import TrainConfig, build_mlp
    from koopnet.scaling import scale_layer

    torch.manual_seed(0)
    X, y = make_yinyang(200, seed=0)
    model = build_mlp([2, 8, 6, 4, 2], "tanh")
    scaled, _ = scale_layer(model, 2, X, y, n_inserted=3, init="he",
                            config=TrainConfig(epochs=2, batch_size=200, lr=1e-2))
    hybrid = fit_hybrid(scaled, X, n_delays=1)
    folder = tmp_path_factory.mktemp("saved")
    save_scaled(scaled, folder)
    save_hybrid(hybrid, folder)
    return folder


def _find_activation(node):
    """The first {"type": "activation", "name": ...} entry anywhere in a JSON tree."""
    if isinstance(node, dict):
        if node.get("type") == "activation":
            return node
        node = list(node.values())
    if isinstance(node, list):
        for item in node:
            found = _find_activation(item)
            if found is not None:
                return found
    return None


@pytest.mark.parametrize(("name", "field"), [("scaled", "activation"), ("scaled", "layer"),
                                             ("hybrid", "activation"), ("hybrid", "layer"),
                                             ("hybrid", "linear_steps")])
def test_edited_metadata_is_refused(scaled_and_hybrid, tmp_path, name, field):
    from koopnet.io.serialize import load_hybrid, load_scaled

    for suffix in (".json", ".safetensors"):
        (tmp_path / f"{name}{suffix}").write_bytes((scaled_and_hybrid / f"{name}{suffix}")
                                                   .read_bytes())
    load = {"scaled": load_scaled, "hybrid": load_hybrid}[name]
    assert load(tmp_path) is not None
    meta = json.loads((tmp_path / f"{name}.json").read_text())
    if field == "activation":
        entry = _find_activation(meta["config"]["architecture"])
        entry["name"] = "relu" if entry["name"] != "relu" else "tanh"
    else:
        meta["config"][field] += 1
    (tmp_path / f"{name}.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    match = (rf"^'.*{name}.json' was edited after it was written \(metadata hash mismatch\); "
             r"re-create it.$")
    with pytest.raises(ArtifactError, match=match):
        load(tmp_path)


def test_format_version_1_files_still_load(saved):
    """Legacy files have no metadata hash: the tensor hash and shapes are still checked."""
    meta = json.loads((saved / "dmd.json").read_text())
    del meta["metadata_sha256"]
    meta["format_version"] = 1
    meta["config"]["rank"] = 7  # undetectable in a version 1 file
    write_json(saved / "dmd.json", meta)
    tensors, loaded = load_artifact(saved, "dmd", kind="dmd")
    assert loaded["config"]["rank"] == 7 and torch.equal(tensors["operator"],
                                                         _tensors()["operator"])
    meta["format_version"] = 2
    write_json(saved / "dmd.json", meta)
    with pytest.raises(ArtifactError, match="was edited after it was written"):
        load_artifact(saved, "dmd")


def test_metadata_hash_survives_non_string_keys(tmp_path):
    save_artifact(tmp_path, "k", {}, {"by_width": {2: "a", 10: "b"}}, kind="k")
    assert load_artifact(tmp_path, "k")[1]["config"] == {"by_width": {"2": "a", "10": "b"}}


# --------------------------------------------------------------------------------------------
# File modes follow the umask


@pytest.fixture
def umask():
    """``umask(mask)`` sets the process umask for the test; the old one comes back after."""
    previous = os.umask(0o022)
    os.umask(previous)
    yield os.umask
    os.umask(previous)


@pytest.mark.parametrize(("mask", "file_mode", "dir_mode"), [(0o022, 0o644, 0o755),
                                                             (0o077, 0o600, 0o700)])
def test_modes_follow_the_umask(tmp_path, umask, mask, file_mode, dir_mode):
    umask(mask)
    save_artifact(tmp_path, "m", {"w": torch.ones(2)}, {}, kind="m")
    write_json(tmp_path / "r.json", {})
    for path in ("m.json", "m.safetensors", "r.json"):
        assert (tmp_path / path).stat().st_mode & 0o777 == file_mode, path
    with staged_folder(tmp_path / "run") as stage:
        assert stage.stat().st_mode & 0o777 == dir_mode
        write_json(stage / "results.json", {})
    assert (tmp_path / "run").stat().st_mode & 0o777 == dir_mode
    assert (tmp_path / "run" / "results.json").stat().st_mode & 0o777 == file_mode


# --------------------------------------------------------------------------------------------
# Whole run folders


def _run(folder: Path, seed: int) -> None:
    with staged_folder(folder, force=True) as stage:
        write_json(stage / "results.json", {"seed": seed})
        atomic_write_text(stage / "report.md", f"seed {seed}\n")


def _siblings(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.parent.iterdir() if p.name != folder.name)


def test_staged_folder_replaces_a_whole_run(tmp_path):
    out = tmp_path / "run"
    _run(out, 1)
    (out / "old-only.png").write_bytes(b"png")
    _run(out, 2)
    assert sorted(p.name for p in out.iterdir()) == ["report.md", "results.json"]
    assert json.loads((out / "results.json").read_text()) == {"seed": 2}
    assert _siblings(out) == []
    with pytest.raises(FileExistsError, match="pass --force to write into it"):
        with staged_folder(out):
            pass


def test_failed_staged_run_leaves_the_earlier_one(tmp_path):
    out = tmp_path / "run"
    _run(out, 1)
    with pytest.raises(KeyboardInterrupt):
        with staged_folder(out, force=True) as stage:
            write_json(stage / "results.json", {"seed": 2})
            raise KeyboardInterrupt
    assert json.loads((out / "results.json").read_text()) == {"seed": 1}
    assert _siblings(out) == []
    with pytest.raises(RuntimeError):
        with staged_folder(tmp_path / "new"):
            raise RuntimeError
    assert not (tmp_path / "new").exists() and _siblings(out) == []


def test_stale_staging_folders_are_harmless_and_cleaned(tmp_path):
    """A SIGKILLed run leaves ``.run.XXXXXXXX.staging``: the next run works and removes it, but
    never a staging folder a live run holds (locked) or one that belongs to another name."""
    out = tmp_path / "run"
    _run(out, 1)
    stale = tmp_path / ".run.abcd1234.staging"
    stale.mkdir()
    (stale / "results.json").write_text("{}")
    other = tmp_path / ".run.x.abcd1234.staging"  # staging of a folder named "run.x"
    other.mkdir()
    live = tmp_path / ".run.live0000.staging"
    live.mkdir()
    lock = folders._lock(live)
    assert lock is not None
    try:
        _run(out, 2)
    finally:
        os.close(lock)
    assert json.loads((out / "results.json").read_text()) == {"seed": 2}
    assert _siblings(out) == [".run.live0000.staging", ".run.x.abcd1234.staging"]
    _run(out, 3)
    assert _siblings(out) == [".run.x.abcd1234.staging"]


def test_staged_folder_without_exchange_falls_back(tmp_path, monkeypatch):
    out = tmp_path / "run"
    _run(out, 1)
    monkeypatch.setattr(folders, "_exchange", lambda a, b: False)
    _run(out, 2)
    assert json.loads((out / "results.json").read_text()) == {"seed": 2}
    assert _siblings(out) == []


def test_staged_folder_through_a_symlink(tmp_path):
    real = tmp_path / "real"
    _run(real, 1)
    link = tmp_path / "link"
    link.symlink_to(real)
    _run(link, 2)
    assert link.is_symlink() and json.loads((link / "results.json").read_text()) == {"seed": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]


def test_staged_folder_refuses_a_folder_of_other_files(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="holds no koopnet run"):
        with staged_folder(tmp_path, force=True):
            pass
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_edited_model_json_given_as_config_is_refused(tmp_path):
    """``--model model.safetensors --config model.json`` reads the JSON itself: same check."""
    from koopnet.io.serialize import load_model_files, save_model
    from koopnet.models import build_mlp

    save_model(build_mlp([2, 4, 2], "tanh"), tmp_path, "model")
    weights, config = tmp_path / "model.safetensors", tmp_path / "model.json"
    assert load_model_files(weights, config)[0] is not None
    meta = json.loads(config.read_text())
    entry = _find_activation(meta["config"]["architecture"])
    entry["name"] = "relu"
    config.write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match=r"model.json' was edited after it was written"):
        load_model_files(weights, config)
