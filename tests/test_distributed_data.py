"""Scale out from the data: two gloo processes fit the operator one process fits.

``linearize_depth`` and the staged ``koopnet fit SCALE_DIR`` under torch.distributed: each rank
runs the model on its own contiguous shard of the inputs, the statistics are all-reduced once,
and every rank returns what a single process given all the inputs returns (up to the order of
the additions, and the Gram route's eps * cond^2 against the single process's SVD). One spawn
of two processes (FileStore rendezvous, no network port) runs every distributed case; the
tests compare its saved results with single-process fits done here.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from koopnet import linearize_depth
from koopnet.cli import main
from koopnet.cli.stages import stage_fit, stage_scale
from koopnet.distributed import agree, local_shard, sharded_statistics
from koopnet.io.artifacts import load_artifact
from koopnet.io.serialize import load_hybrid, load_with_meta, save_scaled
from koopnet.io.sources import fit_split, reload_data
from koopnet.linearization import fit_hybrid
from koopnet.models import build_mlp
from koopnet.spec import FitSpec
from koopnet.trajectories import collect_trajectories

WORLD = 2
N_SAMPLES = 101  # odd: the shards differ in size (51 and 50)
BLOCKS = ["1", "2", "3", "4"]  # T = 5 depth states
DEPTH_CASES = {"h1": {"n_delays": 1}, "h2-constant": {"n_delays": 2, "constant": True},
               "rank5": {"n_delays": 1, "rank": 5}}
STAGE_CASES = {"trajectory": FitSpec(1, pairing="trajectory"),
               "concatenated": FitSpec(3, pairing="concatenated", constant=True)}


class Residual(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.f = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.Tanh())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.f(x)


def residual_model() -> tuple[nn.Module, torch.Tensor]:
    """A float64 residual stack and its inputs, the same in every process. X [101, 6]."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), *[Residual(6) for _ in BLOCKS], nn.Linear(6, 2))
    X = torch.randn(N_SAMPLES, 6, generator=torch.Generator().manual_seed(1))
    return model.double(), X.double()


def _worker(rank: int, store: str, folder: Path, scale_dir: Path) -> None:
    """One rank: every distributed case, results saved to ``folder/rank{rank}.pt``."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store, WORLD), rank=rank,
                            world_size=WORLD)
    try:
        model, X = residual_model()
        results = {}
        for name, kwargs in DEPTH_CASES.items():
            hybrid = linearize_depth(model, BLOCKS, X, batch_size=16, **kwargs)
            with torch.no_grad():
                output = hybrid(X[:9])
            results[name] = {"linear_map": hybrid.linear_map, "output": output,
                             "n_pairs": hybrid.dmd_.n_pairs_, "rank": hybrid.rank_}
        for name, spec in STAGE_CASES.items():
            stage_fit(folder / name, scale_dir=scale_dir, spec=spec)
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            results["cli_code"] = main(["--quiet", "fit", str(scale_dir), "--n-delays", "1",
                                        "--out", str(folder / "cli")])
        results["cli_stdout"] = printed.getvalue()
        results["errors"] = []
        scaled, _ = load_with_meta(scale_dir, "scaled")
        learned = FitSpec(1, observable_kind="learned")
        for fn in (lambda: local_shard(1), lambda: agree(lambda: 1 // (1 - rank)),
                   lambda: fit_hybrid(scaled, torch.zeros(4, 3, dtype=torch.float64),
                                      spec=learned)):
            try:
                fn()
            except (ValueError, RuntimeError, ZeroDivisionError) as err:
                results["errors"].append(f"{type(err).__name__}: {err}")
        torch.save(results, folder / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def make_scale_dir(folder: Path) -> Path:
    """A tiny float64 scale folder (3-5-5-2 tanh MLP, 3 inserted blocks) on a .npy file.

    float64 because float32 matmuls round differently for different batch sizes (a shard
    is a smaller batch), which would move the states by 1e-7, far above the 1e-10 compared
    here; ``koopnet scale`` trains in float32, so its folder is re-saved in float64.
    """
    torch.manual_seed(0)
    model = build_mlp([3, 5, 5, 2], "tanh")
    safetensors.torch.save_file(model.state_dict(), str(folder / "weights.safetensors"))
    (folder / "model.json").write_text(json.dumps({"widths": [3, 5, 5, 2],
                                                   "activation": "tanh"}))
    np.save(folder / "X.npy", np.random.default_rng(0).normal(size=(N_SAMPLES, 3)))
    stage_scale(folder / "scale32", model=str(folder / "weights.safetensors"),
                config=str(folder / "model.json"), data=str(folder / "X.npy"), layer=1,
                n_inserted=3, init="he", epochs=2)
    scaled, meta = load_with_meta(folder / "scale32", "scaled")
    metadata = {k: v for k, v in meta["config"].items()
                if k not in ("architecture", "layer", "scaling_spec")}  # save_scaled's own
    (folder / "scale").mkdir()
    save_scaled(scaled.double(), folder / "scale", "scaled", metadata=metadata,
                parents=meta["parents"])
    return folder / "scale"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(folder, scale folder, [results of rank 0, rank 1]) of one two-process spawn."""
    folder = tmp_path_factory.mktemp("distributed")
    scale_dir = make_scale_dir(folder)
    mp.spawn(_worker, args=(str(folder / "store"), folder, scale_dir), nprocs=WORLD, join=True)
    return folder, scale_dir, [torch.load(folder / f"rank{r}.pt") for r in range(WORLD)]


