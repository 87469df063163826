"""``affine_fit`` on a rank-deficient design: singular values below rcond * s_max of the
centred design (rcond = sqrt(n_features) * eps of the data's dtype) are dropped, so a duplicate
column, or one that is a combination of others up to float32 rounding (flattened ViT tokens
are an affine image of fewer pixels), gives the finite minimum-norm map instead of one that
amplifies the rounding."""

from __future__ import annotations

import torch

from koopnet.lab import vit
from koopnet.lab.residual import affine_fit


def design(n: int, seed: int, dtype: torch.dtype):
    """Independent columns Z [n, 4] (float64) and Y = Z A + c + noise [n, 3]."""
    g = torch.Generator().manual_seed(seed)
    Z = torch.randn(n, 4, generator=g, dtype=torch.float64).to(dtype).to(torch.float64)
    A = torch.arange(12, dtype=torch.float64).reshape(4, 3) / 10
    Y = Z @ A + 2.0 + 0.01 * torch.randn(n, 3, generator=g, dtype=torch.float64)
    return Z, Y


def mse(weight, bias, X, Y) -> float:
    return float(((X.double() @ weight.T + bias - Y) ** 2).mean())


def test_a_duplicate_column_gives_the_minimum_norm_map():
    Z, Y = design(200, 0, torch.float64)
    Z_held, Y_held = design(200, 1, torch.float64)
    full, full_bias = affine_fit(Z, Y)  # [3, 4]
    X = torch.cat([Z, Z[:, :1]], 1)  # column 0 twice: exactly rank-deficient
    weight, bias = affine_fit(X, Y)
    assert torch.isfinite(weight).all()
    # minimum norm: column 0's weight shared equally between its two copies
    expected = torch.cat([full[:, :1] / 2, full[:, 1:], full[:, :1] / 2], 1)
    torch.testing.assert_close(weight, expected, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(bias, full_bias, rtol=1e-9, atol=1e-12)
    X_held = torch.cat([Z_held, Z_held[:, :1]], 1)
    assert abs(mse(weight, bias, X_held, Y_held) - mse(full, full_bias, Z_held, Y_held)) < 1e-12


def test_a_column_that_is_a_combination_up_to_float32_rounding_is_not_amplified():
    """float32 states: the last column is z0 + 2 z1 computed in float32, so the centred design
    has one singular value at the float32 rounding level; the fit must not invert it."""
    def states(seed):
        Z, Y = design(300, seed, torch.float32)
        Z32 = Z.float()
        return torch.cat([Z32, Z32[:, :1] + 2 * Z32[:, 1:2]], 1), Z, Y  # [n, 5] float32

    X, Z, Y = states(0)
    X_held, Z_held, Y_held = states(1)
    weight, bias = affine_fit(X, Y)
    full, full_bias = affine_fit(Z, Y)
    assert torch.isfinite(weight).all() and weight.norm() < 2 * full.norm()
    held, reference = mse(weight, bias, X_held, Y_held), mse(full, full_bias, Z_held, Y_held)
    assert abs(held - reference) < 1e-6 * reference


def test_the_vit_flattened_profile_of_s0_is_not_blown_up():
    """s_0 of the ViT, flattened to 17*64 features, is an affine image of 784 pixels: with
    more samples than pixels, a solve that keeps the rounding-level singular values gives a
    map of huge norm whose held-out R^2 collapses."""
    torch.manual_seed(0)
    model = vit.ViT(depth=1).eval()
    pixels = torch.rand(1100, 784, generator=torch.Generator().manual_seed(1))
    states = vit.vit_states(model, pixels)  # [1100, 2, 17, 64]
    (row,) = vit.linearity_profile(model, states[:900], states[900:],
                                   torch.zeros(200, dtype=torch.int64))
    assert row["ls_r2_flat"] > 0.9
    flat = vit.view(states[:900], "flat")  # [900, 2, 1088]
    weight, _ = affine_fit(flat[:, 0], flat[:, 1])
    assert weight.norm() < 1e3
