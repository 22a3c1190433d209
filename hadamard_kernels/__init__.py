"""hadamard_kernels: fused GPU kernels (Triton and CUDA C++) for Hadamard-product networks."""

from ._backend import BACKENDS, available_backends
from .ops.poly_chain import poly_chain
from .ops.poly_ncp import poly_ncp
from . import nn

__version__ = "0.1.0"
__all__ = ["BACKENDS", "available_backends", "poly_chain", "poly_ncp", "__version__"]
