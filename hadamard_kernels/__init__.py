"""hadamard_kernels: fused GPU kernels (Triton and CUDA C++) for Hadamard-product networks."""

from . import nn
from ._backend import BACKENDS, available_backends
from .ops.linear_attention import (
    causal_linear_attention,
    causal_linear_attention_step,
    context_parallel_linear_attention,
)
from .ops.lrnn import lrnn_product
from .ops.poly_chain import poly_chain
from .ops.poly_gate import poly_gate, spatial_shift
from .ops.poly_ncp import poly_ncp
from .ops.poly_sa import poly_sa, poly_sa_pool

__version__ = "0.1.0"
__all__ = ["BACKENDS", "available_backends", "causal_linear_attention", "causal_linear_attention_step",
           "context_parallel_linear_attention", "lrnn_product", "nn", "poly_chain", "poly_gate", "poly_ncp",
           "poly_sa", "poly_sa_pool", "spatial_shift", "__version__"]
