"""lrnn_product's spec shared by its backends: option values and argument checks (DESIGN.md §4).

    z = x @ weight.T + bias                      (M, rank * dbar), viewed as (M, rank, dbar): row l * dbar + j of
                                                 weight is component j of neuron l
    phi_l = prod_j (1 + gamma * g_lj(z_lj))      (M, rank)

g is one of ACTIVATIONS: sin (sin(omega z)), spder (sin(z) sqrt|z|), arctan, tanh, or mlp, a tiny network per
component g_lj(z) = sum_i a_lji tanh(w_lji z + c_lji) with g_params (3, rank, dbar, h) = stack([a, w, c]).
omega scales z for sin only; any other activation with omega != 1 is a ValueError (there it would only rescale
the weights).
"""

from __future__ import annotations

import torch

from ... import _checks

# Index = the activation code of the kernels (triton.py, csrc/lrnn.cu).
ACTIVATIONS = ("sin", "spder", "arctan", "tanh", "mlp")
# The mlp activation's hidden width h: its per-component parameters stay in registers.
MAX_HIDDEN = 16
# The contract's largest dbar (the 1..64): the fused kernels keep a neuron's components in one tile.
MAX_DBAR = 64


def check_args(x, weight, bias, g_params, rank, dbar, activation, omega, gamma) -> None:
    """x (..., d) (2-D in the backends), weight (rank * dbar, d), bias (rank * dbar,) or None, g_params
    (3, rank, dbar, h) with 1 <= h <= MAX_HIDDEN for activation "mlp" and None otherwise; rank >= 1 and
    1 <= dbar <= MAX_DBAR ints;
    omega a finite number (1 unless activation is "sin"); gamma a finite number or None (dbar ** -0.5)."""
    _checks.check_positive_int("rank", rank)
    _checks.check_positive_int("dbar", dbar)
    if dbar > MAX_DBAR:
        raise ValueError(f"dbar must be <= {MAX_DBAR} (a neuron's components), got {dbar}")
    _checks.check_choice("activation", activation, ACTIVATIONS)
    omega = _checks.check_finite_float("omega", omega)
    if activation != "sin" and omega != 1.0:
        raise ValueError(f"omega scales z for activation 'sin' only; activation {activation!r} needs omega=1.0, "
                         f"got {omega!r}")
    if gamma is not None:
        _checks.check_finite_float("gamma", gamma)
    _checks.check_tensor("x", x, min_ndim=1)
    _checks.check_tensor("weight", weight, ndim=2)
    d = weight.shape[1]
    _checks.check_positive("weight.shape[1]", d, "in_features d")
    _checks.check_shape("weight", weight, (rank * dbar, d), f"(rank * dbar, d) = ({rank} * {dbar}, d)")
    if x.shape[-1] != d:
        raise ValueError(f"x must have last dim {d} (weight.shape[1]), got shape {tuple(x.shape)}")
    if bias is not None:
        _checks.check_tensor("bias", bias)
        _checks.check_shape("bias", bias, (rank * dbar,), f"(rank * dbar,) = ({rank} * {dbar},)")
    if activation == "mlp":
        if g_params is None:
            raise ValueError("activation 'mlp' needs g_params of shape (3, rank, dbar, h) = stack([a, w, c]), "
                             "got None")
        _checks.check_tensor("g_params", g_params, ndim=4)
        _checks.check_shape("g_params", g_params, (3, rank, dbar, None), f"(3, rank, dbar, h) = (3, {rank}, {dbar}, h)")
        h = g_params.shape[3]
        if not 1 <= h <= MAX_HIDDEN:
            raise ValueError(f"g_params.shape[3] (the mlp's hidden width h) must be in [1, {MAX_HIDDEN}], got {h}")
    elif g_params is not None:
        raise ValueError(f"g_params is only used by activation 'mlp'; pass None for activation {activation!r}")
    _checks.check_same_dtype_device("x", x, weight=weight, bias=bias, g_params=g_params)


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32, or float64 for float64 inputs: the dtype of every sum and product of the family."""
    return torch.float64 if dtype == torch.float64 else torch.float32