@pytest.mark.parametrize("name", DEPTH_CASES)
def test_linearize_depth_on_two_ranks_equals_one_process(runs, name):
    model, X = residual_model()
    single = linearize_depth(model, BLOCKS, X, **DEPTH_CASES[name])  # in memory: SVD route
    with torch.no_grad():
        reference = single(X[:9])
    for result in (ranks[name] for ranks in runs[2]):
        assert result["rank"] == single.rank_
        assert (result["linear_map"] - single.linear_map).abs().max() < 1e-10
        assert (result["output"] - reference).abs().max() < 1e-10
    assert torch.equal(runs[2][0][name]["linear_map"], runs[2][1][name]["linear_map"])


@pytest.mark.parametrize("name", DEPTH_CASES)
def test_sharding_counts_every_sample_once(runs, name):
    h = DEPTH_CASES[name]["n_delays"]
    expected = N_SAMPLES * (len(BLOCKS) - h)  # pairs per trajectory: T - 1 - h, T = 5
    assert [ranks[name]["n_pairs"] for ranks in runs[2]] == [expected] * WORLD


def one_step(tensors: dict) -> torch.Tensor:
    """V A~ V^T: the one-step map, free of the basis' column signs. Shape: [D, D]."""
    return tensors["basis"] @ tensors["operator"] @ tensors["basis"].T


@pytest.mark.parametrize("name", STAGE_CASES)
def test_staged_fit_on_two_ranks_equals_one_process(runs, name, tmp_path):
    """Against the one-process fit of the same statistics: equal to 1e-10 (only the order of
    the additions differs). Against the one-process SVD of the pairs (``koopnet fit`` without
    torchrun): the Gram route squares the condition number, so the maps agree to
    eps * cond(X)^2 * |map| (a 1e-9 difference at cond ~ 1e3 here), same rank and pairs."""
    folder, scale_dir, _ = runs
    spec = STAGE_CASES[name]
    tensors, meta = load_artifact(folder / name, "dmd")
    scaled, scale_meta = load_with_meta(scale_dir, "scaled")
    X = fit_split(reload_data(scale_meta, scale_dir / "scaled.json", "scale", "")[0])[0]
    X = X.to(torch.float64)  # the inputs as stage_fit reads them
    stats = sharded_statistics(lambda start, stop: collect_trajectories(scaled, X[start:stop])
                               .states, N_SAMPLES, spec.n_delays, constant=spec.constant,
                               pairing=spec.pairing)
    streamed = spec.dmd().fit_statistics(stats)  # one process, the same Gram route
    assert (tensors["singular_values"] - streamed.singular_values_).abs().max() < 1e-10
    reference = {"basis": streamed.basis_, "operator": streamed.operator_}
    assert (one_step(tensors) - one_step(reference)).abs().max() < 1e-10

    stage_fit(tmp_path / "single", scale_dir=scale_dir, spec=spec)  # one process, SVD route
    single, single_meta = load_artifact(tmp_path / "single", "dmd")
    n_states, h = 5, spec.n_delays
    pairs = (N_SAMPLES * n_states - h - 1 if spec.pairing == "concatenated"
             else N_SAMPLES * (n_states - 1 - h))  # shard-boundary pairs counted once
    assert meta["config"]["n_pairs"] == single_meta["config"]["n_pairs"] == pairs
    assert meta["config"]["world_size"] == WORLD
    assert meta["config"]["rank_"] == single_meta["config"]["rank_"]
    s = single["singular_values"]
    tolerance = 10 * torch.finfo(torch.float64).eps * float(s[0] / s[-1]) ** 2
    step = one_step(single)
    assert (one_step(tensors) - step).abs().max() < tolerance * step.abs().max()
    hybrids = [load_hybrid(path) for path in (folder / name, tmp_path / "single")]
    probe = torch.randn(16, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    with torch.no_grad():
        outputs = [hybrid(probe) for hybrid in hybrids]
    assert (outputs[0] - outputs[1]).abs().max() < tolerance * outputs[1].abs().max()


def test_only_rank_zero_wrote_and_no_temporary_folder_is_left(runs):
    folder = runs[0]
    for name in STAGE_CASES:
        assert sorted(p.name for p in (folder / name).iterdir()) == [
            "dmd.json", "dmd.safetensors", "hybrid.json", "hybrid.safetensors"]
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]


