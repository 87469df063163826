"""Mutation check: does the test suite catch deliberate bugs in the claims koopnet relies on?

Each mutant is one text replacement in a copy of ``src/``; the copied ``tests/`` run against it
(``PYTHONPATH`` = the copy's ``src``, ``pytest -x -q``, ``OMP_NUM_THREADS=1``). A mutant is
CAUGHT when pytest fails, SURVIVED when it passes. The first seven are the bugs project issue 14
found missed (test data in selection, protocol wiring, precision); the rest are ordinary bugs.
Each mutant runs only the test files listed with it (so a run takes minutes, not an hour); the
files are recorded in the report. Not part of the default test run.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/mutation_check.py [--only NAME ...]

Writes ``benchmarks/results/mutation_check.md`` and ``.json``. The copy is taken from the
committed tree (``git archive HEAD``), so uncommitted edits in the working tree do not leak in;
``--worktree`` copies the working tree instead.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
GUARDS = ["tests/test_guards.py"]

# (name, claim guarded, file under src/koopnet, old text, new text, test files)
MUTANTS = [
    ("validation split = test split",
     "the clean protocol selects on validation, never on test",
     "lab/protocols.py", "val=splits.val, test=splits.test",
     "val=splits.test, test=splits.test", GUARDS),
    ("ties broken on test accuracy",
     "selection ignores test scores",
     "lab/protocols.py",
     'key=lambda r: (r["val_accuracy"], r["linear_steps"], -r["rank_resolved"])',
     'key=lambda r: (r["val_accuracy"], r.get("test_accuracy", 0.0), r["linear_steps"], '
     '-r["rank_resolved"])', GUARDS),
    ("study chooses rows on test accuracy",
     "koopnet study picks each comparison row on validation",
     "lab/study.py", 'key = (row["val_accuracy"], -row["rank_resolved"])',
     'key = (row["test_accuracy"], -row["rank_resolved"])', GUARDS),
    ("clean protocol with projected roll-out",
     "the clean protocol uses the exact roll-out",
     "lab/recipes.py", 'exact_rollout=protocol == "clean"', "exact_rollout=False", GUARDS),
    ("paper protocol fits within trajectories",
     "the paper protocol fits the concatenated series",
     "lab/protocols.py", 'if config.pairing == "trajectory":', "if True:", GUARDS),
    ("optimal hard threshold halved",
     "rank 0 is Gavish-Donoho's threshold",
     "dmd.py", "threshold = omega *", "threshold = 0.5 * omega *", ["tests/test_dmd.py"]),
    ("compute_dtype override ignored",
     "compute_dtype=torch.float64 applies the map in float64",
     "hybrid.py", "dtype = self.compute_dtype or lifted.dtype", "dtype = lifted.dtype",
     ["tests/test_hybrid.py", *GUARDS]),
    # ordinary bugs
    ("delay order reversed", "lifted vector is newest state first",
     "observables.py", "lifted = windows.flip(-1).transpose(2, 3)",
     "lifted = windows.transpose(2, 3)", ["tests/test_observables.py", "tests/test_hybrid.py"]),
    ("Tikhonov sign flipped", "Tikhonov damps small singular values",
     "dmd.py", "inv = unit / (unit**2 + self.tikhonov_) / s_max",
     "inv = unit / (unit**2 - self.tikhonov_) / s_max", ["tests/test_dmd.py"]),
    ("integer rank off by one", "rank=k keeps k modes",
     "dmd.py", "return min(rank, usable)", "return min(rank + 1, usable)",
     ["tests/test_dmd.py"]),
    ("pad value changed", "narrow layers are padded with -1 as in the paper",
     "trajectories.py", "PAD_VALUE = -1.0", "PAD_VALUE = 0.0",
     ["tests/test_trajectories.py", "tests/test_hybrid.py", "tests/test_streaming.py"]),
    ("readout selects the wrong coordinates", "the read-out selects the newest state",
     "observables.py",
     "n_out\n        return torch.eye(n_out, self.n_output_features_, dtype=torch.float64)",
     "n_out\n        return torch.eye(n_out, self.n_output_features_, dtype=torch.float64)"
     ".roll(1, 1)",
     ["tests/test_observables.py", "tests/test_hybrid.py"]),
    ("constant observable dropped", "constant=True appends the observable 1",
     "observables.py", "        if self.constant:\n            ones =",
     "        if False:\n            ones =", ["tests/test_observables.py"]),
    ("artifact hash check skipped", "a corrupted tensor file is refused",
     "io/artifacts.py", 'if hashlib.sha256(blob).hexdigest() != meta["sha256"]:', "if False:",
     ["tests/test_artifacts.py"]),
    ("non-atomic write", "an interrupted save leaves the previous artifact loadable",
     "io/artifacts.py", "            staged.append((_write_temp(path, data), path))",
     "            path.write_bytes(data)\n"
     "            staged.append((_write_temp(path, data), path))",
     ["tests/test_artifacts.py"]),
    ("image/label count check removed", "IDX images and labels must match in count",
     "io/idx.py", "if len(images) != len(labels):", "if False:", ["tests/test_idx.py"]),
    ("Yin-Yang seed ignored", "a seed gives the reference generator's points",
     "io/datasets.py", "rng = np.random.RandomState(check_int(seed,",
     "rng = np.random.RandomState(0 * check_int(seed,",
     ["tests/test_datasets.py"]),
    ("linear steps off by one", "the map covers the N + 1 - h replaced steps",
     "hybrid.py", "linear_steps = scaled.n_states - 1 - blocks",
     "linear_steps = scaled.n_states - 2 - blocks", ["tests/test_hybrid.py"]),
]


def _copy_tree(dest: Path, worktree: bool) -> None:
    if worktree:
        for part in ("src", "tests"):
            shutil.copytree(ROOT / part, dest / part,
                            ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        shutil.copy(ROOT / "pyproject.toml", dest / "pyproject.toml")
        return
    blob = subprocess.run(["git", "archive", "HEAD", "src", "tests", "pyproject.toml"],
                          cwd=ROOT, check=True, capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        tar.extractall(dest, filter="data")


def _env(copy: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(copy / "src"), OMP_NUM_THREADS="1",
               PYTHONDONTWRITEBYTECODE="1")
    env.setdefault("KOOPNET_MNIST_DIR", str(ROOT.parent / "shared" / "data"))
    return env


def run_mutant(mutant, worktree: bool) -> dict:
    name, claim, rel, old, new, files = mutant
    with tempfile.TemporaryDirectory(prefix="koopnet-mutant-") as tmp:
        copy = Path(tmp)
        _copy_tree(copy, worktree)
        path = copy / "src" / "koopnet" / rel
        text = path.read_text()
        if text.count(old) != 1:
            return {"name": name, "claim": claim, "file": rel, "tests": files,
                    "status": "NOT APPLIED", "detail": f"text found {text.count(old)} times"}
        path.write_text(text.replace(old, new))
        env = _env(copy)
        where = subprocess.run([sys.executable, "-c", "import koopnet; print(koopnet.__file__)"],
                               env=env, cwd=copy, capture_output=True, text=True).stdout
        if not where.startswith(str(copy)):
            raise RuntimeError(f"the copy's koopnet is not the one imported: {where!r}")
        clock = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p",
                               "no:cacheprovider", *files], env=env, cwd=copy,
                              capture_output=True, text=True)
        seconds = time.perf_counter() - clock
        lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
        failed = [ln for ln in lines if ln.startswith(("FAILED tests", "ERROR tests"))]
        return {"name": name, "claim": claim, "file": rel, "tests": files,
                "status": "CAUGHT" if proc.returncode != 0 else "SURVIVED",
                "pytest_exit": proc.returncode, "seconds": round(seconds, 1),
                "detail": (failed[0] if failed else lines[-1] if lines else "")[:200]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="run only mutants with these names")
    parser.add_argument("--worktree", action="store_true",
                        help="copy the working tree instead of the committed HEAD")
    parser.add_argument("--out", default=str(RESULTS / "mutation_check"),
                        help="output path without extension")
    parser.add_argument("--merge", action="store_true",
                        help="replace only the rerun mutants' rows in an existing report")
    args = parser.parse_args(argv)
    chosen = [m for m in MUTANTS if not args.only or m[0] in args.only]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                            capture_output=True, text=True).stdout.strip()
    out = Path(args.out)
    previous = {}
    if args.merge and out.with_suffix(".json").is_file():
        previous = {r["name"]: r for r in json.loads(out.with_suffix(".json").read_text())[
            "mutants"]}
    fresh = {}
    for mutant in chosen:
        row = {**run_mutant(mutant, args.worktree), "commit": commit}
        print(f"{row['status']:>11}  {row['name']}  ({row.get('seconds', 0)} s)", flush=True)
        fresh[row["name"]] = row
    rows = [fresh.get(m[0]) or previous[m[0]] for m in MUTANTS
            if m[0] in fresh or m[0] in previous]
    commit = ", ".join(sorted({r.get("commit", commit) for r in rows}))
    caught = sum(r["status"] == "CAUGHT" for r in rows)
    report = {"commit": commit, "tree": "worktree" if args.worktree else "HEAD",
              "command": "pytest -x -q -p no:cacheprovider <tests> (OMP_NUM_THREADS=1)",
              "caught": caught, "total": len(rows), "mutants": rows}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    md = [f"# Mutation check ({report['tree']} at {commit})", "",
          f"{caught} of {len(rows)} deliberate bugs caught. Each mutant is one text replacement "
          "in a copy of `src/`; the listed test files run with `pytest -x -q` against it. "
          "Rerun: `OMP_NUM_THREADS=1 .venv/bin/python benchmarks/mutation_check.py`.", "",
          "| # | mutant | claim guarded | file | tests run | result | first failing test | s |",
          "|---|---|---|---|---|---|---|---|"]
    for i, r in enumerate(rows, 1):
        first = r.get("detail", "").split(" - ")[0].removeprefix("FAILED ").split("::")[-1]
        md.append(f"| {i} | {r['name']} | {r['claim']} | `{r['file']}` | "
                  f"{', '.join(Path(t).name for t in r['tests'])} | {r['status']} | "
                  f"`{first}` | {r.get('seconds', '')} |")
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    return 0 if caught == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
