"""Fault injection: a `koopnet reproduce --force` killed with SIGKILL at any moment leaves its
output folder wholly the earlier run or wholly the new one, and `koopnet report` still works.

Each killed child is the real command line, ``python -m koopnet --quiet reproduce yinyang --quick
--force --out DIR``. To keep twenty runs cheap, a ``sitecustomize`` hook on the children's
``PYTHONPATH`` (a test file, not koopnet code) replays the experiment's results from a pickle
that the first, complete run of each seed stored: every child still imports koopnet, renders the
figure and report and writes the whole folder exactly as a real run does, only the training is
skipped. Replayed results also make the three files of a complete run byte-identical across
children, so "wholly one run" is checked by comparing file hashes.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from koopnet.cli.main import main

SRC = Path(__file__).resolve().parents[1] / "src"
FILES = ("results.json", "report.md", "eigenvalues.png")

_HOOK = '''
import os
import pickle
from pathlib import Path

import koopnet.lab.protocols as _protocols

_cache = Path(os.environ["KOOPNET_FAULT_CACHE"])
_real = _protocols.run_experiment


def _replayed(config, *, progress=True, **kwargs):
    if _cache.is_file():
        return pickle.loads(_cache.read_bytes())
    out = _real(config, progress=progress, **kwargs)
    _cache.write_bytes(pickle.dumps(out))
    return out


_protocols.run_experiment = _replayed
'''


def _state(folder: Path) -> tuple:
    """SHA-256 of each of a run's three files (None where missing): a run's fingerprint."""
    return tuple(hashlib.sha256((folder / name).read_bytes()).hexdigest()
                 if (folder / name).is_file() else None for name in FILES)


def _stagings(out: Path) -> set[str]:
    return {p.name for p in out.parent.iterdir()
            if p.name.startswith(f".{out.name}.") and p.name.endswith(".staging")}


def _spawn(out: Path, seed: int, env: dict) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "koopnet", "--quiet", "reproduce", "yinyang", "--quick", "--seed",
         str(seed), "--force", "--out", str(out)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)


def _finish(child: subprocess.Popen) -> None:
    _, err = child.communicate(timeout=300)
    assert child.returncode == 0, err.decode()[-2000:]


def _wait_for_new_staging(out: Path, known: set[str], child: subprocess.Popen) -> bool:
    """Poll until the child creates its staging folder (True) or exits first (False)."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if _stagings(out) - known:
            return True
        if child.poll() is not None:
            return False
        time.sleep(0.0005)
    raise AssertionError("the child neither staged its folder nor exited within 120 s")


def test_sigkill_during_reproduce_leaves_a_whole_run(tmp_path, capsys):
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(_HOOK)
    base = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg",
            "PYTHONPATH": os.pathsep.join([str(hook), str(SRC)])}
    envs = {seed: {**base, "KOOPNET_FAULT_CACHE": str(tmp_path / f"seed{seed}.pkl")}
            for seed in (1, 2)}
    refs = {}
    for seed in (1, 2):  # the complete runs (trained for real once; later runs replay them)
        _finish(_spawn(tmp_path / f"ref{seed}", seed, envs[seed]))
        refs[seed] = _state(tmp_path / f"ref{seed}")
        assert None not in refs[seed]
    assert refs[1] != refs[2]
    whole = {refs[1]: "old", refs[2]: "new"}

    out = tmp_path / "run"
    shutil.copytree(tmp_path / "ref1", out)
    known, clock = _stagings(out), time.monotonic()
    child = _spawn(out, 2, envs[2])  # calibration: when does the write start, how long is it
    assert _wait_for_new_staging(out, known, child)
    staged_at = time.monotonic() - clock
    _finish(child)
    window = time.monotonic() - clock - staged_at
    assert _state(out) == refs[2]  # a replayed run writes exactly the reference files

    # 6 kills spread over start-up (imports, replay), 14 over the write window and just past it
    plan = [("start", f * staged_at) for f in (0.05, 0.25, 0.5, 0.75, 0.9, 1.0)]
    plan += [("write", f * window) for f in np.linspace(0.0, 1.1, 14)]
    outcomes, killed_writing = [], 0
    for mode, delay in plan:
        shutil.rmtree(out)
        shutil.copytree(tmp_path / "ref1", out)
        known = _stagings(out)  # killed children's leftovers must not disturb this run
        child = _spawn(out, 2, envs[2])
        staged = mode == "write" and _wait_for_new_staging(out, known, child)
        time.sleep(delay)
        running = child.poll() is None
        child.send_signal(signal.SIGKILL)  # a no-op where it already exited
        child.communicate(timeout=60)
        killed_writing += staged and running
        state = _state(out)
        assert state in whole, f"{mode} kill after {delay:.3f} s left a mixed folder: {state}"
        outcomes.append(whole[state])
        assert main(["--quiet", "report", str(out)]) == 0
        assert _state(out) == state  # the report re-rendered from that run is the same file
    capsys.readouterr()
    print(f"outcomes: {outcomes}; {killed_writing} kills fell into the write window")
    assert killed_writing >= 5, f"only {killed_writing} kills fell into the write window"
    assert "old" in outcomes and "new" in outcomes, outcomes

    _finish(_spawn(out, 1, envs[1]))  # a successful run removes the killed runs' leftovers
    assert _state(out) == refs[1]
    assert _stagings(out) == set()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_stage_refuses_an_out_that_holds_its_input(tmp_path, capsys):
    """A stage replaces its whole output folder, so an input inside it would be deleted."""
    out = tmp_path / "run"
    out.mkdir()
    gen = np.random.default_rng(0)
    np.save(out / "X.npy", gen.normal(size=(30, 3)).astype(np.float32))
    np.save(out / "y.npy", (gen.random(30) > 0.5).astype(np.int64))
    code = main(["--quiet", "train", "--dataset", str(out / "X.npy"), "--labels",
                 str(out / "y.npy"), "--widths", "3,4,2", "--epochs", "1", "--force", "--out",
                 str(out)])
    assert code == 2
    err = capsys.readouterr().err
    assert "holds this stage's input" in err and "pick another --out" in err
    assert sorted(p.name for p in out.iterdir()) == ["X.npy", "y.npy"]
