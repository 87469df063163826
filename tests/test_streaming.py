"""Streaming and sharded DMD fits equal the in-memory fit.

What one pass over the data serves (``TrajectoryMoments``): every n_delays <= T-2, every rank
(int, energy fraction, optimal threshold, full) and every Tikhonov value, with or without the
constant observable. The concatenated-series protocol: ``series_statistics`` (sharded CLI fit)
serves one n_delays per pass; ``SeriesMoments`` (lag moments of the in-order series) serves every
n_delays <= max_delays, and ``fit_series`` gives the same operator as the SVD of the pairs.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch

from koopnet.cli.fit import parse_rank
from koopnet.distributed import all_reduce_statistics, shard_indices
from koopnet.dmd import DMD, PairStatistics
from koopnet.io.artifacts import load_artifact
from koopnet.io.trajectories import fit_file, trajectory_moments
from koopnet.observables import TimeDelay, snapshot_pairs
from koopnet.spec import FitSpec
from koopnet.streaming import SeriesMoments, TrajectoryMoments, fit_series, series_statistics

B, T, W = 300, 6, 4


def random_states(seed: int = 0, b: int = B, t: int = T, w: int = W) -> torch.Tensor:
    """Well-conditioned trajectories: a stable linear map plus noise. Shape: [b, t, w]."""
    g = torch.Generator().manual_seed(seed)
    A = torch.linalg.qr(torch.randn(w, w, generator=g, dtype=torch.float64))[0] * 0.9
    states = [torch.randn(b, w, generator=g, dtype=torch.float64)]
    for _ in range(t - 1):
        states.append(states[-1] @ A.T + 0.3 * torch.randn(b, w, generator=g,
                                                           dtype=torch.float64))
    return torch.stack(states, dim=1)


def direct_pairs(states: torch.Tensor, h: int, constant: bool = False):
    return snapshot_pairs(TimeDelay(h, constant=constant).fit_transform(states))


def match_eigenvalues(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest relative distance from each eigenvalue of ``a`` to its nearest one in ``b``."""
    dist = (a[:, None] - b[None, :]).abs().min(dim=1).values
    return float((dist / a.abs().clamp_min(1e-300)).max())


def test_streaming_equals_in_memory_svd_fit():
    states = random_states()
    for h in (0, 2, T - 2):
        svd = DMD().fit_pairs(*direct_pairs(states, h))
        moments = TrajectoryMoments(T, W).update(states)
        streamed = DMD().fit_statistics(moments.pair_statistics(h))
        assert streamed.rank_ == svd.rank_ == W * (h + 1)
        assert match_eigenvalues(svd.eigenvalues_, streamed.eigenvalues_) < 1e-8
        assert match_eigenvalues(streamed.eigenvalues_, svd.eigenvalues_) < 1e-8
        assert torch.allclose(svd.transition(1), streamed.transition(1), rtol=0, atol=1e-9)


