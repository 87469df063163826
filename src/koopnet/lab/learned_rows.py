"""Learned-observable fits of the clean protocol's sweep (``ExperimentConfig.observables``).

For every (h, constant) of the delay grid, psi (:class:`koopnet.learned.LearnedObservable`, the
delay vector plus a learned encoder) is trained once on the training trajectories, the
within-trajectory pairs are lifted once, and a DMD is fitted on their Gram statistics for every
(rank, Tikhonov) of the grid, with the protocol's roll-out. Training psi is the costly part (its
Adam steps), so it is shared by the grid's DMD fits instead of repeated for each. The sweep
scores these fits like the delay ones and ``select`` chooses among all of them on validation.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import torch
from tqdm.auto import tqdm

from koopnet.dmd import DMD, PairStatistics
from koopnet.hybrid import KoopmanHybrid
from koopnet.lab.recipes import ExperimentConfig
from koopnet.observables import snapshot_pairs
from koopnet.scaling import ScaledMLP
from koopnet.spec import FitSpec

log = logging.getLogger(__name__)

__all__ = ["check_learned", "learned_fits", "learned_spec"]


def learned_spec(config: ExperimentConfig, n_delays: int, constant: bool, rank=None,
                 tikhonov: float = 0.0) -> FitSpec:
    """The fit specification of one learned row: the config's learned settings, psi seeded
    with the run's seed, the protocol's pairing and roll-out."""
    return FitSpec(n_delays, rank, tikhonov, constant, config.pairing, config.exact_rollout,
                   observable_kind="learned", latent_dims=config.learned_latent,
                   n_steps=config.learned_steps, seed=config.seed)


def check_learned(config: ExperimentConfig) -> None:
    """Refuse learned settings a layer of ``config.widths`` cannot take (a latent size above 4x
    its width) before any training, instead of after the base model and the scaling."""
    if "learned" in config.observables:
        observable = learned_spec(config, 0, False).observable()
        for layer in config.layers:
            if 1 <= layer < len(config.widths) - 1:  # other layers: scale_layer refuses them
                observable.nonlinear_macs(config.widths[layer])


def learned_fits(config: ExperimentConfig, scaled: ScaledMLP, train_states: torch.Tensor,
                 progress: bool = False) -> Iterator[tuple[FitSpec, DMD, KoopmanHybrid]]:
    """(spec, fitted DMD, hybrid) for every (h, constant, rank, tikhonov) of the grid.

    ``train_states`` [B, T, W]: the training trajectories of ``scaled``. A (rank, Tikhonov)
    the lifted data cannot support is skipped (logged), as in the delay sweep.
    """
    grid = [(h, constant) for h in config.delays for constant in config.constants
            if h <= train_states.shape[1] - 2]
    bar = tqdm(grid, desc=f"learned sweep layer {scaled.layer}", disable=not progress,
               leave=False)
    for h, constant in bar:
        observable = learned_spec(config, h, constant).observable()
        lifted = observable.fit_transform(train_states)  # [B, T - h, D]
        stats = PairStatistics.from_pairs(*snapshot_pairs(lifted))
        for rank in config.ranks:
            for tikhonov in config.tikhonovs:
                spec = learned_spec(config, h, constant, rank, tikhonov)
                try:
                    dmd = spec.dmd().fit_statistics(stats)
                except ValueError as err:
                    log.info("skipping learned layer %d h=%d rank=%s: %s", scaled.layer, h,
                             rank, err)
                    continue
                yield spec, dmd, KoopmanHybrid.from_dmd(scaled, observable, dmd)
