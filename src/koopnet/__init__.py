"""koopnet: replace layers of trained networks with linear Koopman operators.

The public API is importable from here; each name loads its module on first use, so
``import koopnet`` stays cheap (the command line imports only what a subcommand needs).

>>> import koopnet
>>> koopnet.ScaledModel is koopnet.ScaledMLP
True
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from koopnet._version import __version__

# public name -> (module, attribute)
_EXPORTS: dict[str, tuple[str, str]] = {
    **{name: ("koopnet.io.datasets", name)
       for name in ("make_yinyang", "yinyang_splits", "idx_splits", "Split", "DataSplits")},
    **{name: ("koopnet.models", name)
       for name in ("build_mlp", "train_classifier", "TrainConfig", "accuracy")},
    "scale_layer": ("koopnet.scaling", "scale_layer"),
    "FitSpec": ("koopnet.spec", "FitSpec"),
    "ScaledMLP": ("koopnet.scaling", "ScaledMLP"),
    "ScaledModel": ("koopnet.scaling", "ScaledMLP"),  # the name the issue and docs use
    "collect_trajectories": ("koopnet.trajectories", "collect_trajectories"),
    "Trajectories": ("koopnet.trajectories", "Trajectories"),
    "TimeDelay": ("koopnet.observables", "TimeDelay"),
    "DMD": ("koopnet.dmd", "DMD"),
    "KoopmanHybrid": ("koopnet.hybrid", "KoopmanHybrid"),
    "KoopmanTarget": ("koopnet.submodule", "KoopmanTarget"),
    "linearize": ("koopnet.linearization", "linearize"),
    "fit_hybrid": ("koopnet.linearization", "fit_hybrid"),
    **{name: ("koopnet.depth", name) for name in ("linearize_depth", "DepthHybrid")},
    **{name: ("koopnet.editing", name)
       for name in ("edit_modes", "mode_attribution", "abs_below", "near_frequency")},
    "forget_class": ("koopnet.forgetting", "forget_class"),
    "LearnedObservable": ("koopnet.learned", "LearnedObservable"),
    "ScalingSpec": ("koopnet.scaling", "ScalingSpec"),
    **{name: ("koopnet.io.serialize", name)
       for name in ("save_model", "load_model", "load_model_files", "save_scaled", "load_scaled",
                    "save_hybrid", "load_hybrid")},
    **{name: ("koopnet.io.depth", name) for name in ("save_depth_hybrid", "load_depth_hybrid")},
    "ArtifactError": ("koopnet.io.artifacts", "ArtifactError"),
    "NotFittedError": ("koopnet._checks", "NotFittedError"),
}

__all__ = [  # spelled out so linters see it; a test checks it equals _EXPORTS
    "DMD", "ArtifactError", "DataSplits", "DepthHybrid", "FitSpec", "KoopmanHybrid",
    "KoopmanTarget", "LearnedObservable", "NotFittedError", "ScaledMLP", "ScaledModel",
    "ScalingSpec", "Split", "TimeDelay", "TrainConfig", "Trajectories", "__version__", "abs_below",
    "accuracy", "build_mlp", "collect_trajectories", "edit_modes", "fit_hybrid", "forget_class",
    "idx_splits", "linearize", "linearize_depth", "load_depth_hybrid", "load_hybrid", "load_model",
    "load_model_files", "load_scaled", "make_yinyang", "mode_attribution", "near_frequency",
    "save_depth_hybrid", "save_hybrid", "save_model", "save_scaled", "scale_layer",
    "train_classifier", "yinyang_splits",
]

if TYPE_CHECKING:  # static analysers see the real objects
    from koopnet._checks import NotFittedError
    from koopnet.depth import DepthHybrid, linearize_depth
    from koopnet.dmd import DMD
    from koopnet.editing import (
        abs_below,
        edit_modes,
        mode_attribution,
        near_frequency,
    )
    from koopnet.forgetting import forget_class
    from koopnet.hybrid import KoopmanHybrid
    from koopnet.io.artifacts import ArtifactError
    from koopnet.io.datasets import DataSplits, Split, idx_splits, make_yinyang, yinyang_splits
    from koopnet.io.depth import load_depth_hybrid, save_depth_hybrid
    from koopnet.io.serialize import (
        load_hybrid,
        load_model,
        load_model_files,
        load_scaled,
        save_hybrid,
        save_model,
        save_scaled,
    )
    from koopnet.learned import LearnedObservable
    from koopnet.linearization import fit_hybrid, linearize
    from koopnet.models import TrainConfig, accuracy, build_mlp, train_classifier
    from koopnet.observables import TimeDelay
    from koopnet.scaling import ScaledMLP, ScalingSpec, scale_layer
    from koopnet.scaling import ScaledMLP as ScaledModel
    from koopnet.spec import FitSpec
    from koopnet.submodule import KoopmanTarget
    from koopnet.trajectories import Trajectories, collect_trajectories


def __getattr__(name: str):
    try:
        module, attribute = _EXPORTS[name]
    except KeyError:
        try:  # a submodule, e.g. koopnet.lab after a plain `import koopnet`
            return importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"{__name__}.{name}":
                raise
        raise AttributeError(f"module 'koopnet' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
