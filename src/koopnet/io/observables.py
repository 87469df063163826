"""The observable of a saved hybrid: its settings in the JSON, its learned weights as tensors.

A :class:`~koopnet.observables.TimeDelay` is described by its settings alone (the JSON entry is
unchanged from earlier files). A :class:`~koopnet.learned.LearnedObservable` also stores psi's
architecture (module types, sizes, activation) in the JSON and psi's weights and the input
standardisation as tensors under ``observable.*`` in the hybrid's safetensors, so a loaded
hybrid lifts bit-identically without retraining or running stored code.
"""

from __future__ import annotations

import torch

from koopnet.learned import LearnedObservable
from koopnet.observables import TimeDelay

__all__ = ["PREFIX", "observable_entry", "restore_observable"]

#: key prefix of the observable's tensors inside a hybrid's safetensors file
PREFIX = "observable."
_SETTINGS = ("latent_dims", "hidden", "activation", "encoder_input", "n_steps", "lr",
             "batch_size", "horizon", "ridge", "latent_weight", "distance_weight", "seed")


def observable_entry(observable, module_spec) -> tuple[dict, dict[str, torch.Tensor]]:
    """JSON entry and tensors of a hybrid's observable; ``module_spec`` describes psi."""
    entry = {"n_delays": observable.n_delays_, "constant": bool(observable.constant),
             "n_features_in": observable.n_features_in_}
    if type(observable) is TimeDelay:
        return {"type": "time_delay", **entry}, {}
    if type(observable) is LearnedObservable:
        settings = {key: getattr(observable, key) for key in _SETTINGS}
        tensors = {f"{PREFIX}psi.{k}": v for k, v in observable.psi_.state_dict().items()}
        tensors[f"{PREFIX}mean"], tensors[f"{PREFIX}std"] = observable.mean_, observable.std_
        return ({"type": "learned", **entry, "settings": settings,
                 "psi": module_spec(observable.psi_, "psi")}, tensors)
    raise TypeError(f"save_hybrid stores hybrids with TimeDelay or LearnedObservable "
                    f"observables; this one uses {type(observable).__name__}. Save its pieces "
                    "with save_scaled instead.")


def restore_observable(entry: dict, tensors: dict[str, torch.Tensor], build, load_state):
    """Inverse of :func:`observable_entry`; pops the observable's tensors from ``tensors``.

    ``build`` rebuilds psi from its JSON description, ``load_state`` fills it (checking names
    and shapes). Raises KeyError, TypeError or ValueError on a malformed entry.
    """
    h, width = int(entry["n_delays"]), int(entry["n_features_in"])
    kind = entry.get("type", "time_delay")
    if kind == "time_delay":
        observable = TimeDelay(h, constant=bool(entry["constant"]))
        return observable.fit(torch.zeros(1, h + 1, width))  # sets the fitted widths
    if kind != "learned":
        raise ValueError(f"unknown observable type {kind!r}")
    own = {key: tensors.pop(key) for key in [k for k in tensors if k.startswith(PREFIX)]}
    psi_tensors = {k.removeprefix(f"{PREFIX}psi."): v for k, v in own.items()
                   if k.startswith(f"{PREFIX}psi.")}
    observable = LearnedObservable(h, constant=bool(entry["constant"]), **entry["settings"])
    psi = load_state(build(entry["psi"], "psi"), psi_tensors, "observable psi")
    return observable._restore(width, psi, own[f"{PREFIX}mean"], own[f"{PREFIX}std"])
