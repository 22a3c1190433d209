"""poly_chain's spec shared by its backends: option values and argument checks."""

from __future__ import annotations

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
