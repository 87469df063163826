"""Penalties that make a scaled layer's trajectory easier to linearise (see
:class:`koopnet.scaling.ScalingSpec`): the size of each step and the residual of a DMD fitted in
closed form on the batch, both differentiable so the inserted blocks train against them."""

from __future__ import annotations

import torch
from torch import nn

STATE_PAD = -1.0  # pads the narrower states, as in koopnet.trajectories


def stack_states(states: list[torch.Tensor], pad_value: float = STATE_PAD) -> torch.Tensor:
    """Stack states of possibly different widths, right-padded as the trajectories are.

    Shape: T x [B, w_t] -> [B, T, max w_t].
    """
    width = max(s.shape[1] for s in states)
    return torch.stack([nn.functional.pad(s, (0, width - s.shape[1]), value=pad_value)
                        for s in states], dim=1)


def step_penalty(states: torch.Tensor) -> torch.Tensor:
    """sum_t ||s_{t+1} - s_t||^2, mean over the batch, divided by the batch's mean ||s_0||^2.

    Zero for a constant trajectory; small steps make each state close to the one before, so a
    low-order linear model of the trajectory has less to describe. Shape: [B, T, w] -> [].
    """
    scale = states[:, 0].pow(2).sum(1).mean().detach().clamp_min(1e-12)
    return states.diff(dim=1).pow(2).sum((1, 2)).mean() / scale


def delay_lift(states: torch.Tensor, n_delays: int) -> torch.Tensor:
    """z_t = [s_t, s_{t-1}, ..., s_{t-d}] for t = d..T-1. Shape: [B, T, W] -> [B, T-d, W(d+1)]."""
    T = states.shape[1]
    return torch.cat([states[:, n_delays - j: T - j] for j in range(n_delays + 1)], dim=2)


def dmd_residual(states: torch.Tensor, *, steps: int = 1, n_delays: int = 0,
                 ridge: float = 1e-6) -> torch.Tensor:
    """Relative residual of a DMD fitted in closed form on the batch, differentiable.

    K = argmin ||Y - X K||^2 + ridge * mean(diag X^T X) ||K||^2 over the within-trajectory pairs
    (z_t, z_{t+1}) of the delay-lifted states. ``steps`` = 1: ||Y - X K||^2 / ||Y||^2. More:
    roll out m = 1..steps steps from every lifted state with K / max(1, ||K||_2) (a contraction,
    so no power can explode) and divide the summed squared errors by the summed ||z_{t+m}||^2.
    Zero for a trajectory that a linear map with spectral norm <= 1 generates exactly (up to
    the ridge). Shape: states [B, T, W] -> [].
    """
    lifted = delay_lift(states, n_delays)  # [B, T', D]
    D = lifted.shape[2]
    X, Y = lifted[:, :-1].reshape(-1, D), lifted[:, 1:].reshape(-1, D)
    gram = X.T @ X
    reg = ridge * gram.diagonal().mean().detach().clamp_min(1e-12)
    eye = torch.eye(D, dtype=X.dtype, device=X.device)
    K = torch.linalg.solve(gram + reg * eye, X.T @ Y)  # [D, D]
    if steps == 1:
        return (Y - X @ K).pow(2).sum() / Y.pow(2).sum().clamp_min(1e-12)
    K = K / torch.linalg.matrix_norm(K, ord=2).clamp_min(1.0)
    error, norm = lifted.new_zeros(()), lifted.new_zeros(())
    predicted = lifted[:, :-1]
    for m in range(1, min(steps, lifted.shape[1] - 1) + 1):
        predicted = predicted[:, : lifted.shape[1] - m] @ K  # z_t K^m for t = 0..T'-1-m
        error = error + (lifted[:, m:] - predicted).pow(2).sum()
        norm = norm + lifted[:, m:].pow(2).sum()
    return error / norm.clamp_min(1e-12)


class TrackedStack(nn.Module):
    """inserts -> replaced, keeping the states s_0..s_{N+1} of the last forward for the
    penalties. Shape: [B, w] -> [B, w']."""

    def __init__(self, inserts: nn.Sequential, replaced: nn.Sequential) -> None:
        super().__init__()
        self.inserts, self.replaced = inserts, replaced
        self.states_: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        states = [x]
        for block in self.inserts:
            states.append(block(states[-1]))
        states.append(self.replaced(states[-1]))
        self.states_ = states
        return states[-1]


def scaling_loss(spec, output: torch.Tensor, target: torch.Tensor,
                 states: list[torch.Tensor]) -> torch.Tensor:
    """Huber loss on the replaced layer's output plus the penalties of ``spec`` (a
    :class:`koopnet.scaling.ScalingSpec`) on the states s_0..s_{N+1} (a list of [B, w_t])."""
    loss = nn.functional.huber_loss(output, target)
    if spec.step_penalty > 0:
        loss = loss + spec.step_penalty * step_penalty(torch.stack(states[:-1], dim=1))
    if spec.dmd_penalty > 0:
        loss = loss + spec.dmd_penalty * dmd_residual(
            stack_states(states), steps=spec.dmd_steps, n_delays=spec.dmd_delays,
            ridge=spec.dmd_ridge)
    return loss
