"""How the learned lifting of ``koopnet reproduce vit-mnist`` was chosen (validation only).

Trains the seed's ViT exactly as the reproduction does (clean MNIST splits, the epoch kept
chosen on validation), takes the flattened depth states of the first 8000 training images,
and for the last ``--span`` blocks prints one JSON line with the validation accuracy of the
original, the flattened least-squares map, the flattened delay DMD (0 and 1 delays, each
Tikhonov value) and the learned lifting of the given shape (each Tikhonov value). The test
split is never read.

    OMP_NUM_THREADS=1 python benchmarks/vit_lifting_choice.py --data-dir D --span 2 \
        --latent 512 --hidden 128 --steps 150
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from koopnet.dmd import DMD
from koopnet.io.datasets import idx_splits
from koopnet.lab import vit
from koopnet.lab.residual import affine_fit
from koopnet.lab.vit_run import ViTConfig

TIKHONOVS = (0.0, 1e-6, 1e-4)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--span", type=int, default=2)
    p.add_argument("--latent", type=int, default=512)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--steps", type=int, default=150)
    a = p.parse_args()
    torch.set_num_threads(1)
    config = ViTConfig()
    splits = idx_splits(a.data_dir, name="mnist", n_val=None, seed=a.seed)
    torch.manual_seed(a.seed)
    model = vit.ViT(config.width, config.depth, config.heads, config.mlp_ratio)
    model, _ = vit.train_vit(model, splits.train, splits.val, epochs=config.epochs,
                             lr=config.lr, batch_size=config.batch_size,
                             weight_decay=config.weight_decay, seed=a.seed)
    states = vit.vit_states(model, splits.train.X[:config.fit_subset])
    held_states = vit.vit_states(model, splits.val.X)
    fit, held = vit.view(states, "flat"), vit.view(held_states, "flat")
    n, T1, L, d = held_states.shape
    T, y = T1 - 1, splits.val.y
    h = T - a.span

    def score(rows):  # predicted last states [n, L*d] through the head
        return vit._tail_score(model, vit.unview(rows.float(), n, L, d), T, y)

    out = {**vars(a), "original_val": vit.score(model, splits.val.X, y)}
    weight, bias = affine_fit(fit[:, h], fit[:, T])
    out["ls_flat_val"] = score(held[:, h].double() @ weight.T + bias)
    for delays in (0, 1):
        observable, stats = vit._dmd_parts(fit, h, delays)
        for tikhonov in TIKHONOVS:
            dmd = DMD(None, tikhonov=tikhonov, exact_rollout=True).fit_statistics(stats)
            out[f"dmd_flat_d{delays}_tik{tikhonov}_val"] = score(vit._predict_dmd(
                observable, vit._dmd_map(observable, dmd, a.span), held, h, delays))
    start = time.perf_counter()
    settings = {"lifting_latent": a.latent, "lifting_hidden": a.hidden,
                "lifting_steps": a.steps, "lifting_seed": a.seed}
    observable, stats = vit._lifting_parts(fit, h, settings)
    out["lifting_train_s"] = round(time.perf_counter() - start, 1)
    out["lifting_macs"], out["block_macs"] = observable.nonlinear_macs(), vit.block_macs(
        d, L, config.mlp_ratio)
    for tikhonov in TIKHONOVS:
        dmd = DMD(None, tikhonov=tikhonov, exact_rollout=True).fit_statistics(stats)
        out[f"lifting_tik{tikhonov}_val"] = score(vit._predict_dmd(
            observable, vit._dmd_map(observable, dmd, a.span), held, h, 0))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
