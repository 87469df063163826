"""How the learned lifting of ``koopnet reproduce resmlp-mnist`` was chosen (validation only).

Trains the seed's residual MLP exactly as the reproduction does, lifts the last ``--span``
blocks' training states with a :class:`koopnet.learned.LearnedObservable` of the given shape,
refits the DMD in closed form for each Tikhonov value and prints the validation accuracy of
each hybrid as one JSON line. ``--task W`` adds a logit-matching term: the KL divergence
between the frozen head's outputs on the rolled-out last state and on the true one.

    OMP_NUM_THREADS=1 python benchmarks/resmlp_lifting_choice.py --data-dir D --span 4 \
        --latent 256 --hidden 256 --steps 600
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch import nn

from koopnet.depth import DepthHybrid
from koopnet.dmd import DMD, PairStatistics
from koopnet.io.datasets import idx_splits
from koopnet.lab import residual
from koopnet.lab.recipes import RESMLP_MNIST_RECIPE
from koopnet.learned import LearnedObservable
from koopnet.models import accuracy
from koopnet.observables import snapshot_pairs


class _TaskLifting(LearnedObservable):
    """The Koopman-autoencoder losses plus ``task`` x KL(head(s_T) || head(rolled-out s_T))."""

    head: nn.Module
    task = 0.0

    def _loss(self, delay, k_max, generator):
        base = super()._loss(delay, k_max, generator)
        if not self.task:
            return base
        lifted = self._lift(delay, self._encode(delay))  # [b, T', D]
        D = lifted.shape[2]
        X, Y = lifted[:, :-1].reshape(-1, D).double(), lifted[:, 1:].reshape(-1, D).double()
        gram = X.T @ X
        eye = torch.eye(D, dtype=gram.dtype)
        K = torch.linalg.solve(gram + self.ridge * gram.diagonal().mean() * eye, X.T @ Y).float()
        g = lifted[:, 0]
        for _ in range(lifted.shape[1] - 1):
            g = g @ K
        width = delay.shape[2]
        with torch.no_grad():
            target = torch.log_softmax(self.head(delay[:, -1]), -1)
        predicted = torch.log_softmax(self.head(g[:, :width]), -1)
        return base + self.task * (target.exp() * (target - predicted)).sum(-1).mean()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--span", type=int, default=4)
    p.add_argument("--latent", type=int, default=256)
    p.add_argument("--hidden", type=int, default=256, help="0: one layer psi")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--task", type=float, default=0.0)
    a = p.parse_args()
    torch.set_num_threads(1)
    splits = idx_splits(a.data_dir, name="mnist", n_val=None, seed=a.seed)
    torch.manual_seed(a.seed)
    model = residual.ResidualMLP(784, 256, 4, 10)
    residual.train_residual(model, splits.train.X, splits.train.y, RESMLP_MNIST_RECIPE,
                            seed=a.seed)
    model.eval()
    names = residual.block_names(model)
    h = len(names) - a.span
    sub = residual.depth_states(model, splits.train.X[:20000])[:, h:]  # [N, span+1, W]
    start = time.perf_counter()
    lifting = _TaskLifting(0, latent_dims=a.latent, hidden=a.hidden, seed=a.seed,
                           **{**residual.LIFTING, "n_steps": a.steps})
    lifting.head, lifting.task = nn.Sequential(model.norm, model.head).requires_grad_(False), a.task
    lifting.fit(sub)
    stats = PairStatistics.from_pairs(*snapshot_pairs(lifting.transform(sub.double())))
    out = {**vars(a), "train_s": round(time.perf_counter() - start, 1),
           "original_val": accuracy(model, splits.val.X, splits.val.y)}
    for tikhonov in (0.0, 1e-6, 1e-4):
        dmd = DMD(None, tikhonov=tikhonov, exact_rollout=True).fit_statistics(stats)
        hybrid = DepthHybrid(model, names[h:], lifting, dmd).eval()
        out[f"val_tik{tikhonov}"] = accuracy(hybrid, splits.val.X, splits.val.y)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
