"""The oracle for lrnn_product: the formula in plain PyTorch, in float32 (float64 stays float64).

The backward is written out by hand (gradcheck verifies it against finite differences of `forward`): the
leave-one-out products over dbar are exclusive prefix times exclusive suffix products, never a division, so a factor
that is exactly 0 gives exact gradients."""

from __future__ import annotations

import math

import torch

from .common import accumulate_dtype


def _activation(activation, omega, z, g_params):
    """(g(z), g'(z)) for z (M, rank, dbar); g_params (3, rank, dbar, h) for "mlp"."""
    if activation == "sin":
        return torch.sin(omega * z), omega * torch.cos(omega * z)
    if activation == "spder":
        # g = sin(z) sqrt|z|; g' = cos(z) sqrt|z| + sign(z) sin(z) / (2 sqrt|z|) = sqrt|z| (cos(z) + sinc(z) / 2)
        # with sinc(z) = sin(z) / z (1 at 0): finite everywhere and exactly 0 at z = 0, the limit of g'.
        root = torch.sqrt(torch.abs(z))
        return torch.sin(z) * root, root * (torch.cos(z) + 0.5 * torch.sinc(z / math.pi))
    if activation == "arctan":
        return torch.atan(z), 1 / (1 + z * z)
    if activation == "tanh":
        t = torch.tanh(z)
        return t, 1 - t * t
    if activation == "mlp":
        a, w, c = g_params.to(z.dtype)
        g, dg = torch.zeros_like(z), torch.zeros_like(z)
        for i in range(a.shape[-1]):  # one hidden unit at a time: (M, rank, dbar) temporaries, not (..., h)
            t = torch.tanh(w[..., i] * z + c[..., i])
            g = g + a[..., i] * t
            dg = dg + a[..., i] * w[..., i] * (1 - t * t)
        return g, dg
    raise ValueError(f"unknown activation {activation!r}")


def _projections(x, weight, bias, rank, dbar):
    """z = x @ weight.T + bias as (M, rank, dbar), in the accumulate dtype."""
    compute = accumulate_dtype(x.dtype)
    z = x.to(compute) @ weight.to(compute).T
    if bias is not None:
        z = z + bias.to(compute)
    return z.view(x.shape[0], rank, dbar)


def forward(x, weight, bias, g_params, rank, dbar, activation, omega, gamma):
    """x (M, d), weight (rank * dbar, d), bias (rank * dbar,) | None, g_params (3, rank, dbar, h) | None
    -> phi (M, rank) in x's dtype, phi_l = prod_j (1 + gamma * g(z_lj))."""
    z = _projections(x, weight, bias, rank, dbar)
    g, _ = _activation(activation, omega, z, g_params)
    return torch.prod(1 + gamma * g, dim=-1).to(x.dtype)


def _exclusive_products(f):
    """For factors f (..., dbar): prod_{k != j} f_k for every j, as exclusive prefix * exclusive suffix products."""
    ones = torch.ones_like(f[..., :1])
    prefix = torch.cumprod(torch.cat([ones, f[..., :-1]], -1), -1)
    suffix = torch.cumprod(torch.cat([ones, f.flip(-1)[..., :-1]], -1), -1).flip(-1)
    return prefix * suffix


def backward(grad_phi, x, weight, bias, g_params, rank, dbar, activation, omega, gamma, needs):
    """-> (dx, dweight, dbias, dg_params), None where not needed or the input is None."""
    need_x, need_w, need_b, need_g = needs
    z = _projections(x, weight, bias, rank, dbar)
    g, dg = _activation(activation, omega, z, g_params)
    # dL/dg_lj = grad_phi_l * gamma * prod_{k != j} (1 + gamma g_lk)
    grad_g = grad_phi.to(z.dtype)[..., None] * gamma * _exclusive_products(1 + gamma * g)
    grad_z = (grad_g * dg).reshape(x.shape[0], rank * dbar)
    compute = z.dtype
    dx = (grad_z @ weight.to(compute)).to(x.dtype) if need_x else None
    dw = (grad_z.T @ x.to(compute)).to(weight.dtype) if need_w else None
    db = grad_z.sum(0).to(bias.dtype) if (need_b and bias is not None) else None
    dgp = None
    if need_g and g_params is not None:
        a, w, c = g_params.to(compute)
        da, dw_g, dc = torch.zeros_like(a), torch.zeros_like(w), torch.zeros_like(c)
        for i in range(a.shape[-1]):
            t = torch.tanh(w[..., i] * z + c[..., i])
            # g = sum_i a_i t_i, t_i = tanh(w_i z + c_i): dg/da_i = t_i, dg/dc_i = a_i (1 - t_i^2), dg/dw_i = z dg/dc_i
            s = grad_g * a[..., i] * (1 - t * t)
            da[..., i] = (grad_g * t).sum(0)
            dc[..., i] = s.sum(0)
            dw_g[..., i] = (s * z).sum(0)
        dgp = torch.stack([da, dw_g, dc]).to(g_params.dtype)
    return dx, dw, db, dgp
