"""The "scaling variant" ablation of ``koopnet study``: the same layer scaled with each
:class:`~koopnet.scaling.ScalingSpec` (residual or weight-tied inserts, step and DMD-residual
penalties) and swept like the main run, to see which scaling leaves a trajectory that one linear
operator describes over more steps."""

from __future__ import annotations

from koopnet.lab.protocols import select, sweep_layer
from koopnet.models import accuracy
from koopnet.scaling import ScalingSpec, scale_layer

#: (label, spec) of each variant; the penalty weights are those benchmarks/scaling_variants.py
#: ran on every seed (its smaller weights only partly ran); near-identity init so that every
#: variant starts alike
SCALING_VARIANTS = (
    ("plain", ScalingSpec()),
    ("step penalty", ScalingSpec(step_penalty=1e-2)),
    ("DMD one-step", ScalingSpec(dmd_penalty=1e-2)),
    ("DMD multi-step", ScalingSpec(dmd_penalty=1e-2, dmd_steps=4, dmd_delays=1)),
    ("residual", ScalingSpec("residual")),
    ("tied", ScalingSpec("tied")),
)


def scaling_variant_rows(config, variants, model, layer: int, data, seed: int,
                         n_inserted: int = 10) -> list[tuple[str, dict, dict]]:
    """For each (label, spec): scale ``layer`` of ``model`` with the spec (near-identity init,
    one attempt), run the protocol's sweep with ``config``'s grid and return (label, the
    validation-chosen sweep row, the scaled network's accuracies, whether scaling met its
    tolerance and the linear depth at 0.5 point on validation and on test)."""
    original = {"val": accuracy(model, data.val.X, data.val.y),
                "test": accuracy(model, data.test.X, data.test.y)}
    out = []
    for label, spec in variants:
        scaled, report = scale_layer(model, layer, data.scaling.X, data.scaling.y,
                                     n_inserted=n_inserted, init="identity",
                                     config=config.scaling, seed=seed + layer, retries=0,
                                     spec=spec)
        rows = sweep_layer(config, scaled, data, False)[0]
        best = select(rows)
        extra = {"scaling_ok": report.ok, "spec": spec.to_dict(),
                 **{f"{split}_linear_depth": linear_depth(rows, original[split], split)
                    for split in ("val", "test")},
                 "val_scaled_accuracy": accuracy(scaled, data.val.X, data.val.y),
                 "test_scaled_accuracy": accuracy(scaled, data.test.X, data.test.y)}
        out.append((label, best, extra))
    return out


def linear_depth(rows: list[dict], original: float, split: str = "test",
                 margin: float = 0.005) -> int:
    """Largest number of linear steps whose validation-chosen row keeps ``split`` accuracy
    within ``margin`` of the original's (0 if none does)."""
    depths = [0]
    for steps in {r["linear_steps"] for r in rows}:
        best = select([r for r in rows if r["linear_steps"] == steps])
        if best[f"{split}_accuracy"] >= original - margin:
            depths.append(steps)
    return max(depths)
