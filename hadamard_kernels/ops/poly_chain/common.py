"""poly_chain's spec shared by its backends: option values, argument checks, and the gradient reduction."""

from __future__ import annotations

import torch

from ... import _checks

MODES = ("ccp", "product")
# Index = the code the kernels use (csrc/include/hadamard_kernels/activation.h, triton.py).
ACTIVATIONS = ("identity", "relu", "tanh", "sigmoid", "gelu")


def check_args(x, weight, bias, mode, activation) -> None:
    _checks.check_tensor("x", x, min_ndim=1)
    _checks.check_tensor("weight", weight, ndim=3)
    degree, out_features, in_features = weight.shape
    _checks.check_positive("weight.shape[0]", degree, "the degree N")
    _checks.check_positive("weight.shape[1]", out_features, "out_features k")
    _checks.check_positive("weight.shape[2]", in_features, "in_features d")
    if x.shape[-1] != in_features:
        raise ValueError(f"x must have last dim {in_features} (weight.shape[2]), got shape {tuple(x.shape)}")
    if bias is not None:
        _checks.check_tensor("bias", bias)
        _checks.check_shape("bias", bias, (degree, out_features), "(N, k) like weight.shape[:2]")
    _checks.check_same_dtype_device("x", x, weight=weight, bias=bias)
    _checks.check_choice("mode", mode, MODES)
    _checks.check_choice("activation", activation, ACTIVATIONS)


def grads_from_grad_z(grad_z: torch.Tensor, x2d: torch.Tensor, weight: torch.Tensor, has_bias: bool, needs):
    """dx, dweight, dbias from grad_z = dL/d(x W_n^T + b_n) laid out (M, N, k): two GEMMs and a column sum.

    With that layout, dx = grad_z.view(M, N*k) @ weight.view(N*k, d) and dweight.view(N*k, d) = grad_z^T @ x."""
    M, N, k = grad_z.shape
    gz = grad_z.view(M, N * k)
    need_x, need_w, need_b = needs
    dx = gz @ weight.reshape(N * k, -1) if need_x else None
    dw = (gz.t() @ x2d).view(N, k, -1) if need_w else None
    acc = torch.float64 if grad_z.dtype == torch.float64 else torch.float32
    db = grad_z.sum(0, dtype=acc).to(grad_z.dtype) if (need_b and has_bias) else None
    return dx, dw, db
