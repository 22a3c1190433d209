from .op import poly_gate, spatial_shift

__all__ = ["poly_gate", "spatial_shift"]
