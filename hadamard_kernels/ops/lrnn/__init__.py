"""LRNN sum-of-products activations (DESIGN.md §4)."""

from .op import lrnn_product

__all__ = ["lrnn_product"]
