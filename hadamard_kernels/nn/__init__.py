"""Modules built on the fused ops (DESIGN.md, "Modules"): drop-ins whose state_dict keys match the
Hadamard-product survey's instructional code."""

from .attention import LinearSelfAttention
from .poly import CCP, NCP, PolyChain, ProductChain

__all__ = ["CCP", "NCP", "LinearSelfAttention", "PolyChain", "ProductChain"]
