from .op import poly_ncp

__all__ = ["poly_ncp"]
