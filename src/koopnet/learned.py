"""A learned observable: the delay vector plus a small encoder psi trained as a Koopman autoencoder.

``LearnedObservable(n_delays=h)`` lifts each window of states to
g_t = [s_t, s_{t-1}, ..., s_{t-h}, psi(z_t), (1)], z_t the delay vector standardised with the
training mean and deviation, psi an MLP R^{W(h+1)} -> R^r. Because the delay vector stays inside
g, the read-out back to neurons is a selection (as for :class:`~koopnet.observables.TimeDelay`),
so a DMD fitted on g afterwards plugs into :class:`~koopnet.hybrid.KoopmanHybrid` unchanged.

psi is trained on the training trajectories with the losses of a Koopman autoencoder (Lusch et
al. 2018; Aswani and Jabari 2025), except that K is not a parameter: it is the ridge solution of
Y ~ X K on the batch's lifted pairs (float64, differentiable), so psi is trained for the
operator that DMD will fit on it afterwards. The losses are
- state prediction: the states read out of g_t K^k against s_{t+k}, k = 1..K, for every start t
  (the last state of each trajectory, the replaced layer's output, included);
- latent prediction: the psi part of g_t K^k against psi(z_{t+k});
- a mild distance-preserving term: pairwise latent distances follow the input distances, which
  keeps psi from collapsing onto a constant (the trivially predictable lifting).
Each is divided by the variance of its target, so the terms are scale free. The multi-step term
is stabilised by a curriculum on k (the horizon grows from 1 to K over the first half of the
budget; a roll-out of a poorly fitted K with |lambda| > 1 explodes) and by clipping gradients.

The latent dimension is limited to 4x the layer width: a wide enough linear system realises any
finite trajectory (a shift register), and then K memorises the trajectory instead of describing
it. psi is nonlinear work: :meth:`LearnedObservable.nonlinear_macs` counts it, so a hybrid can
charge the encoder as the inserted blocks it costs.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from tqdm.auto import tqdm

from koopnet._checks import as_tensor, check_choice, check_float, check_int, check_is_fitted
from koopnet.observables import TimeDelay

__all__ = ["ACTIVATIONS", "ENCODER_INPUTS", "MAX_LATENT_RATIO", "LearnedObservable",
           "PsiFollowsDevice"]

#: the most latent dimensions per neuron of the layer (see the module docs)
MAX_LATENT_RATIO = 4
#: what psi reads: the whole delay vector, or only the newest state (W inputs: cheaper)
ENCODER_INPUTS = ("delay", "state")
ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU, "gelu": nn.GELU}


class LearnedObservable:
    """Delay vector plus a learned encoder psi; the interface of the EDMD dictionaries.

    Parameters: ``n_delays`` h; ``latent_dims`` r (None: the layer width W; at most 4 W);
    ``hidden`` width of psi's hidden layer (None: 2 r; 0: no hidden layer, psi = act(z A + b));
    ``activation`` of psi ('tanh', 'relu', 'gelu'); ``encoder_input`` 'delay' (psi reads the
    delay vector, W (h+1) inputs) or 'state' (the newest state only, W inputs: an encoder whose
    cost does not grow with h); ``constant`` appends 1; ``n_steps`` Adam steps; ``lr``;
    ``batch_size`` trajectories per step (None: full batch); ``horizon`` K, the longest
    roll-out in the state loss (None: every step of the trajectory); ``ridge`` Tikhonov term
    of the batch's K, relative to the mean squared lifted coordinate; ``latent_weight`` and
    ``distance_weight`` weigh the latent and distance terms against the state term; ``seed``;
    ``progress`` shows a bar.
    Shape: states [B, T, W] -> lifted [B, T - h, D], D = W (h + 1) + r (+1).

    >>> obs = LearnedObservable(1, latent_dims=2, n_steps=2).fit(torch.randn(4, 5, 3))
    >>> obs.transform(torch.randn(4, 5, 3)).shape
    torch.Size([4, 4, 8])
    """

    def __init__(self, n_delays: int = 0, *, latent_dims: int | None = None,
                 hidden: int | None = None, activation: str = "tanh",
                 encoder_input: str = "delay", constant: bool = False,
                 n_steps: int = 300, lr: float = 1e-2, batch_size: int | None = 256,
                 horizon: int | None = None, ridge: float = 1e-4, latent_weight: float = 0.1,
                 distance_weight: float = 0.01, seed: int = 0, progress: bool = False) -> None:
        self.n_delays = n_delays
        self.latent_dims = latent_dims
        self.hidden = hidden
        self.activation = activation
        self.encoder_input = encoder_input
        self.constant = constant
        self.n_steps = n_steps
        self.lr = lr
        self.batch_size = batch_size
        self.horizon = horizon
        self.ridge = ridge
        self.latent_weight = latent_weight
        self.distance_weight = distance_weight
        self.seed = seed
        self.progress = progress

    # ---------------------------------------------------------------- architecture

    def _sizes(self, width: int) -> tuple[int, int, int]:
        """(input, hidden, latent) sizes of psi for a layer of ``width`` neurons, validated."""
        h = check_int(self.n_delays, "n_delays", low=0)
        limit = MAX_LATENT_RATIO * width
        r = width if self.latent_dims is None else check_int(self.latent_dims, "latent_dims",
                                                             low=1)
        if r > limit:
            raise ValueError(f"latent_dims={r} exceeds {MAX_LATENT_RATIO}x the layer width "
                             f"({MAX_LATENT_RATIO} x {width} = {limit}): a lifting that wide can "
                             "memorise the trajectory instead of describing it. Lower "
                             f"latent_dims to <= {limit}.")
        hidden = 2 * r if self.hidden is None else check_int(self.hidden, "hidden", low=0)
        source = check_choice(self.encoder_input, "encoder_input", ENCODER_INPUTS)
        return width * (h + 1 if source == "delay" else 1), hidden, r

    def nonlinear_macs(self, width: int | None = None) -> int:
        """Multiply-adds of psi per lifted sample: the encoder's nonlinear work.

        ``width``: the layer width W (default: the fitted one), so the cost is known before
        fitting. Compare with W^2, the multiply-adds of one inserted block.
        """
        if width is None:
            check_is_fitted(self, "psi_")
            width = self.n_features_in_
        n_in, hidden, r = self._sizes(check_int(width, "width", low=1))
        return n_in * hidden + hidden * r if hidden else n_in * r

    def build_psi(self, width: int) -> nn.Sequential:
        """An untrained psi for a layer of ``width`` neurons, on the CPU (weights drawn from the
        global CPU RNG, so they are the same whatever device psi moves to; ``fit`` draws them
        under ``seed``)."""
        n_in, hidden, r = self._sizes(width)
        act = ACTIVATIONS[check_choice(self.activation, "activation", tuple(ACTIVATIONS))]
        if not hidden:
            return nn.Sequential(nn.Linear(n_in, r, device="cpu"), act())
        return nn.Sequential(nn.Linear(n_in, hidden, device="cpu"), act(),
                             nn.Linear(hidden, r, device="cpu"), act())

    # ---------------------------------------------------------------- fit / transform

    def fit(self, states: torch.Tensor) -> LearnedObservable:
        states = as_tensor(states, "states", ndim=3)
        self._check_training()
        self._delay = TimeDelay(check_int(self.n_delays, "n_delays", low=0)).fit(states)
        width = states.shape[2]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            psi = self.build_psi(width).to(states.device)
        delay = self._delay.transform(states).to(torch.float32)  # [B, T', W(h+1)]
        if delay.shape[1] < 2:
            raise ValueError(f"n_delays={self.n_delays} leaves {delay.shape[1]} window per "
                             "trajectory; training psi needs at least 2. Lower n_delays.")
        n_in = self._sizes(width)[0]
        flat = delay[..., :n_in].reshape(-1, n_in)
        mean, std = flat.mean(0), flat.std(0, correction=0)
        std[std < 1e-6] = 1.0  # constant inputs (padding, dead units) stay unscaled
        self._restore(states.shape[2], psi, mean, std)
        self._train(delay)
        return self

    def _restore(self, width: int, psi: nn.Sequential, mean: torch.Tensor,
                 std: torch.Tensor) -> LearnedObservable:
        """Set the fitted state (used by ``fit`` and by loading a saved hybrid)."""
        self.n_delays_ = check_int(self.n_delays, "n_delays", low=0)
        if not hasattr(self, "_delay"):
            self._delay = TimeDelay(self.n_delays_).fit(
                torch.zeros(1, self.n_delays_ + 1, width, device=mean.device))
        self.n_features_in_ = width
        self.latent_dims_ = self._sizes(width)[2]
        self.psi_ = psi.requires_grad_(False).eval()
        self.mean_, self.std_ = mean, std
        self.n_output_features_ = self.lifted_width(width)
        return self

    def lifted_width(self, width: int) -> int:
        """Lifted features (delays, psi's r outputs, constant) of states ``width`` wide, known
        before any fit (rank checks)."""
        h = check_int(self.n_delays, "n_delays", low=0)
        return width * (h + 1) + self._sizes(width)[2] + int(self.constant)

    def _check_training(self) -> None:
        check_int(self.n_steps, "n_steps", low=0)
        check_float(self.lr, "lr", low=0.0)
        check_float(self.ridge, "ridge", low=0.0)
        check_float(self.latent_weight, "latent_weight", low=0.0)
        check_float(self.distance_weight, "distance_weight", low=0.0)
        check_int(self.seed, "seed")
        if self.batch_size is not None:
            check_int(self.batch_size, "batch_size", low=1)
        if self.horizon is not None:
            check_int(self.horizon, "horizon", low=1)

    def _encode(self, delay: torch.Tensor) -> torch.Tensor:
        """psi of the standardised delay vector (or newest state), computed where psi lives
        and returned on the delay vector's device. Shape: [..., W(h+1)] -> [..., r]."""
        inputs = delay[..., :len(self.mean_)].to(self.mean_.device, self.mean_.dtype)
        return self.psi_((inputs - self.mean_) / self.std_).to(delay.device)

    def _lift(self, delay: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
        parts = [delay, latent.to(delay.dtype)]
        if self.constant:
            parts.append(delay.new_ones(*delay.shape[:-1], 1))
        return torch.cat(parts, dim=-1)

    def transform(self, states: torch.Tensor) -> torch.Tensor:
        check_is_fitted(self, "psi_")
        delay = self._delay.transform(states)  # [B, T', W(h+1)]; checks width and length
        with torch.no_grad():
            return self._lift(delay, self._encode(delay))  # [B, T', D]

    def fit_transform(self, states: torch.Tensor) -> torch.Tensor:
        return self.fit(states).transform(states)

    def to(self, device: torch.device | str) -> LearnedObservable:
        """Move psi and its standardisation to ``device``, in place as ``nn.Module.to``: a
        hybrid that moves takes its psi along, so psi runs where the states are."""
        check_is_fitted(self, "psi_")
        self.psi_.to(device)
        self.mean_, self.std_ = self.mean_.to(device), self.std_.to(device)
        return self

    def readout(self, n_out: int | None = None) -> torch.Tensor:
        """Selection of the newest state's first ``n_out`` neurons, on psi's device.
        Shape: [n_out, D]."""
        check_is_fitted(self, "psi_")
        n_out = self.n_features_in_ if n_out is None else n_out
        return torch.eye(n_out, self.n_output_features_, dtype=torch.float64,
                         device=self.mean_.device)

    def feature_names(self) -> list[str]:
        check_is_fitted(self, "psi_")
        names = self._delay.feature_names() + [f"psi{i}" for i in range(self.latent_dims_)]
        return [*names, "1"] if self.constant else names

    # ---------------------------------------------------------------- training

    def _train(self, delay: torch.Tensor) -> None:
        """Adam on psi with the losses of the module docs. Mini-batches are drawn from a CPU
        generator (the same batches on every device). Shape: delay [B, T', W(h+1)]."""
        psi = self.psi_.requires_grad_(True).train()
        generator = torch.Generator().manual_seed(self.seed)
        n_traj, n_windows = delay.shape[:2]
        horizon = n_windows - 1 if self.horizon is None else min(self.horizon, n_windows - 1)
        batch = n_traj if self.batch_size is None else min(self.batch_size, n_traj)
        optimizer = torch.optim.Adam(psi.parameters(), lr=self.lr)
        steps = self.n_steps
        for step in tqdm(range(steps), desc="learned observable", disable=not self.progress,
                         leave=False):
            # curriculum: the horizon grows from 1 to K over the first half of the budget
            k_max = max(1, min(horizon, 1 + (2 * step * horizon) // max(steps, 1)))
            index = torch.randperm(n_traj, generator=generator, device="cpu")[:batch]
            loss = self._loss(delay[index.to(delay.device)], k_max, generator)
            optimizer.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(psi.parameters(), 1.0)
            optimizer.step()
        self.psi_ = psi.requires_grad_(False).eval()
        self.training_loss_ = float(loss.detach()) if steps else None

    def _loss(self, delay: torch.Tensor, k_max: int, generator: torch.Generator) -> torch.Tensor:
        latent = self._encode(delay)  # [b, T', r]
        lifted = self._lift(delay, latent)  # [b, T', D]
        D = lifted.shape[2]
        X = lifted[:, :-1].reshape(-1, D).double()
        Y = lifted[:, 1:].reshape(-1, D).double()
        gram = X.T @ X
        lam = self.ridge * gram.diagonal().mean() + 1e-12
        eye = torch.eye(D, dtype=gram.dtype, device=gram.device)
        K = torch.linalg.solve(gram + lam * eye, X.T @ Y).float()
        n_state = delay.shape[2]
        state_var = delay.var(dim=(0, 1), correction=0).sum() + 1e-8
        latent_var = latent.detach().var(dim=(0, 1), correction=0).sum() + 1e-8
        state_loss = latent_loss = delay.new_zeros(())
        rolled = lifted
        for k in range(1, k_max + 1):
            rolled = rolled[:, :-1] @ K  # predictions of g_{t+k} from every start t
            target = lifted[:, k:]
            state_loss = state_loss + ((rolled[..., :n_state] - target[..., :n_state]) ** 2
                                       ).sum(-1).mean() / state_var
            latent_loss = latent_loss + ((rolled[..., n_state:n_state + latent.shape[2]]
                                          - latent[:, k:]) ** 2).sum(-1).mean() / latent_var
        flat_z = ((delay[..., :len(self.mean_)] - self.mean_) / self.std_
                  ).reshape(-1, len(self.mean_))
        pick = torch.randperm(len(flat_z), generator=generator, device="cpu")[:256]
        pick = pick.to(flat_z.device)
        d_in = torch.cdist(flat_z[pick], flat_z[pick])
        d_out = torch.cdist(latent.reshape(-1, latent.shape[2])[pick],
                            latent.reshape(-1, latent.shape[2])[pick])
        distance = ((d_out / (d_out.mean() + 1e-8) - d_in / (d_in.mean() + 1e-8)) ** 2).mean()
        return (state_loss + self.latent_weight * latent_loss) / k_max + (
            self.distance_weight * distance)

    def __repr__(self) -> str:
        return (f"LearnedObservable(n_delays={self.n_delays}, latent_dims={self.latent_dims}, "
                f"hidden={self.hidden}, activation={self.activation!r}, "
                f"encoder_input={self.encoder_input!r}, "
                f"constant={self.constant}, n_steps={self.n_steps}, seed={self.seed})")


class PsiFollowsDevice:
    """Mixin for a hybrid module holding ``observable`` and a ``linear_map`` buffer: ``.to()``,
    ``.cuda()`` and ``.cpu()`` move the buffers, and a learned observable's psi, which is not
    a submodule, follows the map to its device (the hybrid's own copy of it, from
    ``_own_observable`` in its constructor)."""

    observable: object
    linear_map: torch.Tensor

    @staticmethod
    def _own_observable(observable, device: torch.device):
        """The observable a hybrid keeps: a learned one is deep-copied onto ``device``, so that
        moving the hybrid moves its own psi and never the caller's; a TimeDelay is shared."""
        if isinstance(observable, LearnedObservable):
            return copy.deepcopy(observable).to(device)
        return observable

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        if isinstance(self.observable, LearnedObservable):
            self.observable.to(self.linear_map.device)
        return self
