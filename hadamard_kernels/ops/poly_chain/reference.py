"""The oracle for poly_chain: the survey's formula one projection at a time, in float32 (float64 stays float64).

The backward is written out by hand (gradcheck verifies it against finite differences of `forward`): the
leave-one-out products are formed by multiplying the other factors, never by dividing."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

_ACTIVATIONS = {
    "identity": lambda z: z,
    "relu": torch.relu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "gelu": F.gelu,  # exact (erf) form
}

_ACTIVATION_GRADS = {
    "identity": lambda z: torch.ones_like(z),
    "relu": lambda z: (~(z <= 0)).to(z.dtype),  # 0 at z = 0 and 1 at NaN, as torch.relu's backward
    "tanh": lambda z: 1 - torch.tanh(z) ** 2,
    "sigmoid": lambda z: torch.sigmoid(z) * (1 - torch.sigmoid(z)),
    "gelu": lambda z: 0.5 * (1 + torch.erf(z / math.sqrt(2))) + z * torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi),
}


def _compute_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _projections(x, weight, bias):
    """z_n = x @ weight[n].T + bias[n] for every n, in the compute dtype."""
    compute = _compute_dtype(x)
    xc, wc = x.to(compute), weight.to(compute)
    return [xc @ wc[n].T + (0 if bias is None else bias[n].to(compute)) for n in range(weight.shape[0])]


def _factors(us, mode):
    """y_N = prod_n f_n with f_1 = u_1, and f_n = 1 + u_n (ccp: y_n = u_n y_{n-1} + y_{n-1}) or u_n (product)."""
    return [u if (n == 0 or mode == "product") else 1 + u for n, u in enumerate(us)]


def forward(x, weight, bias, mode, activation, scale, *, save_projections=False):
    """x [..., d], weight [N, k, d], bias [N, k] | None -> y_N [..., k], and with save_projections also
    z [..., N, k] (z_n = x @ weight[n].T + bias[n], the pre-activation projections, in x's dtype).

    u_n = scale * act(z_n);  ccp: y_1 = u_1, y_n = u_n * y_{n-1} + y_{n-1};  product: y_n = u_n * y_{n-1}."""
    act = _ACTIVATIONS[activation]
    zs = _projections(x, weight, bias)
    y = None
    for z in zs:
        u = scale * act(z)
        if y is None:
            y = u
        elif mode == "ccp":
            y = u * y + y
        else:
            y = u * y
    if save_projections:
        return y.to(x.dtype), torch.stack(zs, -2).to(x.dtype)
    return y.to(x.dtype)


def backward(grad_y, x, weight, bias, mode, activation, scale, needs, projections=None):
    """projections: z [..., N, k] saved by the forward (used instead of recomputing them), or None."""
    zs = _projections(x, weight, bias) if projections is None else list(
        projections.to(_compute_dtype(x)).unbind(-2))
    fs = _factors([scale * _ACTIVATIONS[activation](z) for z in zs], mode)
    g = grad_y.to(zs[0].dtype)
    grad_zs = []
    for n, z in enumerate(zs):
        leave_one_out = torch.ones_like(z)
        for m, f in enumerate(fs):
            if m != n:
                leave_one_out = leave_one_out * f
        grad_zs.append(g * leave_one_out * scale * _ACTIVATION_GRADS[activation](z))
    need_x, need_w, need_b = needs
    x2d = x.reshape(-1, x.shape[-1]).to(g.dtype)
    w = weight.to(g.dtype)
    gz2d = [gz.reshape(-1, gz.shape[-1]) for gz in grad_zs]
    dx = sum(gz @ w[n] for n, gz in enumerate(grad_zs)).to(x.dtype) if need_x else None
    dw = torch.stack([gz.T @ x2d for gz in gz2d]).to(weight.dtype) if need_w else None
    db = torch.stack([gz.sum(0) for gz in gz2d]).to(bias.dtype) if (need_b and bias is not None) else None
    return dx, dw, db