@pytest.mark.parametrize("constant", [False, True])
def test_one_pass_serves_every_delay_rank_and_tikhonov(constant):
    states = random_states(1)
    moments = TrajectoryMoments(T, W)
    for chunk in states.split(97):
        moments.update(chunk)
    for h in range(T - 1):
        X, Y = direct_pairs(states, h, constant)
        stats = moments.pair_statistics(h, constant=constant)
        direct = PairStatistics.from_pairs(X, Y)
        assert stats.n_pairs == direct.n_pairs == B * (T - 1 - h)
        for name in ("xx", "yx", "yy"):
            assert torch.allclose(getattr(stats, name), getattr(direct, name), rtol=1e-12,
                                  atol=1e-9)
        D = X.shape[1]
        for rank in (None, 1, max(1, D // 2), 0.9, 0):
            for tikhonov in (0.0, 1e-3):
                ref = DMD(rank, tikhonov=tikhonov).fit_pairs(X, Y)
                got = DMD(rank, tikhonov=tikhonov).fit_statistics(stats)
                assert got.rank_ == ref.rank_, (h, rank)
                assert match_eigenvalues(ref.eigenvalues_, got.eigenvalues_) < 1e-8, (h, rank)
                assert torch.allclose(ref.transition(2), got.transition(2), rtol=0, atol=1e-9)


def test_arbitrary_batch_splits_give_the_same_statistics():
    states = random_states(2)
    whole = TrajectoryMoments(T, W).update(states)
    g = torch.Generator().manual_seed(3)
    for _ in range(5):
        cuts = sorted(torch.randint(1, B, (4,), generator=g).tolist())
        sizes = [b - a for a, b in zip([0, *cuts], [*cuts, B], strict=True) if b > a]
        split = trajectory_moments(states.split(sizes), T, W)
        assert split.n_trajectories == B
        assert torch.allclose(split.moments, whole.moments, rtol=1e-13, atol=1e-10)
        for h in (1, 3):
            ref = PairStatistics.from_pairs(*direct_pairs(states.reshape(1, -1, W), h, True))
            got = series_statistics(states.split(sizes), h, constant=True)
            assert got.n_pairs == ref.n_pairs == B * T - h - 1
            assert torch.allclose(got.xx, ref.xx, rtol=1e-12, atol=1e-9)
            assert torch.allclose(got.yx, ref.yx, rtol=1e-12, atol=1e-9)


def test_concatenated_shards_with_carry_add_up_to_the_whole_series():
    states = random_states(4, b=7, t=3)
    h = 4  # windows span more than one trajectory
    ref = PairStatistics.from_pairs(*direct_pairs(states.reshape(1, -1, W), h))
    series = states.reshape(-1, W)
    total = None
    for rank in range(3):
        shard = shard_indices(len(states), rank, 3)
        first = shard.start * 3
        carry = series[max(0, first - h - 1): first]
        part = series_statistics([states[shard.start: shard.stop]], h, carry=carry)
        total = part if total is None else total + part
    assert total.n_pairs == ref.n_pairs
    assert torch.allclose(total.xx, ref.xx, rtol=1e-12, atol=1e-9)
    assert torch.allclose(total.yx, ref.yx, rtol=1e-12, atol=1e-9)


def test_shard_indices_cover_everything_once_in_order():
    for n in (0, 1, 5, 17):
        for world in (1, 2, 3, 8):
            shards = [shard_indices(n, r, world) for r in range(world)]
            assert [i for s in shards for i in s] == list(range(n))
            assert max(map(len, shards)) - min(map(len, shards)) <= 1
    with pytest.raises(ValueError):
        shard_indices(4, 2, 2)


def test_all_reduce_without_a_group_is_identity_and_checks_type():
    stats = PairStatistics.from_pairs(torch.ones(3, 2), torch.ones(3, 2))
    assert all_reduce_statistics(stats) is stats
    with pytest.raises(TypeError):
        all_reduce_statistics(torch.zeros(2))


def test_parse_rank():
    assert [parse_rank(t) for t in ("None", "full", "0", "7", "0.5")] == [None, None, 0, 7, 0.5]


def write_trajectories(path: Path, states: torch.Tensor) -> None:
    safetensors.torch.save_file({"states": states.float().contiguous()}, str(path))


def test_two_process_gloo_fit_equals_single_process(tmp_path):
    states = random_states(5, b=101)
    path = tmp_path / "traj.safetensors"
    write_trajectories(path, states)
    env = {k: v for k, v in os.environ.items()
           if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    for protocol in ("trajectory", "concatenated"):
        out = tmp_path / protocol
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node", "2", "-m", "koopnet", "fit", "--trajectories", str(path),
               "--n-delays", "2", "--rank", "none", "--batch-size", "16",
               "--protocol", protocol, "--out", str(out)]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
        tensors, meta = load_artifact(out, "dmd", kind="dmd")
        assert meta["config"]["world_size"] == 2
        single, _ = fit_file(path, FitSpec(2, pairing=protocol), batch_size=1000)
        assert torch.allclose(tensors["singular_values"], single.singular_values_,
                              rtol=1e-10, atol=0)
        V, A = tensors["basis"], tensors["operator"]
        assert torch.allclose(V @ A @ V.T, single.transition(1), rtol=0, atol=1e-10)
        eig = torch.complex(tensors["eigenvalues_real"], tensors["eigenvalues_imag"])
        assert match_eigenvalues(single.eigenvalues_, eig) < 1e-10


@pytest.mark.parametrize("chunks", [[40], [1, 5, 34], [1] * 40])
def test_series_moments_give_every_delay_of_the_concatenated_series(chunks):
    series = random_states(3, b=8, t=5).reshape(-1, W)  # [40, W]
    moments = SeriesMoments(W, max_delays=6)
    for rows in series.split(chunks):
        moments.update(rows)
    for h in (0, 1, 4, 6):  # h = 6 > T: windows span two samples
        for constant in (False, True):
            ref = PairStatistics.from_pairs(*direct_pairs(series[None], h, constant))
            got = moments.pair_statistics(h, constant=constant)
            assert got.n_pairs == ref.n_pairs == len(series) - 1 - h
            for name in ("xx", "yx", "yy"):
                assert torch.allclose(getattr(got, name), getattr(ref, name), atol=1e-10)


def test_series_moments_reuse_the_last_statistics_until_rows_arrive():
    series = random_states(6, b=6, t=5).reshape(-1, W)
    moments = SeriesMoments(W, max_delays=2).update(series[:20])
    first = moments.pair_statistics(2)
    assert moments.pair_statistics(2) is first  # several ranks share one eigendecomposition
    moments.update(series[20:])
    ref = PairStatistics.from_pairs(*direct_pairs(series[None], 2))
    assert torch.allclose(moments.pair_statistics(2).xx, ref.xx, atol=1e-10)


def test_series_moments_refuse_more_delays_than_built_for():
    moments = SeriesMoments(W, max_delays=2).update(torch.randn(10, W))
    with pytest.raises(ValueError, match="n_delays=3 exceeds max_delays=2"):
        moments.pair_statistics(3)
    with pytest.raises(ValueError, match="rows have width 5; expected 4"):
        moments.update(torch.randn(3, 5))


@pytest.mark.parametrize("rank", [None, 7, 0.99])
def test_fit_series_gram_route_equals_the_svd_route(rank):
    series = random_states(4).reshape(-1, W)  # 1800 rows, D = 4 * 3: the Gram route
    moments = SeriesMoments(W, max_delays=2).update(series)
    gram = fit_series(DMD(rank), series, 2, moments=moments)
    svd = fit_series(DMD(rank), series, 2)
    assert gram.rank_ == svd.rank_
    assert match_eigenvalues(svd.eigenvalues_, gram.eigenvalues_) < 1e-8
    assert torch.allclose(gram.transition(3), svd.transition(3), atol=1e-8)


def test_fit_series_uses_the_svd_where_the_gram_floor_would_cut_the_rank():
    series = random_states(5).reshape(-1, W)
    noise = torch.randn(len(series), generator=torch.Generator().manual_seed(0),
                        dtype=torch.float64)
    series[:, 3] = series[:, 1] + 1e-9 * noise  # a direction at ~1e-10 S_max: below the
    moments = SeriesMoments(W, max_delays=1).update(series)  # Gram floor sqrt(D eps) ~ 4e-8
    dmd = fit_series(DMD(), series, 1, moments=moments)
    assert dmd.rank_ == 2 * W == fit_series(DMD(), series, 1).rank_
