"""poly_chain's spec shared by its backends: option values and argument checks."""

from __future__ import annotations

from ... import _checks

MODES = ("ccp", "product")
# Index = the code the kernels use (csrc/include/hadamard_kernels/activation.h, triton.py).
ACTIVATIONS = ("identity", "relu", "tanh", "sigmoid", "gelu")


def check_args(x, weight, bias, mode, activation) -> None:
    _checks.check_stacked_projection(x, "weight", weight, "bias", bias)
    _checks.check_same_dtype_device("x", x, weight=weight, bias=bias)
    _checks.check_choice("mode", mode, MODES)
    _checks.check_choice("activation", activation, ACTIVATIONS)
