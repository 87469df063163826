"""One fit specification: how a trajectory becomes a linear operator.

``FitSpec`` is the single description of a DMD fit that ``linearize``, ``fit_hybrid``, the
staged ``koopnet fit``, the streamed file fit and the sweeps all take, so a setting means the
same thing wherever it is written down (and ``as_dict`` is what results files record).

>>> spec = FitSpec(n_delays=3, rank=0.99, constant=True)
>>> spec.observable().n_delays, spec.dmd().rank
(3, 0.99)
>>> learned = FitSpec(n_delays=2, observable_kind="learned", latent_dims=4).observable()
>>> type(learned).__name__, learned.latent_dims
('LearnedObservable', 4)
>>> FitSpec(pairing="paper")
Traceback (most recent call last):
...
ValueError: pairing='paper' must be 'trajectory' or 'concatenated'.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from koopnet._checks import check_choice, check_float, check_int, check_rank
from koopnet.dmd import DMD
from koopnet.learned import LearnedObservable
from koopnet.observables import TimeDelay

PAIRINGS = ("trajectory", "concatenated")
#: what lifts the states: delay coordinates, or delay coordinates plus a learned encoder psi
OBSERVABLE_KINDS = ("delay", "learned")
#: the settings that only a learned observable reads
LEARNED_OPTIONS = ("latent_dims", "n_steps", "seed")


@dataclass(frozen=True)
class FitSpec:
    """Settings of one delay-DMD fit, validated on construction.

    Parameters
    ----------
    n_delays : int
        Time delays h; the hybrid runs h inserted blocks and T-1-h linear steps.
    rank : None, int or float
        See :class:`koopnet.dmd.DMD`.
    tikhonov : float
        Relative Tikhonov damping (lambda = tikhonov * S_max^2).
    constant : bool
        Append the constant observable 1 (an affine operator).
    pairing : {"trajectory", "concatenated"}
        Snapshot pairs inside each trajectory, or the paper's one concatenated series
        (windows cross from one sample into the next).
    exact_rollout : bool
        Step with the exact-DMD operator instead of the projected one (see ``DMD``).
    observable_kind : {"delay", "learned"}
        Delay coordinates alone, or the delay vector plus a learned encoder psi
        (:class:`koopnet.learned.LearnedObservable`, trained on the fit's trajectories).
    latent_dims, n_steps, seed
        The learned observable's latent dimension r (None: the layer width; at most 4x it),
        training steps and seed; ignored by delay fits (and absent from their ``as_dict``, so
        delay fits record the same keys as before learned observables existed).
    """

    n_delays: int = 10
    rank: int | float | None = None
    tikhonov: float = 0.0
    constant: bool = False
    pairing: str = "trajectory"
    exact_rollout: bool = False
    observable_kind: str = "delay"
    latent_dims: int | None = None
    n_steps: int = 300
    seed: int = 0

    def __post_init__(self) -> None:
        # frozen: normalised values are written through object.__setattr__
        object.__setattr__(self, "n_delays", check_int(self.n_delays, "n_delays", low=0))
        object.__setattr__(self, "rank", check_rank(self.rank))
        object.__setattr__(self, "tikhonov", check_float(self.tikhonov, "tikhonov", low=0.0))
        check_choice(self.pairing, "pairing", PAIRINGS)
        check_choice(self.observable_kind, "observable_kind", OBSERVABLE_KINDS)
        if self.latent_dims is not None:
            check_int(self.latent_dims, "latent_dims", low=1)
        check_int(self.n_steps, "n_steps", low=0)
        check_int(self.seed, "seed")
        for name in ("constant", "exact_rollout"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name}={getattr(self, name)!r} must be True or False.")

    def replace(self, **changes) -> FitSpec:
        """A copy with ``changes`` applied (and validated)."""
        return dataclasses.replace(self, **changes)

    def observable(self) -> TimeDelay | LearnedObservable:
        """The (unfitted) observable of this spec."""
        if self.observable_kind == "learned":
            return LearnedObservable(self.n_delays, constant=self.constant,
                                     latent_dims=self.latent_dims, n_steps=self.n_steps,
                                     seed=self.seed)
        return TimeDelay(self.n_delays, constant=self.constant)

    def dmd(self) -> DMD:
        """The (unfitted) DMD of this spec."""
        return DMD(self.rank, tikhonov=self.tikhonov, exact_rollout=self.exact_rollout)

    def as_dict(self) -> dict:
        values = dataclasses.asdict(self)
        if self.observable_kind == "delay":
            for key in ("observable_kind", *LEARNED_OPTIONS):
                del values[key]
        return values
