"""Peer side of bench_dmd.py: the paper's PyKoopman pipeline, or PyDMD, on the same data.

Runs in the peer virtual environment (PyKoopman pins old numpy/scipy), imports only numpy and
the peer library. Usage: ``python peer_worker.py SPEC.json OUT.json`` where SPEC lists cells
{layer, n_traj, n_delays, rank, n_eval} and the .npy files of the trajectories (no pickle).
"""

from __future__ import annotations

import json
import resource
import sys
import time
import warnings

import numpy as np


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_pykoopman(train, test, cell, out_width):
    import pykoopman as pk

    h, rank = cell["n_delays"], cell["rank"]
    dtype = cell.get("dtype", "float64")  # float32: as the paper's notebooks fed it
    series = train[: cell["n_traj"]].reshape(-1, train.shape[2]).astype(dtype)
    t0 = time.perf_counter()
    model = pk.Koopman(observables=pk.observables.TimeDelay(delay=1, n_delays=h),
                       regressor=pk.regression.EDMD(svd_rank=rank))
    model.fit(series)
    fit_s = time.perf_counter() - t0
    n_steps = test.shape[1] - 1 - h
    preds = np.empty((cell["n_eval"], out_width))
    t0 = time.perf_counter()
    for b in range(cell["n_eval"]):  # the paper's per-sample loop (koopman_inference.py)
        y = model.simulate(test[b, : h + 1].astype(dtype), n_steps=n_steps)
        preds[b] = np.real(y[-1])[:out_width]
    eval_s = time.perf_counter() - t0
    eig = np.linalg.eigvals(model.A)
    return fit_s, eval_s, eig, preds


def run_pydmd(train, cell):
    from pydmd import HankelDMD

    h, rank = cell["n_delays"], cell["rank"]
    series = train[: cell["n_traj"]].reshape(-1, train.shape[2]).astype(np.float64)
    t0 = time.perf_counter()
    model = HankelDMD(svd_rank=rank, d=h + 1)
    model.fit(series.T)  # PyDMD: snapshots are columns
    fit_s = time.perf_counter() - t0
    return fit_s, np.asarray(model.eigs)


def main(spec_path: str, out_path: str) -> None:
    warnings.filterwarnings("ignore")
    with open(spec_path) as handle:
        spec = json.load(handle)
    baseline = peak_rss_mib()
    results = []
    for cell in spec["cells"]:
        train = np.load(spec["data"][str(cell["layer"])]["train"], allow_pickle=False)
        test = np.load(spec["data"][str(cell["layer"])]["test"], allow_pickle=False)
        out_width = spec["data"][str(cell["layer"])]["out_width"]
        row = dict(cell)
        if spec["library"] == "pykoopman":
            fit_s, eval_s, eig, preds = run_pykoopman(train, test, cell, out_width)
            row.update(fit_s=fit_s, eval_s=eval_s)
            tag = f"{cell['layer']}_{cell['n_traj']}_{cell['n_delays']}"
            pred_path = f"{spec['pred_prefix']}_{tag}.npy"
            np.save(pred_path, preds, allow_pickle=False)
            row["predictions"] = pred_path
        else:
            fit_s, eig = run_pydmd(train, cell)
            row.update(fit_s=fit_s, eval_s=0.0)
        row["eig_re"], row["eig_im"] = eig.real.tolist(), eig.imag.tolist()
        results.append(row)
    with open(out_path, "w") as handle:
        json.dump({"cells": results, "peak_rss_mib": peak_rss_mib(),
                   "baseline_rss_mib": baseline,
                   "versions": versions(spec["library"])}, handle)


def versions(library: str) -> dict:
    import importlib.metadata as md

    names = ["numpy", "scipy", "pydmd"] + (["pykoopman", "scikit-learn"]
                                           if library == "pykoopman" else [])
    return {n: md.version(n) for n in names}


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] in ("-h", "--help"):
        print(__doc__)
        sys.exit(0 if sys.argv[1:2] in (["-h"], ["--help"]) else 2)
    main(sys.argv[1], sys.argv[2])
