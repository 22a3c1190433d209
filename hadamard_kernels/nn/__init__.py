"""Modules built on the fused ops (DESIGN.md, "Modules"): drop-ins whose state_dict keys match the
Hadamard-product survey's instructional code."""

from .attention import LinearSelfAttention
from .lrnn import LRNN, LRNNLayer
from .poly import CCP, NCP, PolyChain, ProductChain
from .poly_gate import PolyBlock, PolyMlp, SpatialShift
from .poly_sa import PolySA

__all__ = ["CCP", "LRNN", "LRNNLayer", "NCP", "LinearSelfAttention", "PolyBlock", "PolyChain", "PolyMlp", "PolySA",
           "ProductChain", "SpatialShift"]