def test_koopnet_fit_prints_its_result_line_on_rank_zero_only(runs):
    folder, _, ranks = runs
    assert [result["cli_code"] for result in ranks] == [0] * WORLD
    lines = ranks[0]["cli_stdout"].splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["out"] == str(folder / "cli")
    assert ranks[1]["cli_stdout"] == ""

def test_a_failure_on_one_rank_stops_every_rank(runs):
    errors = [result["errors"] for result in runs[2]]
    too_few = ("ValueError: 1 samples cannot be shared by 2 processes; pass at least 2 samples "
               "or launch fewer processes (--nproc_per_node).")
    learned = ("ValueError: FitSpec(observable_kind='learned') trains on whole trajectories, "
               "which a sharded fit never holds at once; run this fit in one process (without "
               "torchrun).")
    assert errors[0] == [too_few, "RuntimeError: rank(s) [1] failed before the statistics "
                                  "were all-reduced; their own error is in their output.",
                         learned]
    assert errors[1] == [too_few, "ZeroDivisionError: integer division or modulo by zero",
                         learned]


def test_linearize_depth_refuses_a_learned_observable_under_torch_distributed(monkeypatch):
    """psi trains on all the states at once; a rank holds only its shard (refused before the
    model runs its shard, so every rank raises alike and none waits in a collective)."""
    from koopnet import depth

    model, X = residual_model()
    monkeypatch.setattr(depth, "is_distributed", lambda: True)
    with pytest.raises(ValueError, match=r"^spec\.observable_kind='learned' trains psi on all "
                                         r"the depth states at once, which the streamed fit "
                                         r"\(moments only\) never holds: under torch\."
                                         r"distributed every rank holds only its shard of them; "
                                         r"run this fit in one process \(without torchrun\), or "
                                         r"pass FitSpec\(\.\.\., observable_kind='delay'\)\.$"):
        linearize_depth(model, BLOCKS, X, spec=FitSpec(1, observable_kind="learned",
                                                       exact_rollout=True))


@pytest.mark.parametrize("name", DEPTH_CASES)
def test_in_memory_and_moments_routes_agree_in_one_process(name, monkeypatch):
    """The routes a single process picks by size fit the same uncentred pairs: equal to
    1e-10 on a well-conditioned lift (the comparison above relies on it)."""
    from koopnet import depth

    model, X = residual_model()
    in_memory = linearize_depth(model, BLOCKS, X, **DEPTH_CASES[name])
    monkeypatch.setattr(depth, "_IN_MEMORY_BYTES", 0)
    streamed = linearize_depth(model, BLOCKS, X, batch_size=16, **DEPTH_CASES[name])
    assert streamed.dmd_.n_pairs_ == in_memory.dmd_.n_pairs_
    assert (streamed.linear_map - in_memory.linear_map).abs().max() < 1e-10
