"""LRNN sum-of-products activations (DESIGN.md §4)."""
